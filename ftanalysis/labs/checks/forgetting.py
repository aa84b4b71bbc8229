"""Checks for lab 06, measuring forgetting: the answer loss, the next-token KL to the base, and Spearman's rho.

- ``answer_loss`` is the library's task loss (:func:`ftanalysis.tasks.base.answer_loss`): mean cross-entropy
  per *answer token* of a causal LM, logits at position ``t`` predicting token ``t + 1``. The expected value
  comes from that function, with the answer mask turned into Hugging Face labels (-100 elsewhere).
  The seeded batches have answers of different lengths, so a mean of per-example means differs from it.
- ``token_kl`` is ``KL(p_base || p_ft)`` of the next-token distributions, averaged over chosen positions; the
  expected value is the closed form on ``log_softmax`` in float64. One case shifts every logit of a position
  by a constant (the distributions, and the KL, do not change).
- ``spearman`` is Pearson's correlation of average ranks; the expected value is ``scipy.stats.spearmanr`` when
  scipy is installed, else the same definition written out here. The cases contain ties and a monotone but
  non-linear relation.
"""

from __future__ import annotations

import torch

from ...tasks.base import answer_loss as library_answer_loss
from ._core import resolve, running, seeded


# ---------------------------------------------------------------------- references
def reference_answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """``sum_{b, t >= 1, mask[b, t]} -log softmax(logits[b, t - 1])[input_ids[b, t]] / sum_{b, t >= 1} mask[b, t]``."""
    labels = input_ids.masked_fill(~answer_mask.bool(), -100)
    return library_answer_loss(logits, labels).to(logits.dtype)


def reference_token_kl(logits_base: torch.Tensor, logits_ft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mean_{(b, t): mask[b, t]} sum_v p_v (log p_v - log q_v)``, ``p = softmax(logits_base[b, t])``, ``q`` of ``logits_ft``."""
    log_p = torch.log_softmax(logits_base.double(), dim=-1)
    log_q = torch.log_softmax(logits_ft.double(), dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return per_position[mask.bool()].mean().to(logits_base.dtype)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x``; tied values share the mean of the ranks they occupy."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference_spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of the average ranks of ``x`` and ``y``."""
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy is optional
        return _pearson(average_ranks(x), average_ranks(y))
    return float(spearmanr(x.double().numpy(), y.double().numpy()).statistic)


def _close(a, b, atol=1e-5) -> bool:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=1e-4)


def _scalar(got, name: str, check, case):
    check.require(isinstance(got, (float, int, torch.Tensor)) and torch.as_tensor(got).numel() == 1, case,
                  f"{name} must return one number (a 0-dim tensor or a float). Got {type(got).__name__} "
                  f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}.",
                  "reduce to a single number: average over the selected positions, not per example or per position.")
    return torch.as_tensor(got.detach() if isinstance(got, torch.Tensor) else got).reshape(())


# ---------------------------------------------------------------------- exercise 1: answer loss
def lm_batch(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits [B, T, V], input_ids [B, T], answer_mask [B, T])``: a prompt, an answer of ``answers[b]`` tokens,
    then padding (masked out) to length ``T``."""
    g = seeded(case["seed"])
    B, T, V = case["B"], case["T"], case["V"]
    logits = case.get("scale", 2.0) * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    answer_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (prompt, answer) in enumerate(zip(case["prompts"], case["answers"])):
        answer_mask[b, prompt : prompt + answer] = True
    return logits.to(case.get("dtype", torch.float32)), input_ids, answer_mask


ANSWER_LOSS_CASES = [
    {"seed": 0, "B": 3, "T": 8, "V": 11, "prompts": [3, 2, 4], "answers": [1, 4, 2]},
    {"seed": 1, "B": 4, "T": 10, "V": 7, "prompts": [5, 3, 2, 6], "answers": [3, 1, 6, 2], "scale": 4.0},
    {"seed": 2, "B": 2, "T": 6, "V": 23, "prompts": [1, 3], "answers": [5, 2], "dtype": torch.float64},
    {"seed": 3, "B": 5, "T": 9, "V": 13, "prompts": [4, 4, 2, 7, 3], "answers": [2, 5, 1, 2, 3], "scale": 0.5},
]


def _answer_loss_variants(logits, input_ids, answer_mask) -> dict[str, torch.Tensor]:
    """The usual wrong versions, to name the mistake when the student's value matches one of them."""
    logits = logits.double()
    log_probs = torch.log_softmax(logits, dim=-1)
    shifted = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]  # [B, T-1]: -log p(token t+1 | <= t)
    unshifted = -log_probs.gather(-1, input_ids[..., None])[..., 0]  # [B, T]
    target_mask = answer_mask[:, 1:]
    raw = -logits[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    return {
        "no shift": unshifted[answer_mask].mean(),
        "every token": shifted.mean(),
        "mask on the predicting position": shifted[answer_mask[:, :-1]].mean(),
        "mean of per-example means": torch.stack([shifted[b][target_mask[b]].mean() for b in range(len(shifted))]).mean(),
        "sum": shifted[target_mask].sum(),
        "no log_softmax": raw[target_mask].mean(),
        "probabilities": -log_probs[:, :-1].exp().gather(-1, input_ids[:, 1:, None])[..., 0][target_mask].mean(),
    }


ANSWER_LOSS_HINTS = {
    "no shift": "shift by one: the logits at position t predict token t + 1, so score logits[:, :-1] against input_ids[:, 1:].",
    "every token": "average over the answer tokens only (where answer_mask is True), not over every position.",
    "mask on the predicting position": "select the *predicted* tokens with the mask: answer_mask[:, 1:] goes with logits[:, :-1].",
    "mean of per-example means": "average over all answer tokens of the batch at once (one mean per token), not a mean of "
    "per-example means: examples with longer answers weigh more.",
    "sum": "take the mean over the answer tokens, not their sum.",
    "no log_softmax": "apply log_softmax to the logits before picking the target's entry: logits are not log-probabilities.",
    "probabilities": "cross-entropy is -log p(target), not -p(target): use log_softmax.",
}


def check_answer_loss(answer_loss=None) -> None:
    """``answer_loss(logits, input_ids, answer_mask)``: mean cross-entropy over the answer tokens of a causal LM,

    ``L = sum_{b, t >= 1, mask[b, t]} -log softmax(logits[b, t - 1])[input_ids[b, t]] / sum_{b, t >= 1} mask[b, t]``

    (logits ``[B, T, V]``; ``answer_mask[b, t]`` is True when token ``t`` of example ``b`` is an answer token;
    a 0-dim tensor). Expected: :func:`ftanalysis.tasks.base.answer_loss`, the loss the library trains and
    evaluates with.
    """
    fn = resolve(answer_loss, reference_answer_loss, "check_answer_loss", "function", ["logits", "input_ids", "answer_mask"])
    with running("check_answer_loss") as check:
        for case in check.cases(ANSWER_LOSS_CASES):
            logits, input_ids, answer_mask = lm_batch(case)
            expected = reference_answer_loss(logits, input_ids, answer_mask)
            got = _scalar(fn(logits.clone(), input_ids.clone(), answer_mask.clone()), "answer_loss", check, case)
            variants = _answer_loss_variants(logits, input_ids, answer_mask)
            check.compare("answer loss (nats per answer token)", expected, got, case, atol=1e-5, rtol=1e-4, hints=[
                lambda e, o, c, name=name: ANSWER_LOSS_HINTS[name] if _close(o, variants[name]) else None
                for name in ANSWER_LOSS_HINTS
            ])


# ---------------------------------------------------------------------- exercise 2: token KL
def logit_pair(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits_base, logits_ft, mask)``: seeded ``[B, T, V]`` logits, ``logits_ft`` a perturbation of the base
    (``"shift"``: the base plus a constant per position, the same distributions), and a position mask."""
    g = seeded(case["seed"])
    B, T, V = case["B"], case["T"], case["V"]
    base = case.get("scale", 2.0) * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    noise = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if case.get("ft") == "shift":
        ft = base + 5.0 * torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    else:
        ft = base + case.get("change", 1.0) * noise
    mask = torch.rand(B, T, generator=g) < case.get("keep", 0.6)
    mask[0, 0] = True
    return base.to(case.get("dtype", torch.float32)), ft.to(case.get("dtype", torch.float32)), mask


TOKEN_KL_CASES = [
    {"seed": 0, "B": 3, "T": 5, "V": 9},
    {"seed": 1, "B": 2, "T": 7, "V": 17, "change": 3.0, "scale": 3.0, "keep": 0.4},
    {"seed": 2, "B": 4, "T": 4, "V": 6, "change": 0.5, "dtype": torch.float64},
    {"seed": 3, "B": 2, "T": 6, "V": 12, "ft": "shift"},
    {"seed": 4, "B": 3, "T": 3, "V": 30, "change": 2.0, "scale": 0.7, "keep": 0.8},
]


def _token_kl_variants(logits_base, logits_ft, mask) -> dict[str, torch.Tensor]:
    a, b = logits_base.double(), logits_ft.double()
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    p, q = log_p.exp(), log_q.exp()
    m = mask.bool()
    forward = (p * (log_p - log_q)).sum(-1)
    return {
        "reversed": (q * (log_q - log_p)).sum(-1)[m].mean(),
        "raw logits": (p * (a - b)).sum(-1)[m].mean(),
        "probabilities": (p * (p - q)).sum(-1)[m].mean(),
        "sum": forward[m].sum(),
        "all positions": forward.mean(),
        "vocabulary mean": (p * (log_p - log_q)).mean(-1)[m].mean(),
        "symmetric": (0.5 * (p * (log_p - log_q) + q * (log_q - log_p)).sum(-1))[m].mean(),
    }


TOKEN_KL_HINTS = {
    "reversed": "KL(p_base || p_ft) = sum_v p_base (log p_base - log p_ft): weight by the *base* model's "
    "probabilities (you computed KL(p_ft || p_base); note F.kl_div(input, target) computes KL(target || input)).",
    "raw logits": "take log_softmax of each logits tensor first: raw logits are log-probabilities only up to a "
    "constant per position, and that constant does not cancel.",
    "probabilities": "use log-probabilities inside the KL: sum_v p_v (log p_v - log q_v), not sum_v p_v (p_v - q_v).",
    "sum": "average over the selected positions (divide by the number of True entries of mask), do not sum them.",
    "all positions": "average only over the positions where mask is True.",
    "vocabulary mean": "sum over the vocabulary, then average over positions (F.kl_div's reduction='mean' also "
    "divides by the vocabulary size).",
    "symmetric": "the exercise asks for KL(p_base || p_ft) alone, not the average of both directions.",
}


def check_token_kl(token_kl=None) -> None:
    """``token_kl(logits_base, logits_ft, mask)``: the KL divergence of the fine-tuned model's next-token
    distribution from the base's, averaged over the positions where ``mask`` is True,

    ``KL = mean_{(b, t): mask[b, t]} sum_v p_v (log p_v - log q_v)``,  ``p = softmax(logits_base[b, t])``,
    ``q = softmax(logits_ft[b, t])``

    (a 0-dim tensor, in nats). Expected: the closed form on ``log_softmax`` in float64.
    """
    fn = resolve(token_kl, reference_token_kl, "check_token_kl", "function", ["logits_base", "logits_ft", "mask"])
    with running("check_token_kl") as check:
        for case in check.cases(TOKEN_KL_CASES):
            logits_base, logits_ft, mask = logit_pair(case)
            expected = reference_token_kl(logits_base, logits_ft, mask)
            got = _scalar(fn(logits_base.clone(), logits_ft.clone(), mask.clone()), "token_kl", check, case)
            variants = _token_kl_variants(logits_base, logits_ft, mask)
            check.compare("mean KL(p_base || p_ft) (nats)", expected, got, case, atol=1e-5, rtol=1e-4, hints=[
                *(lambda e, o, c, name=name: TOKEN_KL_HINTS[name] if _close(o, variants[name]) else None for name in TOKEN_KL_HINTS),
                lambda e, o, c: "KL is never negative: check the order of log p and log q." if float(o) < -1e-6 else None,
            ])


# ---------------------------------------------------------------------- exercise 3: Spearman
SPEARMAN_CASES = [
    {"seed": 0, "n": 5, "kind": "ties"},  # small integer counts with ties, like intruder counts per method
    {"seed": 1, "n": 8, "kind": "monotone"},  # y = exp(x) + tiny noise: Spearman ~1, Pearson well below
    {"seed": 2, "n": 12, "kind": "ties"},
    {"seed": 3, "n": 6, "kind": "anti"},  # decreasing relation with ties in both
    {"seed": 4, "n": 30, "kind": "random"},
]


def spearman_pair(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(case["seed"])
    n = case["n"]
    if case["kind"] == "ties":
        x = torch.randint(0, max(2, n // 2), (n,), generator=g).double()
        y = x + torch.randint(0, 3, (n,), generator=g).double()
    elif case["kind"] == "monotone":
        x = torch.linspace(0, 4, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        y = torch.exp(2 * x)
    elif case["kind"] == "anti":
        x = torch.tensor([0.0, 0.0, 2.0, 8.0, 8.0, 24.0], dtype=torch.float64)[torch.randperm(n, generator=g)]
        y = 12.0 - 0.25 * x + torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        y = torch.round(y)
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        y = x + torch.randn(n, generator=g, dtype=torch.float64)
    return x.float(), y.float()


def _spearman_variants(x, y) -> dict[str, float]:
    ordinal = lambda v: v.double().argsort(stable=True).argsort().double() + 1  # noqa: E731
    n = len(x)
    d2 = lambda rx, ry: float(((rx - ry) ** 2).sum())  # noqa: E731
    formula = lambda rx, ry: 1 - 6 * d2(rx, ry) / (n * (n * n - 1))  # noqa: E731
    return {
        "pearson": _pearson(x, y),
        "ordinal": _pearson(ordinal(x), ordinal(y)),
        "formula": formula(average_ranks(x), average_ranks(y)),
    }


SPEARMAN_HINTS = {
    "pearson": "rank both vectors first: Spearman's rho is Pearson's correlation of the *ranks*, not of the values.",
    "ordinal": "give tied values the average of the ranks they occupy (e.g. two values tied for ranks 2 and 3 both get "
    "2.5); argsort().argsort() breaks ties by position.",
    "formula": "1 - 6 sum d^2 / (n (n^2 - 1)) is exact only without ties: compute Pearson's correlation of the average ranks.",
}


def check_spearman(spearman=None) -> None:
    """``spearman(x, y)``: Spearman's rank correlation of two 1-D tensors, Pearson's correlation of their ranks,

    ``rho = sum_i (r_i - r_mean)(s_i - s_mean) / sqrt(sum_i (r_i - r_mean)^2 sum_i (s_i - s_mean)^2)``,

    with ``r = rank(x)``, ``s = rank(y)`` and tied values given the average of the ranks they occupy (a float).
    Expected: ``scipy.stats.spearmanr`` when installed, else :func:`average_ranks` + Pearson.
    """
    fn = resolve(spearman, reference_spearman, "check_spearman", "function", ["x", "y"])
    with running("check_spearman") as check:
        for case in check.cases(SPEARMAN_CASES):
            x, y = spearman_pair(case)
            expected = reference_spearman(x, y)
            got = _scalar(fn(x.clone(), y.clone()), "spearman", check, case)
            variants = _spearman_variants(x, y)
            check.compare("rho", torch.tensor(expected, dtype=torch.float64), got, case, atol=1e-5, rtol=1e-4, hints=[
                *(lambda e, o, c, name=name: SPEARMAN_HINTS[name] if _close(o, variants[name]) else None for name in SPEARMAN_HINTS),
                lambda e, o, c: "a correlation lies in [-1, 1]." if not -1 - 1e-6 <= float(o) <= 1 + 1e-6 else None,
            ])


__all__ = ["check_answer_loss", "check_token_kl", "check_spearman", "reference_answer_loss", "reference_token_kl",
           "reference_spearman", "average_ranks"]

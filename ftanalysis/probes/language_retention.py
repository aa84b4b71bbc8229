"""Language-model retention of a real decoder: text loss, KL to the base and task scores, in one table.

:func:`~ftanalysis.probes.retention` scores a zoo model on its procedural pretraining mix. A real pretrained LM
(``fta.zoo.load("smollm2-135m")``) has no such mix at hand, so this module measures what a fine-tune kept of
it with data that ships with Python and with the base itself:

- :func:`text_loss`: mean next-token cross-entropy (nats/token) on English prose, the language reference in
  ``pydoc_data.topics`` (:func:`reference_text`, cut into windows by :func:`text_windows`). A rise is forgetting
  of the pretraining distribution, the measure Shuttleworth et al. 2024 relate to intruder dimensions.
- :func:`token_kl`: mean KL(base || model) per token between the two next-token distributions, on the same
  text (``text_kl``) and on text the base generates itself (:func:`continuations`; ``generated_kl``), so that
  the second one measures how far the fine-tune moved the base's own distribution.
- task scores of capabilities the base already has: IOI (logit difference, accuracy) and known world facts.
  Jain et al. 2024 argue that fine-tuning often wraps such capabilities rather than erasing them, so a drop
  here shows that the behaviour changed, not that the mechanism was erased (:mod:`~ftanalysis.probes.forgetting`
  has the tests for that).

:class:`LMRetention` holds the base, the windows and every number of the base, so a sweep over many
fine-tunes of one base computes the base's side once; :func:`lm_retention` is the one-call form.

Intervals treat windows (or generated continuations) as the independent units: tokens inside a window are
correlated, windows cut from distant parts of the text much less so.

References
----------
Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228. Jain, Kirk, Lubana, Dick, Tanaka, Grefenstette, Rocktaschel, Krueger 2024, "Mechanistically
analyzing the effects of fine-tuning on procedurally defined tasks", arXiv 2311.12786.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import scipy.stats
import torch

from .._validation import check_float, check_int
from ..nn.kv_cache import cache_kwarg, output_cache

OWNER = "LMRetention"

# Sixteen neutral English openings for :func:`continuations`: no names, no chat markup, nothing task-like.
PROMPTS: tuple[str, ...] = (
    "The old bridge across the river was built",
    "Every morning, the baker on our street",
    "The committee met on Tuesday to discuss",
    "In the spring, the hills around the village",
    "She opened the letter and read",
    "The museum's new exhibition explores",
    "According to the report, the number of",
    "When the train finally arrived at the station,",
    "The recipe calls for two cups of flour and",
    "Scientists have long wondered why",
    "The library is open from nine in the morning",
    "After the storm, the fishermen",
    "The first chapter of the book describes",
    "Our neighbours have a small garden where",
    "The city council announced that",
    "He learned to play the piano when",
)

# Task rows: registered name -> (options for fta.tasks.make, ((row, key of evaluate()'s dict), ...)).
# "ioi_accuracy" is the task's "accuracy" (greedy: IO is the argmax over the whole vocabulary), not its own
# "ioi_accuracy" key (IO above S, the two-name choice), which moves with the logit difference.
NAMED_TASKS: dict[str, tuple[dict, tuple[tuple[str, str], ...]]] = {
    "ioi": ({}, (("ioi_logit_diff", "logit_diff"), ("ioi_accuracy", "accuracy"))),
    "world_facts": ({"subset": "known"}, (("facts_accuracy", "accuracy"),)),
}


# ---------------------------------------------------------------------- text
def reference_text(n_chars: int | None = None) -> str:
    """English prose that ships with Python: the 79 sections of the language reference in ``pydoc_data.topics``.

    The sections are joined with blank lines in sorted key order (about 465,000 characters), so the text is
    the same on every machine with the same Python minor version.

    Parameters
    ----------
    n_chars : int or None, default=None
        Keep only the first ``n_chars`` characters; None keeps everything.
    """
    from pydoc_data.topics import topics

    if n_chars is not None:
        check_int(n_chars, "n_chars", "reference_text", 1)
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text if n_chars is None else text[:n_chars]


def text_windows(tok, n_tokens: int = 2048, window: int = 128, seed: int = 0) -> torch.Tensor:
    """Non-overlapping token windows cut from :func:`reference_text`, chosen at random with ``seed``.

    The whole text is tokenised once (no special tokens) and split into consecutive windows of ``window``
    tokens; ``ceil(n_tokens / window)`` of them are drawn without replacement and returned in text order.

    Parameters
    ----------
    tok : a Hugging Face tokenizer.
    n_tokens : int, default=2048
        Tokens wanted in all; more give narrower intervals and cost proportionally more forward passes.
    window : int, default=128
        Tokens per window: the context length of every prediction is at most ``window - 1``.
    seed : int, default=0

    Returns
    -------
    LongTensor of shape ``[n_windows, window]``.
    """
    check_int(n_tokens, "n_tokens", "text_windows", 1)
    check_int(window, "window", "text_windows", 2)
    check_int(seed, "seed", "text_windows")
    ids = torch.tensor(tok(reference_text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    n_chunks = len(ids) // window
    n_windows = math.ceil(n_tokens / window)
    if n_windows > n_chunks:
        raise ValueError(
            f"The 'n_tokens' parameter of text_windows must be at most {n_chunks * window} with window={window} "
            f"(the reference text is {len(ids)} tokens with this tokenizer). Got {n_tokens} instead."
        )
    chosen = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))[:n_windows].sort().values
    return ids[: n_chunks * window].view(n_chunks, window)[chosen]  # [n_windows, window]


def continuations(
    base, tok, prompts=None, n_new: int = 32, seed: int = 0, temperature: float = 1.0, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations the base writes itself from neutral English prompts, as windows with a mask of scored tokens.

    Each prompt is tokenised as ``tok`` does by default, and ``n_new`` tokens are drawn from ``base`` one at a
    time (batched with left padding, explicit position ids and a key/value cache). With ``temperature=1`` the
    tokens are samples of the base's own distribution, so KL(base || model) on them estimates the per-token KL
    between the two models along text the base would write; ``temperature=0`` is greedy decoding.

    Parameters
    ----------
    base : causal LM, not modified.
    tok : its tokenizer.
    prompts : sequence of str, default=:data:`PROMPTS` (16 neutral openings)
    n_new : int, default=32
        New tokens per prompt (no stop at an end-of-sequence token).
    seed : int, default=0
        Seeds the sampling (a private ``torch.Generator``; the global RNG is untouched). Same seed, same tokens.
    temperature : float, default=1.0
        Softmax temperature; 0 means greedy.
    batch_size : int, default=16
        Prompts decoded together.

    Returns
    -------
    ids : LongTensor of shape ``[n_prompts, max_prompt_length + n_new]``
        Prompt then continuation, right-padded with the pad token.
    mask : BoolTensor of the same shape
        True at the generated tokens: the tokens :func:`token_kl` and :func:`text_loss` score.
    """
    owner = "continuations"
    _check_model(base, "base", owner)
    prompts = PROMPTS if prompts is None else prompts
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise TypeError(f"The 'prompts' parameter of {owner} must be a non-empty list of non-empty strings or None. Got {prompts!r} instead.")
    check_int(n_new, "n_new", owner, 1)
    check_int(seed, "seed", owner)
    check_float(temperature, "temperature", owner, 0.0)
    check_int(batch_size, "batch_size", owner, 1)
    pad = _pad_id(tok)
    rows = [list(tok(p)["input_ids"]) for p in prompts]
    generator = torch.Generator().manual_seed(seed)
    new: list[torch.Tensor] = []
    with _evaluating(base):
        for start in range(0, len(rows), batch_size):
            new.append(_decode(base, rows[start : start + batch_size], n_new, pad, temperature, generator))
    generated = torch.cat(new)  # [n_prompts, n_new]
    length = max(len(r) for r in rows) + n_new
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        ids[i, len(row) : len(row) + n_new] = generated[i]
        mask[i, len(row) : len(row) + n_new] = True
    return ids, mask


def _decode(model, rows: list[list[int]], n_new: int, pad: int, temperature: float, generator) -> torch.Tensor:
    """``n_new`` tokens after each row (left-padded batch, KV cache); sampling on the CPU with ``generator``."""
    device = _device(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)  # [batch, pos]: real tokens count from 0 after the padding
    cache_name = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
    tokens = []
    for step in range(n_new):
        logits = out.logits[:, -1].float().cpu()  # [batch, vocab]
        if temperature == 0:
            token = logits.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        tokens.append(token)
        if step == n_new - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        past = output_cache(out)
        out = model(input_ids=token[:, None].to(device), attention_mask=attention, position_ids=positions, use_cache=True, **{cache_name: past})
    return torch.stack(tokens, dim=1)  # [batch, n_new]


# ---------------------------------------------------------------------- per-token means over windows
@dataclass(frozen=True)
class WindowMean:
    """A mean per scored token, with a 95% t-interval that treats windows as the independent units.

    ``mean = sum(sums) / sum(counts)``; its standard error is the cluster-robust (ratio) one,
    ``se^2 = n / (n - 1) * sum_i (sums_i - mean * counts_i)^2 / sum(counts)^2`` over the ``n`` windows, which for
    windows of equal size is the ordinary standard error of the per-window means. The interval is
    ``mean +/- t_{0.975, n-1} * se`` (NaN for a single window).
    """

    mean: float
    ci_low: float
    ci_high: float
    n_windows: int
    n_tokens: int
    sums: torch.Tensor = field(repr=False)  # [n_windows] float64: the quantity summed over each window's scored tokens
    counts: torch.Tensor = field(repr=False)  # [n_windows]: scored tokens per window

    @classmethod
    def of(cls, sums: torch.Tensor, counts: torch.Tensor) -> WindowMean:
        sums, counts = sums.double(), counts.double()
        n, total = len(sums), float(counts.sum())
        mean = float(sums.sum()) / total
        if n < 2:
            low = high = math.nan
        else:
            se = math.sqrt(n / (n - 1) * float(((sums - mean * counts) ** 2).sum())) / total
            half = float(scipy.stats.t.ppf(0.975, n - 1)) * se
            low, high = mean - half, mean + half
        return cls(mean, low, high, n, int(total), sums, counts)

    def paired_difference(self, other: WindowMean) -> WindowMean:
        """``self - other`` on the same windows, with the paired interval (narrower than either interval alone)."""
        if not torch.equal(self.counts, other.counts):
            raise ValueError("paired_difference needs two WindowMeans over the same windows and scored tokens.")
        return WindowMean.of(self.sums - other.sums, self.counts)

    def __float__(self) -> float:
        return self.mean


# ---------------------------------------------------------------------- loss and KL
def text_loss(model, windows: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 8) -> WindowMean:
    """Mean next-token cross-entropy of ``model`` on token windows (nats/token), with a 95% t-interval.

    Token ``t`` of a window is predicted from tokens ``< t`` of the same window (no context from outside it),
    so the loss of ``window``-token windows is a little higher than over the text as one stream.

    Parameters
    ----------
    model : causal LM, not modified (run in eval mode without gradients, its modes restored).
    windows : LongTensor of shape ``[n_windows, window]``, e.g. from :func:`text_windows`.
    mask : BoolTensor of the same shape, default=every token but the first of each window
        The scored tokens (HF ``labels`` convention: token ``t`` is scored from the logits at ``t - 1``, so
        column 0 must be False); :func:`continuations` returns one.
    batch_size : int, default=8
        Windows per forward pass.
    """
    mask = _check_windows(windows, mask, model, "text_loss")
    check_int(batch_size, "batch_size", "text_loss", 1)
    with _evaluating(model):
        loss, _, counts, _ = _sweep(model, windows, mask, batch_size)
    return WindowMean.of(loss, counts)


def token_kl(base, model, windows: torch.Tensor, mask: torch.Tensor | None = None, batch_size: int = 8) -> WindowMean:
    """Mean KL(base || model) per token between the next-token distributions, with a 95% t-interval.

    At every scored position ``t``, with ``p = softmax(base logits)`` and ``q = softmax(model logits)`` over the
    vocabulary (log-softmax in float32)::

        KL(p || q) = sum_v p(v) * (log p(v) - log q(v))   (nats; 0 exactly when the logits are equal)

    Unlike the loss, it needs no reference tokens: it says how much of the base's prediction the fine-tune
    moved, including where the base was wrong. Under the base's own text (:func:`continuations`) it is the
    per-token rate of the sequence-level KL. Arguments as in :func:`text_loss`; neither model is modified.
    """
    mask = _check_windows(windows, mask, model, "token_kl")
    _check_windows(windows, mask, base, "token_kl", name="base")
    check_int(batch_size, "batch_size", "token_kl", 1)
    kl = torch.zeros(len(windows), dtype=torch.float64)
    with _evaluating(base, model):
        for (log_p, _, rows), (log_q, _, _) in zip(_scored(base, windows, mask, batch_size), _scored(model, windows, mask, batch_size)):
            kl.index_add_(0, rows, _kl(log_p.to(log_q.device), log_q).double().cpu())
    return WindowMean.of(kl, mask[:, 1:].sum(1))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities ``[tokens, vocab]``."""
    # kl_div(input=log q, target=log p) is p * (log p - log q) elementwise, fused: exactly 0 where log q == log p
    return torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # [tokens]


def _scored(model, windows: torch.Tensor, mask: torch.Tensor, batch_size: int):
    """Per batch of windows: float32 log-probs at the scored positions ``[scored, vocab]``, their targets and windows."""
    device = _device(model)
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        scored = mask[start : start + batch_size, 1:]  # [batch, pos - 1]: token t + 1 is predicted at position t
        # every token attends (right padding after the scored tokens cannot reach them through a causal mask)
        attention = torch.ones_like(ids, device=device)
        logits = model(input_ids=ids.to(device), attention_mask=attention, use_cache=False).logits[:, :-1]  # [batch, pos - 1, vocab]
        log_probs = torch.log_softmax(logits[scored.to(device)].float(), dim=-1)  # [scored, vocab]
        rows = torch.arange(start, start + len(ids))[:, None].expand_as(scored)[scored]  # [scored]
        yield log_probs, ids[:, 1:][scored].to(device), rows


def _sweep(model, windows, mask, batch_size, reference=None, keep=False):
    """One pass of ``model``: per-window sums of loss and (against ``reference``, log-probs per batch) of KL."""
    loss = torch.zeros(len(windows), dtype=torch.float64)
    kl = None if reference is None else torch.zeros(len(windows), dtype=torch.float64)
    kept = []
    for b, (log_q, targets, rows) in enumerate(_scored(model, windows, mask, batch_size)):
        loss.index_add_(0, rows, -log_q.gather(1, targets[:, None])[:, 0].double().cpu())
        if reference is not None:
            kl.index_add_(0, rows, _kl(reference[b].to(log_q.device), log_q).double().cpu())
        if keep:
            kept.append(log_q)
    return loss, kl, mask[:, 1:].sum(1), kept


# ---------------------------------------------------------------------- the table
class LMRetention:
    """Retention of a base LM's abilities after fine-tuning, against a base whose numbers are computed once.

    Built once per base, called once per fine-tune: ``LMRetention(base, tok)(model)`` returns one row per
    measure (see :meth:`__call__`). The constructor computes everything about the base: the text windows,
    the continuations the base writes, its next-token log-probabilities at every scored token (kept in
    float32: ``4 * vocab`` bytes per token, about 0.5 GB for SmolLM2 at the defaults), its text loss and its
    task scores; a call then runs only the fine-tuned model.

    Measures (Shuttleworth et al. 2024 relate intruder dimensions to forgetting measured as loss on the
    pretraining distribution; Jain et al. 2024 ask whether a fine-tune keeps old capabilities):

    - ``text_loss``: mean next-token loss on :func:`text_windows` (nats/token, lower is better);
    - ``text_kl``: mean KL(base || model) per token on the same windows (:func:`token_kl`);
    - ``generated_kl``: the same on :func:`continuations` the base sampled itself;
    - ``ioi_logit_diff``, ``ioi_accuracy``: ``fta.tasks.make("ioi").evaluate(...)``'s ``logit_diff`` (mean
      logit(IO) - logit(S), Wang et al. 2022) and ``accuracy`` (IO is the greedy next token);
    - ``facts_accuracy``: ``fta.tasks.make("world_facts", subset="known").evaluate(...)``'s ``accuracy``.

    Parameters
    ----------
    base : causal LM or None
        The pretrained model, not modified. None gives only the model's own values (no KL rows, no change).
    tok : the tokenizer shared by the base and its fine-tunes.
    text_tokens : int, default=2048
        Tokens of reference text (``ceil(text_tokens / window)`` windows).
    window : int, default=128
    tasks : sequence of str or Task, default=("ioi", "world_facts")
        Registered task names (built with ``seed``; the two default names get the options and row names
        above, any other name rows ``<name>_logit_diff`` if its evaluate returns one and ``<name>_accuracy``)
        or Task objects. An unregistered name is an error; ``()`` skips the task rows.
    n : int, default=64
        Test examples per task.
    prompts : sequence of str, default=:data:`PROMPTS`
    n_new : int, default=32
        Tokens the base writes per prompt for ``generated_kl``.
    temperature : float, default=1.0
        Sampling temperature of the continuations (0 = greedy).
    seed : int, default=0
        Seeds the window choice, the sampling and the tasks.
    batch_size : int, default=8
        Windows per forward pass (the logits of one batch take ``batch * window * vocab * 4`` bytes).

    Attributes
    ----------
    windows_ : LongTensor ``[n_windows, window]``; generated_, generated_mask_ : the continuations (None
    without a base); base_ : dict, the base's value (and ``WindowMean``) per measure.

    Examples
    --------
    >>> import ftanalysis as fta
    >>> base, tok = fta.zoo.load("smollm2-135m")  # doctest: +SKIP
    >>> retention = fta.probes.LMRetention(base, tok)  # doctest: +SKIP
    >>> table = retention(finetuned)  # doctest: +SKIP
    >>> table.set_index("measure").loc["text_loss", "change"]  # doctest: +SKIP
    """

    def __init__(
        self,
        base,
        tok,
        *,
        text_tokens: int = 2048,
        window: int = 128,
        tasks=("ioi", "world_facts"),
        n: int = 64,
        prompts=None,
        n_new: int = 32,
        temperature: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
    ):
        if base is not None:
            _check_model(base, "base", OWNER)
        check_int(n, "n", OWNER, 1)
        check_int(seed, "seed", OWNER)
        check_int(batch_size, "batch_size", OWNER, 1)
        self.base, self.tok, self.n, self.seed, self.batch_size = base, tok, n, seed, batch_size
        self.tasks = _resolve_tasks(tasks, seed)
        self.windows_ = text_windows(tok, text_tokens, window, seed)
        self.mask_ = _default_mask(self.windows_)
        self.generated_ = self.generated_mask_ = None
        self.base_: dict[str, object] = {}
        if base is None:
            return
        _check_windows(self.windows_, self.mask_, base, OWNER, name="base")
        self.generated_, self.generated_mask_ = continuations(base, tok, prompts, n_new, seed, temperature)
        with _evaluating(base):
            loss, _, counts, self._text_log_probs = _sweep(base, self.windows_, self.mask_, batch_size, keep=True)
            _, _, _, self._generated_log_probs = _sweep(base, self.generated_, self.generated_mask_, batch_size, keep=True)
            self.base_["text_loss"] = WindowMean.of(loss, counts)
            self.base_.update(self._task_values(base))

    def __call__(self, model) -> pd.DataFrame:
        """The retention table of ``model`` (not modified) against the base.

        Returns
        -------
        pandas.DataFrame with one row per measure and columns ``measure``, ``base``, ``model``, ``change``
        (model - base; for the KL rows the base is 0 and the change is the KL), ``ci_low``, ``ci_high`` (95%
        interval of the model's value: t over windows for loss and KL, the task's own ``<metric>_ci`` where
        it returns one, else NaN), ``change_ci_low``, ``change_ci_high`` (paired t-interval of the change over
        the same windows; NaN for task rows and without a base) and ``better`` (``"lower"`` or ``"higher"``).
        """
        _check_model(model, "model", OWNER)
        _check_windows(self.windows_, self.mask_, model, OWNER, name="model")
        has_base = self.base is not None
        rows = []
        with _evaluating(model):
            loss, kl, counts, _ = _sweep(model, self.windows_, self.mask_, self.batch_size, reference=self._text_log_probs if has_base else None)
            loss = WindowMean.of(loss, counts)
            if has_base:
                base_loss = self.base_["text_loss"]
                rows.append(_row("text_loss", base_loss.mean, loss, "lower", loss.paired_difference(base_loss)))
                text_kl = WindowMean.of(kl, counts)
                rows.append(_row("text_kl", 0.0, text_kl, "lower", text_kl))
                _, kl, counts, _ = _sweep(model, self.generated_, self.generated_mask_, self.batch_size, reference=self._generated_log_probs)
                generated_kl = WindowMean.of(kl, counts)
                rows.append(_row("generated_kl", 0.0, generated_kl, "lower", generated_kl))
            else:
                rows.append(_row("text_loss", math.nan, loss, "lower"))
            for measure, (value, ci) in self._task_values(model).items():
                base_value = self.base_[measure][0] if has_base else math.nan
                rows.append(_row(measure, base_value, value, "higher", ci=ci))
        return pd.DataFrame(rows)

    def _task_values(self, model) -> dict[str, tuple[float, tuple[float, float]]]:
        """``{row: (value, (ci_low, ci_high))}`` from each task's ``evaluate`` (the CI from its ``<key>_ci``, else NaN)."""
        values = {}
        for task, rows in self.tasks:
            out = task.evaluate(model, self.tok, n=self.n)
            if rows is None:  # a task without a fixed row list: its logit difference if it has one, and accuracy
                rows = tuple((f"{task.name}_{key}", key) for key in ("logit_diff", "accuracy") if key in out or key == "accuracy")
            missing = [key for _, key in rows if key not in out]
            if missing:
                raise ValueError(f"Task {task.name!r} returned no {missing} from evaluate(); it returned {sorted(out)}.")
            for row, key in rows:
                ci = out.get(f"{key}_ci")
                ci = (float(ci[0]), float(ci[1])) if isinstance(ci, (tuple, list)) and len(ci) == 2 else (math.nan, math.nan)
                values[row] = (float(out[key]), ci)
        return values

    def __repr__(self) -> str:
        n_windows, window = self.windows_.shape
        tasks = [task.name for task, _ in self.tasks]
        return f"LMRetention(base={'None' if self.base is None else type(self.base).__name__}, windows={n_windows}x{window}, tasks={tasks})"


def lm_retention(model, tok, base, *, text_tokens: int = 2048, tasks=("ioi", "world_facts"), n: int = 64, seed: int = 0) -> pd.DataFrame:
    """One retention table of ``model`` against ``base``: ``LMRetention(base, tok, ...)(model)``.

    For several fine-tunes of one base, build :class:`LMRetention` once and call it per model: the base's
    numbers are then computed once. Parameters and columns as in :class:`LMRetention`.

    References
    ----------
    Shuttleworth, Andreas, Torralba, Sharma 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
    arXiv 2410.21228. Jain et al. 2024, "Mechanistically analyzing the effects of fine-tuning on procedurally
    defined tasks", arXiv 2311.12786.
    """
    return LMRetention(base, tok, text_tokens=text_tokens, tasks=tasks, n=n, seed=seed)(model)


def _row(measure, base, value, better, change=None, ci=None) -> dict:
    """One table row; ``value`` and ``change`` may be WindowMeans (their intervals fill the CI columns)."""
    model = float(value)
    low, high = (value.ci_low, value.ci_high) if isinstance(value, WindowMean) else (ci or (math.nan, math.nan))
    change_low, change_high = (change.ci_low, change.ci_high) if change is not None else (math.nan, math.nan)
    return {
        "measure": measure, "base": float(base), "model": model, "change": model - float(base),
        "ci_low": low, "ci_high": high, "change_ci_low": change_low, "change_ci_high": change_high, "better": better,
    }


# ---------------------------------------------------------------------- checks and helpers
def _resolve_tasks(tasks, seed: int) -> list:
    """``[(task, ((row, key), ...) or None)]``; an unregistered name fails here, before any work."""
    from .. import tasks as task_registry

    if isinstance(tasks, (str, task_registry.Task)) or not isinstance(tasks, (list, tuple)):
        raise TypeError(f"The 'tasks' parameter of {OWNER} must be a tuple of task names or Task objects. Got {tasks!r} instead.")
    resolved = []
    for item in tasks:
        if isinstance(item, task_registry.Task):
            resolved.append((item, NAMED_TASKS[item.name][1] if item.name in NAMED_TASKS else None))
        elif isinstance(item, str):
            if item not in task_registry.available():
                raise ValueError(
                    f"The 'tasks' parameter of {OWNER} names {item!r}, which is not a registered task. Registered: "
                    f"{task_registry.available()}. Pass tasks=() to skip the task rows, or Task objects."
                )
            options, rows = NAMED_TASKS.get(item, ({}, None))
            resolved.append((task_registry.make(item, seed=seed, **options), rows))
        else:
            raise TypeError(f"The 'tasks' parameter of {OWNER} must hold task names or Task objects. Got {item!r} instead.")
    names = [task.name for task, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"The 'tasks' parameter of {OWNER} names a task twice: {names}.")
    return resolved


def _check_model(model, name: str, owner: str) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"The {name!r} parameter of {owner} must be a torch.nn.Module (a causal LM). Got {type(model).__name__} instead.")


def _default_mask(windows: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(windows.shape, dtype=torch.bool)
    mask[:, 0] = False  # nothing predicts a window's first token
    return mask


def _check_windows(windows, mask, model, owner: str, name: str = "model") -> torch.Tensor:
    """Validate windows (and mask) against ``model``'s vocabulary; return the mask (the default if None)."""
    _check_model(model, name, owner)
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long:
        got = f"a tensor of dtype {windows.dtype}" if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise TypeError(f"The 'windows' parameter of {owner} must be a LongTensor of shape [n_windows, window]. Got {got} instead.")
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"The 'windows' parameter of {owner} must have shape [n_windows >= 1, window >= 2]. Got shape {tuple(windows.shape)} instead.")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_vocab = embeddings.weight.shape[0] if hasattr(embeddings, "weight") else None
    if int(windows.min()) < 0 or (n_vocab is not None and int(windows.max()) >= n_vocab):
        raise ValueError(
            f"The 'windows' parameter of {owner} holds token ids in [{int(windows.min())}, {int(windows.max())}], outside the "
            f"{name}'s vocabulary [0, {n_vocab}): were they made with another tokenizer?"
        )
    if mask is None:
        return _default_mask(windows)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != windows.shape:
        got = f"dtype {mask.dtype} and shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"The 'mask' parameter of {owner} must be a bool tensor of the windows' shape {tuple(windows.shape)} or None. Got {got} instead.")
    if bool(mask[:, 0].any()):
        raise ValueError(f"The 'mask' parameter of {owner} must be False in column 0 (nothing predicts a window's first token).")
    if not bool(mask[:, 1:].any(1).all()):
        raise ValueError(f"The 'mask' parameter of {owner} must score at least one token in every window.")
    return mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tok) -> int:
    """The pad id for padding that is never attended to by a scored position (any id would do)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


@contextmanager
def _evaluating(*models):
    """Eval mode and no gradients inside; every module's own training flag restored on exit."""
    flags = [(module, module.training) for model in models if model is not None for module in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in flags:
            module.training = flag

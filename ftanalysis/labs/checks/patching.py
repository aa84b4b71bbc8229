"""Checks for lab 03, activation patching (and one step of cross-model patching).

The expected values come from :mod:`ftanalysis.probes.circuits` (its hooks, :func:`logit_diff` and
:func:`activation_patching`), run on small seeded GPT-2 models built here, never from the student's output.
The random models use a large initialisation (``initializer_range=0.3``) so that patching one head moves the
logits by much more than the tolerance: with GPT-2's default 0.02 a patch that does nothing would look right.
Every check also verifies that the student's hooks are gone after the call (a hook left on a model silently
changes every later forward pass).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import nn

from ...probes.circuits import activation_patching, logit_diff, run_with_cache, run_with_hooks
from ...probes.circuits.hooks import act_name
from ._core import resolve, running, seeded

# (n_layer, n_head, n_embd): several head counts, so a wrong head split cannot pass by luck
_SHAPES = [(2, 4, 32), (3, 2, 16), (1, 8, 32)]
_VOCAB = 40


# ---------------------------------------------------------------------- models and inputs
def tiny_gpt2(n_layer: int = 2, n_head: int = 4, n_embd: int = 32, seed: int = 0) -> nn.Module:
    """A seeded random GPT-2 LM (eval mode, no dropout) with weights large enough for patching to matter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=_VOCAB, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=2 * n_embd,
                        initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def perturbed_copy(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """A stand-in "fine-tuned" model: ``model`` with seeded noise added to every parameter."""
    g = seeded(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return ft.eval()


def _pair(case: dict, seed_offset: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean ids, corrupt ids (clean with the case's ``corrupt_at`` positions changed), answer and wrong token ids,
    drawn with seed ``seed_offset + case["seed"]``."""
    g = seeded(seed_offset + case["seed"])
    clean = torch.randint(0, _VOCAB, (case["batch"], case["pos"]), generator=g)
    corrupt = clean.clone()
    for p in case["corrupt_at"]:
        corrupt[:, p] = (clean[:, p] + torch.randint(1, _VOCAB, (case["batch"],), generator=g)) % _VOCAB
    answer = torch.randint(0, _VOCAB, (case["batch"],), generator=g)
    wrong = (answer + torch.randint(1, _VOCAB, (case["batch"],), generator=g)) % _VOCAB
    return clean, corrupt, answer, wrong


def _model_cases():
    for seed, ((n_layer, n_head, n_embd), batch, pos, corrupt_at) in enumerate(
        zip(_SHAPES, (3, 2, 4), (6, 5, 7), ([2], [1, 3], [4]))
    ):
        yield {"seed": seed, "layers": n_layer, "heads": n_head, "d_model": n_embd, "batch": batch, "pos": pos, "corrupt_at": corrupt_at}


@lru_cache(maxsize=None)
def _cached_model(n_layer: int, n_head: int, n_embd: int, seed: int) -> nn.Module:
    return tiny_gpt2(n_layer, n_head, n_embd, seed=seed)


def _model(case: dict) -> nn.Module:
    """A fresh copy of the case's model (built once): a hook a wrong answer leaves behind stays on its copy."""
    return copy.deepcopy(_cached_model(case["layers"], case["heads"], case["d_model"], case["seed"]))


def hook_count(model: nn.Module) -> int:
    """Forward and pre-forward hooks registered on any module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------- references (the library)
def reference_logit_diff(logits: torch.Tensor, answer_ids: torch.Tensor, wrong_ids: torch.Tensor) -> torch.Tensor:
    return logit_diff(answer_ids, wrong_ids)(logits)


def reference_head_outputs(model: nn.Module, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    n_layers = model.config.n_layer
    _, cache = run_with_cache(model, input_ids, names_filter=[act_name("z", layer) for layer in range(n_layers)])
    return {layer: cache["z", layer] for layer in range(n_layers)}


def reference_patch_head(model, clean_ids, corrupt_ids, layer: int, head: int, pos: int) -> torch.Tensor:
    with torch.no_grad():
        clean_z = reference_head_outputs(model, clean_ids)[layer]

        def hook(value, _point):
            value = value.clone()
            value[:, pos, head] = clean_z[:, pos, head]
            return value

        return run_with_hooks(model, corrupt_ids, fwd_hooks=[(act_name("z", layer), hook)])


def reference_patching_sweep(model, clean_ids, corrupt_ids, metric) -> torch.Tensor:
    return activation_patching(model, clean_ids, corrupt_ids, metric, "z").effect


def reference_cross_model_patch(base, ft, input_ids, heads) -> torch.Tensor:
    with torch.no_grad():
        ft_z = reference_head_outputs(ft, input_ids)
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)

        def swap(layer):
            def hook(value, _point):
                value = value.clone()
                value[:, :, by_layer[layer]] = ft_z[layer][:, :, by_layer[layer]]
                return value

            return hook

        return run_with_hooks(base, input_ids, fwd_hooks=[(act_name("z", layer), swap(layer)) for layer in by_layer])


# ---------------------------------------------------------------------- helpers of the checks
def _no_hooks_left(check, case, model, before: int, fn_name: str) -> None:
    check.require(hook_count(model) == before, case,
                  f"{fn_name} left {hook_count(model) - before} hook(s) registered on the model.",
                  "keep each handle from register_forward_pre_hook and call handle.remove() in a finally block.")


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-3)


# ---------------------------------------------------------------------- checks
def check_logit_diff(logit_diff_fn=None) -> None:
    """``logit_diff(logits, answer_ids, wrong_ids)``: ``[batch, pos, vocab] -> [batch]``, answer minus wrong
    logit at the last position, one value per example."""
    fn = resolve(logit_diff_fn, reference_logit_diff, "check_logit_diff", "function", ["logits", "answer_ids", "wrong_ids"])
    cases = [{"seed": s, "batch": b, "pos": p, "vocab": v} for s, (b, p, v) in enumerate([(4, 5, 11), (1, 3, 7), (6, 9, 30), (3, 1, 5)])]
    with running("check_logit_diff") as check:
        for case in check.cases(cases):
            g = seeded(case["seed"])
            logits = torch.randn(case["batch"], case["pos"], case["vocab"], generator=g) * 3
            answer = torch.randint(0, case["vocab"], (case["batch"],), generator=g)
            wrong = (answer + torch.randint(1, case["vocab"], (case["batch"],), generator=g)) % case["vocab"]
            expected = reference_logit_diff(logits, answer, wrong)
            got = fn(logits.clone(), answer.clone(), wrong.clone())
            check.require(isinstance(got, torch.Tensor), case, f"logit_diff must return a tensor. Got {type(got).__name__}.")
            rows = torch.arange(case["batch"])
            check.compare("logit difference", expected, got, case, hints=[
                lambda e, o, c: "return one value per example (shape [batch]); do not average over the batch."
                if o.numel() == 1 and c["batch"] > 1 else None,
                lambda e, o, c: "index each example with its own answer: logits[torch.arange(batch), -1, answer_ids]."
                if o.shape == (c["batch"], c["batch"]) else None,
                lambda e, o, c: "it is the answer's logit minus the wrong token's, not the other way round." if _close(o, -e) else None,
                lambda e, o, c: "read the logits at the last position (-1), where the model predicts the answer."
                if _close(o, logits[rows, 0, answer] - logits[rows, 0, wrong]) else None,
                lambda e, o, c: "use raw logits (or log-probabilities), not probabilities."
                if _close(o, logits[:, -1].softmax(-1)[rows, answer] - logits[:, -1].softmax(-1)[rows, wrong]) else None,
            ])


def check_head_outputs(head_outputs=None) -> None:
    """``head_outputs(model, input_ids)``: ``{layer: z}`` with ``z`` of shape ``[batch, pos, head, d_head]``, the
    per-head input of each layer's output projection (``attn.c_proj``), read with hooks that are removed after."""
    fn = resolve(head_outputs, reference_head_outputs, "check_head_outputs", "function", ["model", "input_ids"])
    with running("check_head_outputs") as check:
        for case in check.cases(_model_cases()):
            model = _model(case)
            clean, _, _, _ = _pair(case)
            expected = reference_head_outputs(model, clean)
            before = hook_count(model)
            got = fn(model, clean)
            _no_hooks_left(check, case, model, before, "head_outputs")
            check.require(isinstance(got, dict) and sorted(got) == list(range(case["layers"])), case,
                          f"head_outputs must return a dict with one entry per layer, keys {list(range(case['layers']))}. "
                          f"Got {sorted(got) if isinstance(got, dict) else type(got).__name__}.")
            d_head = case["d_model"] // case["heads"]
            for layer in range(case["layers"]):
                e, o = expected[layer], got[layer]
                out_proj = model.transformer.h[layer].attn.c_proj
                check.compare(f"z of layer {layer}", e, o, case, hints=[
                    lambda e, o, c: f"split the last axis into (head, d_head) = ({c['heads']}, {d_head}): "
                    "einops.rearrange(z, 'b p (h d) -> b p h d', h=n_heads)."
                    if o.shape[:2] == e.shape[:2] and o.numel() == e.numel() and o.shape != e.shape else None,
                    lambda e, o, c: "heads are contiguous blocks of d_head features: split '(h d)', not '(d h)'."
                    if o.shape == e.shape and _close(o, e.flatten(2).reshape(o.shape[0], o.shape[1], d_head, c["heads"]).transpose(2, 3)) else None,
                    lambda e, o, c, out_proj=out_proj: "read the *input* of c_proj (a forward pre-hook), not its output."
                    if o.shape == e.shape and _close(o.flatten(2), out_proj(e.flatten(2))) else None,
                ])


def check_patch_head(patch_head=None) -> None:
    """``patch_head(model, clean_ids, corrupt_ids, layer, head, pos)``: logits ``[batch, pos, vocab]`` of the
    corrupted run with one head's output at one position replaced by its value on the clean run."""
    fn = resolve(patch_head, reference_patch_head, "check_patch_head", "function",
                 ["model", "clean_ids", "corrupt_ids", "layer", "head", "pos"])
    with running("check_patch_head") as check:
        for case in check.cases(_model_cases()):
            model = _model(case)
            clean, corrupt, _, _ = _pair(case)
            g = seeded(case["seed"])
            # patch after the corrupted position, where the clean and corrupted runs differ
            where = {"layer": case["layers"] - 1, "head": int(torch.randint(0, case["heads"], (1,), generator=g)), "pos": case["pos"] - 1}
            shown = {**case, **where}
            with torch.no_grad():
                expected = reference_patch_head(model, clean, corrupt, **where)
                corrupt_logits = model(corrupt).logits
                clean_logits = model(clean).logits
                z_clean = reference_head_outputs(model, clean)[where["layer"]]
                all_heads = run_with_hooks(model, corrupt, fwd_hooks=[(act_name("z", where["layer"]), lambda v, _p: torch.cat(
                    [v[:, : where["pos"]], z_clean[:, where["pos"] : where["pos"] + 1], v[:, where["pos"] + 1 :]], dim=1))])
                all_pos = run_with_hooks(model, corrupt, fwd_hooks=[(act_name("z", where["layer"]), lambda v, _p: torch.where(
                    (torch.arange(case["heads"]) == where["head"])[None, None, :, None], z_clean, v))])
                z_corrupt = reference_head_outputs(model, corrupt)[where["layer"]]
                reversed_ = run_with_hooks(model, clean, fwd_hooks=[(act_name("z", where["layer"]), lambda v, _p: torch.where(
                    ((torch.arange(case["pos"]) == where["pos"])[:, None] & (torch.arange(case["heads"]) == where["head"])[None, :])[None, :, :, None],
                    z_corrupt, v))])
            before = hook_count(model)
            got = fn(model, clean.clone(), corrupt.clone(), where["layer"], where["head"], where["pos"])
            _no_hooks_left(check, shown, model, before, "patch_head")
            check.require(isinstance(got, torch.Tensor), shown, f"patch_head must return the logits tensor. Got {type(got).__name__}.",
                          "return model(corrupt_ids).logits computed while the patching hook is registered.")
            check.compare("patched logits", expected, got, shown, hints=[
                lambda e, o, c: "nothing changed: the logits are those of the corrupted run. Does your hook return the modified input "
                "as a tuple (args), and is it registered before the forward pass?" if _close(o, corrupt_logits) else None,
                lambda e, o, c: "you returned the clean run's logits: run the corrupted input and patch only one head in."
                if _close(o, clean_logits) else None,
                lambda e, o, c: "run the corrupted input and patch the clean activation in (you patched corrupt into clean)."
                if _close(o, reversed_) else None,
                lambda e, o, c: "patch only the given head: you replaced every head of the layer at that position." if _close(o, all_heads) else None,
                lambda e, o, c: "patch only position pos: you replaced the head at every position." if _close(o, all_pos) else None,
            ])


def check_patching_sweep(patching_sweep=None) -> None:
    """``patching_sweep(model, clean_ids, corrupt_ids, metric)``: ``[layer, pos, head]`` normalised effects
    ``(metric_patched - metric_corrupt) / (metric_clean - metric_corrupt)``, metrics averaged over the batch;
    compared with :func:`ftanalysis.probes.activation_patching`."""
    fn = resolve(patching_sweep, reference_patching_sweep, "check_patching_sweep", "function",
                 ["model", "clean_ids", "corrupt_ids", "metric"])
    with running("check_patching_sweep") as check:
        for case in check.cases(_model_cases()):
            model = _model(case)
            clean, corrupt, answer, wrong = _pair(case)
            metric = logit_diff(answer, wrong)
            result = activation_patching(model, clean, corrupt, metric, "z")
            expected = result.effect
            gap = result.clean_metric - result.corrupt_metric
            before = hook_count(model)
            got = fn(model, clean.clone(), corrupt.clone(), metric)
            _no_hooks_left(check, case, model, before, "patching_sweep")
            check.require(isinstance(got, torch.Tensor), case, f"patching_sweep must return a tensor. Got {type(got).__name__}.")
            check.compare("normalised effects [layer, pos, head]", expected, got, case, atol=1e-4, rtol=1e-3, hints=[
                lambda e, o, c: "the axes are [layer, pos, head]; yours look like [layer, head, pos]."
                if o.shape == (e.shape[0], e.shape[2], e.shape[1]) and e.shape[1] != e.shape[2] else None,
                lambda e, o, c: "normalise: divide (patched - corrupt) by (clean - corrupt)." if _close(o, e * gap) else None,
                lambda e, o, c: "subtract the corrupted run's metric, not the clean one: effect = (patched - corrupt) / (clean - corrupt)."
                if _close(o, e - 1) else None,
                lambda e, o, c: "the denominator is clean - corrupt (so that restoring everything gives +1)." if _close(o, -e) else None,
                lambda e, o, c: "you report the patched metric itself; subtract the corrupted metric and normalise."
                if _close(o, result.patched) else None,
            ])


def check_cross_model_patch(cross_model_patch=None) -> None:
    """``cross_model_patch(base, ft, input_ids, heads)``: logits of ``base`` on ``input_ids`` with the outputs of
    the listed ``(layer, head)`` pairs (at every position) taken from ``ft`` on the same input."""
    fn = resolve(cross_model_patch, reference_cross_model_patch, "check_cross_model_patch", "function",
                 ["base", "ft", "input_ids", "heads"])
    with running("check_cross_model_patch") as check:
        for case in check.cases(_model_cases()):
            base = _model(case)
            ft = perturbed_copy(base, seed=case["seed"])
            ids, _, _, _ = _pair(case)
            g = seeded(50 + case["seed"])
            pool = [(layer, head) for layer in range(case["layers"]) for head in range(case["heads"])]
            pick = torch.randperm(len(pool), generator=g)[: max(1, len(pool) // 3)].tolist()
            heads = sorted(pool[i] for i in pick)
            shown = {**case, "heads_patched": heads}
            with torch.no_grad():
                expected = reference_cross_model_patch(base, ft, ids, heads)
                base_logits, ft_logits = base(ids).logits, ft(ids).logits
                reversed_ = reference_cross_model_patch(ft, base, ids, heads)
                layers = sorted({layer for layer, _ in heads})
                whole_layers = reference_cross_model_patch(base, ft, ids, [(ly, h) for ly in layers for h in range(case["heads"])])
            before = (hook_count(base), hook_count(ft))
            got = fn(base, ft, ids.clone(), heads)
            check.require((hook_count(base), hook_count(ft)) == before, shown, "cross_model_patch left hooks registered on a model.",
                          "remove every handle in a finally block.")
            check.require(isinstance(got, torch.Tensor), shown, f"cross_model_patch must return the logits tensor. Got {type(got).__name__}.")
            check.compare("patched base logits", expected, got, shown, hints=[
                lambda e, o, c: "nothing was patched: these are the base model's own logits." if _close(o, base_logits) else None,
                lambda e, o, c: "these are the fine-tuned model's logits: run the base and take only the listed heads from ft."
                if _close(o, ft_logits) else None,
                lambda e, o, c: "wrong direction: run the base model and patch the fine-tuned heads in (you ran ft with base heads)."
                if _close(o, reversed_) else None,
                lambda e, o, c: "replace only the listed heads, not every head of their layers." if _close(o, whole_layers) else None,
            ])

"""Checks for lab 07, the IOI circuit in a real LM: direct logit attribution, head patching, path patching.

The expected values come from :mod:`ftanalysis.probes.circuits` (:func:`direct_logit_attribution`,
:func:`activation_patching`, :func:`path_patching`), never from the student's output. The cases are small seeded
models of both families the lab's functions must handle: GPT-2 (``Conv1D`` output projection, LayerNorm with a
bias) and Llama (RMSNorm, grouped-query attention). Their weights are large (``initializer_range=0.3``) and their
norms' weights and biases are random, so that a forgotten scale, centring or norm weight moves the result by far
more than the tolerance (with the default initialisation the norm weight is all ones and its bias zero, and such
mistakes would pass). Every check also verifies that no hook is left on the model.

The logit-difference exercise is lab 03's (:func:`~ftanalysis.labs.checks.patching.check_logit_diff`).
"""

from __future__ import annotations

import copy
from functools import lru_cache

import einops
import torch
from torch import nn

from ...nn.view import ModelView
from ...probes.circuits import (
    activation_patching,
    direct_logit_attribution,
    logit_diff,
    path_patching,
    run_with_cache,
    run_with_hooks,
)
from ...probes.circuits.dla import final_norm, norm_parameters, norm_scale
from ._core import resolve, running, seeded
from .patching import _pair, check_logit_diff, hook_count, tiny_gpt2

__all__ = ["check_head_dla", "check_head_patching", "check_logit_diff", "check_path_patch_to_logits"]

_VOCAB = 40
# (family, n_layer, n_head, n_kv_head, d_model, batch, pos, corrupted positions)
_CASES = [
    ("gpt2", 2, 4, 4, 32, 3, 6, [2]),
    ("llama", 2, 4, 2, 32, 2, 5, [1, 3]),
    ("gpt2", 3, 2, 2, 16, 4, 7, [4]),
    ("llama", 1, 8, 4, 32, 3, 6, [2]),
]


# ---------------------------------------------------------------------- models and inputs
def tiny_llama(n_layer: int = 2, n_head: int = 4, n_kv_head: int = 2, d_model: int = 32, seed: int = 0) -> nn.Module:
    """A seeded random Llama LM with grouped-query attention (eval mode) and large weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=_VOCAB,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=32,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give every LayerNorm / RMSNorm a random positive weight (and LayerNorm a random bias), in place."""
    g = seeded(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or hasattr(module, "variance_epsilon"):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return model


def _cases():
    for seed, (family, n_layer, n_head, n_kv, d_model, batch, pos, corrupt_at) in enumerate(_CASES):
        yield {
            "seed": seed,
            "family": family,
            "layers": n_layer,
            "heads": n_head,
            "kv_heads": n_kv,
            "d_model": d_model,
            "batch": batch,
            "pos": pos,
            "corrupt_at": corrupt_at,
        }


@lru_cache(maxsize=None)
def _cached_model(family: str, n_layer: int, n_head: int, n_kv: int, d_model: int, seed: int) -> nn.Module:
    if family == "gpt2":
        model = tiny_gpt2(n_layer, n_head, d_model, seed=seed)
    else:
        model = tiny_llama(n_layer, n_head, n_kv, d_model, seed=seed)
    return randomise_norms(model, seed)


def model_for(case: dict) -> nn.Module:
    """A fresh copy of the case's model (built once): a hook a wrong answer leaves behind stays on its copy."""
    return copy.deepcopy(
        _cached_model(case["family"], case["layers"], case["heads"], case["kv_heads"], case["d_model"], case["seed"])
    )


def inputs_for(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean ids, corrupted ids (clean with the case's positions changed), answer and wrong token ids."""
    return _pair(case, seed_offset=2000)


# ---------------------------------------------------------------------- references (the library)
def reference_head_dla(model, input_ids, answer_ids, wrong_ids) -> torch.Tensor:
    return direct_logit_attribution(model, input_ids, answer_ids, wrong_ids)


def reference_head_patching(model, clean_ids, corrupt_ids, metric, layers) -> torch.Tensor:
    return activation_patching(
        model, clean_ids, corrupt_ids, metric, "z", layers=list(layers), per_position=False
    ).effect


def reference_path_patch_to_logits(model, clean_ids, corrupt_ids, metric) -> torch.Tensor:
    # path_patching runs its first input and gives the sender its second input's output; so the corrupted run
    # with the sender's clean output is path_patching(corrupt, clean), normalised by (m(corrupt) - m(clean)):
    # the sign flips to this exercise's (patched - corrupt) / (clean - corrupt)
    result = path_patching(model, corrupt_ids, clean_ids, metric, receiver_input="logits", freeze_mlps=True)
    return -result.effect


# ---------------------------------------------------------------------- variants (for hints only)
def dla_variant(
    model, input_ids, answer_ids, wrong_ids, *, scale=True, centre=True, weight=True, position=-1, split="(head d_head)"
) -> torch.Tensor:
    """Per-example DLA ``[batch, layer, head]`` with one ingredient changed (to recognise a student's mistake)."""
    view = ModelView(model)
    centred, eps, w, _ = norm_parameters(final_norm(view))
    last = view.n_layers - 1
    names = [f"layers.{layer}.attn.hook_z" for layer in range(view.n_layers)] + [f"layers.{last}.hook_resid_post"]
    with torch.no_grad():
        _, cache = run_with_cache(model, input_ids, names_filter=names)
    x = cache["resid_post", last][:, position]
    w_u = model.get_output_embeddings().weight
    direction = (w_u[answer_ids] - w_u[wrong_ids]).float()
    if weight:
        direction = direction * w.float()
    if scale:
        direction = direction / norm_scale(x, centred, eps)[:, None]
    if centred and centre:
        direction = direction - direction.mean(-1, keepdim=True)
    rows = []
    for layer in range(view.n_layers):
        w_o = einops.rearrange(view.get(f"layers.{layer}.attn.o"), f"m {split} -> head d_head m", d_head=view.d_head)
        rows.append(einops.einsum(cache["z", layer][:, position], w_o, direction, "b head d, head d m, b m -> b head"))
    return torch.stack(rows, dim=1)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=1e-3)


def _no_hooks_left(check, case, model, before: int, fn_name: str) -> None:
    check.require(
        hook_count(model) == before,
        case,
        f"{fn_name} left {hook_count(model) - before} hook(s) registered on the model.",
        "use run_with_cache / run_with_hooks (they remove their hooks), or remove your handles in a finally block.",
    )


def _metrics(model, clean, corrupt, metric) -> tuple[float, float]:
    with torch.no_grad():
        return float(metric(model(clean).logits).mean()), float(metric(model(corrupt).logits).mean())


# ---------------------------------------------------------------------- checks
def check_head_dla(head_dla=None) -> None:
    """``head_dla(model, input_ids, answer_ids, wrong_ids)``: ``[layer, head]``, the mean over the batch of each
    head's direct contribution to ``logit(answer) - logit(wrong)`` at the last position (final norm's scale frozen);
    compared with :func:`ftanalysis.probes.circuits.direct_logit_attribution` on GPT-2 and Llama models."""
    fn = resolve(
        head_dla, reference_head_dla, "check_head_dla", "function", ["model", "input_ids", "answer_ids", "wrong_ids"]
    )
    with running("check_head_dla") as check:
        for case in check.cases(_cases()):
            model = model_for(case)
            ids, _, answer, wrong = inputs_for(case)
            expected = reference_head_dla(model, ids, answer, wrong)
            args = (model, ids, answer, wrong)
            variants = {
                "no_scale": dla_variant(*args, scale=False).mean(0),
                "no_centre": dla_variant(*args, centre=False).mean(0),
                "no_weight": dla_variant(*args, weight=False).mean(0),
                "first": dla_variant(*args, position=0).mean(0),
                "split": dla_variant(*args, split="(d_head head)").mean(0),
                "per_example": dla_variant(*args),
            }
            before = hook_count(model)
            got = fn(model, ids.clone(), answer.clone(), wrong.clone())
            _no_hooks_left(check, case, model, before, "head_dla")
            check.require(
                isinstance(got, torch.Tensor), case, f"head_dla must return a tensor. Got {type(got).__name__}."
            )
            check.compare(
                "DLA [layer, head]",
                expected,
                got,
                case,
                atol=1e-4,
                rtol=1e-3,
                hints=[
                    lambda e, o, c: (
                        "average over the batch: return [layer, head], not one map per prompt."
                        if _close(o, variants["per_example"])
                        else None
                    ),
                    lambda e, o, c: (
                        "divide by the final norm's scale s (sqrt(var(x) + eps) for LayerNorm, sqrt(mean(x^2) + eps) "
                        "for RMSNorm, x the final residual stream at the last position)."
                        if _close(o, variants["no_scale"])
                        else None
                    ),
                    lambda e, o, c: (
                        "LayerNorm subtracts the mean before scaling: centre the head's output (or the direction) "
                        "over d_model."
                        if c["family"] == "gpt2" and _close(o, variants["no_centre"])
                        else None
                    ),
                    lambda e, o, c: (
                        "multiply by the final norm's weight (norm.weight): it scales each d_model direction."
                        if _close(o, variants["no_weight"])
                        else None
                    ),
                    lambda e, o, c: (
                        "it is logit(answer) - logit(wrong), not the other way round." if _close(o, -e) else None
                    ),
                    lambda e, o, c: (
                        "read z and the residual stream at the last position (-1), where the answer is predicted."
                        if _close(o, variants["first"])
                        else None
                    ),
                    lambda e, o, c: (
                        "head h owns the d_head consecutive input columns h*d_head:(h+1)*d_head of W_O: split "
                        "'(head d_head)', not '(d_head head)'."
                        if _close(o, variants["split"])
                        else None
                    ),
                ],
            )


def check_head_patching(head_patching=None) -> None:
    """``head_patching(model, clean_ids, corrupt_ids, metric, layers)``: ``[len(layers), head]`` normalised effects
    ``(m(corrupt with head h clean) - m(corrupt)) / (m(clean) - m(corrupt))``, each head patched at every position;
    compared with :func:`ftanalysis.probes.activation_patching` (``per_position=False``)."""
    fn = resolve(
        head_patching,
        reference_head_patching,
        "check_head_patching",
        "function",
        ["model", "clean_ids", "corrupt_ids", "metric", "layers"],
    )
    with running("check_head_patching") as check:
        for case in check.cases(_cases()):
            model = model_for(case)
            clean, corrupt, answer, wrong = inputs_for(case)
            metric = logit_diff(answer, wrong)
            layers = list(range(case["layers"]))[-2:]  # the last two layers (or the only one)
            shown = {**case, "layers_swept": layers}
            result = activation_patching(model, clean, corrupt, metric, "z", layers=layers, per_position=False)
            expected, gap = result.effect, result.clean_metric - result.corrupt_metric
            every = activation_patching(model, clean, corrupt, metric, "z", per_position=False).effect
            reverse = activation_patching(model, corrupt, clean, metric, "z", layers=layers, per_position=False)
            # the reversed run (clean input, corrupt head) normalised the way the exercise asks
            reversed_ = (reverse.patched - result.corrupt_metric) / gap
            whole_layer = einops.repeat(
                _layer_effect(model, clean, corrupt, metric, layers), "l -> l h", h=case["heads"]
            )
            before = hook_count(model)
            got = fn(model, clean.clone(), corrupt.clone(), metric, list(layers))
            _no_hooks_left(check, shown, model, before, "head_patching")
            check.require(
                isinstance(got, torch.Tensor), shown, f"head_patching must return a tensor. Got {type(got).__name__}."
            )
            check.compare(
                "normalised effects [layer, head]",
                expected,
                got,
                shown,
                atol=1e-4,
                rtol=1e-3,
                hints=[
                    lambda e, o, c: (
                        "return one row per layer in 'layers' (in that order), not every layer of the model."
                        if o.shape == every.shape and o.shape != e.shape
                        else None
                    ),
                    lambda e, o, c: (
                        "the axes are [layer, head]; yours look like [head, layer]."
                        if o.shape == e.shape[::-1]
                        else None
                    ),
                    lambda e, o, c: (
                        "normalise: divide (patched - corrupt) by (clean - corrupt)." if _close(o, e * gap) else None
                    ),
                    lambda e, o, c: (
                        "subtract the corrupted run's metric: effect = (patched - corrupt) / (clean - corrupt)."
                        if _close(o, e - 1)
                        else None
                    ),
                    lambda e, o, c: (
                        "the denominator is clean - corrupt (restoring everything gives +1)." if _close(o, -e) else None
                    ),
                    lambda e, o, c: (
                        "you report the patched metric itself; subtract the corrupted metric and normalise."
                        if _close(o, result.patched)
                        else None
                    ),
                    lambda e, o, c: (
                        "wrong direction: run the *corrupted* input and patch the head's *clean* output in."
                        if _close(o, reversed_)
                        else None
                    ),
                    lambda e, o, c: (
                        "patch only head h in copy h: you restored every head of the layer at once."
                        if _close(o, whole_layer)
                        else None
                    ),
                ],
            )


def _layer_effect(model, clean, corrupt, metric, layers) -> torch.Tensor:
    """Normalised effect of patching every head of a layer at every position at once: ``[len(layers)]``."""
    with torch.no_grad():
        _, cache = run_with_cache(model, clean, names_filter=[f"layers.{layer}.attn.hook_z" for layer in layers])
        m_clean, m_corrupt = _metrics(model, clean, corrupt, metric)
        out = []
        for layer in layers:
            z = cache["z", layer]
            logits = run_with_hooks(model, corrupt, fwd_hooks=[(f"layers.{layer}.attn.hook_z", lambda v, _p, z=z: z)])
            out.append((float(metric(logits).mean()) - m_corrupt) / (m_clean - m_corrupt))
    return torch.tensor(out)


def check_path_patch_to_logits(path_patch_to_logits=None) -> None:
    """``path_patch_to_logits(model, clean_ids, corrupt_ids, metric)``: ``[layer, head]`` normalised effects of each
    head's clean output on the corrupted run through its direct path to the logits only (every other head and every
    MLP frozen, the final norm recomputed); compared with :func:`ftanalysis.probes.path_patching`
    (``receiver_input="logits"``, ``freeze_mlps=True``, inputs swapped: see the module)."""
    fn = resolve(
        path_patch_to_logits,
        reference_path_patch_to_logits,
        "check_path_patch_to_logits",
        "function",
        ["model", "clean_ids", "corrupt_ids", "metric"],
    )
    with running("check_path_patch_to_logits") as check:
        for case in check.cases(_cases()):
            model = model_for(case)
            clean, corrupt, answer, wrong = inputs_for(case)
            metric = logit_diff(answer, wrong)
            expected = reference_path_patch_to_logits(model, clean, corrupt, metric)
            m_clean, m_corrupt = _metrics(model, clean, corrupt, metric)
            gap = m_clean - m_corrupt
            frozen = _frozen_scale_effect(model, clean, corrupt, answer, wrong) / gap
            ap = activation_patching(model, clean, corrupt, metric, "z", per_position=False).effect
            reverse = path_patching(
                model, clean, corrupt, metric, receiver_input="logits", freeze_mlps=True, normalize=False
            )
            reversed_ = (reverse.patched - m_corrupt) / gap  # clean run with one corrupted head, normalised as asked
            before = hook_count(model)
            got = fn(model, clean.clone(), corrupt.clone(), metric)
            _no_hooks_left(check, case, model, before, "path_patch_to_logits")
            check.require(
                isinstance(got, torch.Tensor),
                case,
                f"path_patch_to_logits must return a tensor. Got {type(got).__name__}.",
            )
            check.compare(
                "normalised path effects [layer, head]",
                expected,
                got,
                case,
                atol=1e-4,
                rtol=1e-3,
                hints=[
                    lambda e, o, c: (
                        "recompute the final norm on the patched residual stream: with the corrupted run's scale "
                        "frozen you computed DLA of the difference, a linear approximation."
                        if _close(o, frozen)
                        else None
                    ),
                    lambda e, o, c: (
                        "this is activation patching (everything downstream recomputed): for the direct path, freeze "
                        "every other head and the MLPs, i.e. add only the head's output difference to the final "
                        "residual stream."
                        if _close(o, ap)
                        else None
                    ),
                    lambda e, o, c: (
                        "normalise: divide (patched - corrupt) by (clean - corrupt)." if _close(o, e * gap) else None
                    ),
                    lambda e, o, c: (
                        "the denominator is clean - corrupt (and the baseline the corrupted run)."
                        if _close(o, -e)
                        else None
                    ),
                    lambda e, o, c: (
                        "wrong direction: start from the *corrupted* run and bring in the head's *clean* output."
                        if _close(o, reversed_)
                        else None
                    ),
                ],
            )


def _frozen_scale_effect(model, clean, corrupt, answer, wrong) -> torch.Tensor:
    """``[layer, head]``: the head's output difference (clean - corrupt) through the corrupted run's frozen final
    norm, projected on the unembedding difference (DLA of the patched difference), unnormalised."""
    view = ModelView(model)
    centred, eps, w, b = norm_parameters(final_norm(view))
    last = view.n_layers - 1
    names = [f"layers.{layer}.attn.hook_z" for layer in range(view.n_layers)] + [f"layers.{last}.hook_resid_post"]
    with torch.no_grad():
        _, c_cache = run_with_cache(model, clean, names_filter=names)
        _, x_cache = run_with_cache(model, corrupt, names_filter=names)
    x = x_cache["resid_post", last][:, -1]
    w_u = model.get_output_embeddings().weight
    direction = (w_u[answer] - w_u[wrong]) * w / norm_scale(x, centred, eps)[:, None]
    if centred:
        direction = direction - direction.mean(-1, keepdim=True)
    rows = []
    for layer in range(view.n_layers):
        w_o = einops.rearrange(view.get(f"layers.{layer}.attn.o"), "m (head d) -> head d m", d=view.d_head)
        dz = c_cache["z", layer][:, -1] - x_cache["z", layer][:, -1]
        rows.append(einops.einsum(dz, w_o, direction, "b head d, head d m, b m -> head") / dz.shape[0])
    return torch.stack(rows)

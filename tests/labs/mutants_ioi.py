"""Known-wrong versions of lab 07's exercises: each check must fail on them, with the hint in its message.

Written the way a student would (hooks through ``run_with_cache`` / ``run_with_hooks``, weights through
``ModelView``), independently of the library's implementations.
"""

import einops
import torch

import ftanalysis as fta
from ftanalysis.probes.circuits import run_with_cache, run_with_hooks

from . import mutants_patching


def _final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def _z_and_resid(model, ids):
    view = fta.nn.ModelView(model)
    last = view.n_layers - 1
    names = [f"layers.{layer}.attn.hook_z" for layer in range(view.n_layers)] + [f"layers.{last}.hook_resid_post"]
    with torch.no_grad():
        logits, cache = run_with_cache(model, ids, names_filter=names)
    z = [cache[f"layers.{layer}.attn.hook_z"] for layer in range(view.n_layers)]
    return view, logits, z, cache[f"layers.{last}.hook_resid_post"]


def _w_o(view, layer, split="(h d)"):
    return einops.rearrange(view.get(f"layers.{layer}.attn.o"), f"m {split} -> h d m", d=view.d_head)


def _direction(model, x, answer_ids, wrong_ids, scale=True, centre=True, weight=True):
    """(W_U[answer] - W_U[wrong]) through the final norm with the scale of ``x [batch, d_model]`` frozen."""
    norm = _final_norm(model)
    layernorm = isinstance(norm, torch.nn.LayerNorm)
    eps = norm.eps if layernorm else norm.variance_epsilon
    xc = x - x.mean(-1, keepdim=True) if layernorm else x
    s = (xc.pow(2).mean(-1) + eps).sqrt()
    w_u = model.get_output_embeddings().weight
    direction = w_u[answer_ids] - w_u[wrong_ids]
    if weight:
        direction = direction * norm.weight
    if scale:
        direction = direction / s[:, None]
    if layernorm and centre:
        direction = direction - direction.mean(-1, keepdim=True)
    return direction


# ---------------------------------------------------------------------- head_dla
def _dla(model, input_ids, answer_ids, wrong_ids, pos=-1, split="(h d)", mean=True, sign=1.0, **flags):
    view, _, z, resid = _z_and_resid(model, input_ids)
    direction = sign * _direction(model, resid[:, pos], answer_ids, wrong_ids, **flags)
    out = torch.stack(
        [
            einops.einsum(z[layer][:, pos], _w_o(view, layer, split), direction, "b h d, h d m, b m -> b h")
            for layer in range(view.n_layers)
        ],
        dim=1,
    )  # [batch, layer, head]
    return out.mean(0) if mean else out


def dla_no_scale(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, scale=False)


def dla_no_centring(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, centre=False)


def dla_no_norm_weight(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, weight=False)


def dla_swapped(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, sign=-1.0)


def dla_first_position(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, pos=0)


def dla_wrong_head_split(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, split="(d h)")


def dla_per_prompt(model, input_ids, answer_ids, wrong_ids):
    return _dla(model, input_ids, answer_ids, wrong_ids, mean=False)


def dla_stub(model, input_ids, answer_ids, wrong_ids):
    raise NotImplementedError()


# ---------------------------------------------------------------------- head_patching
def _head_patching(
    model, clean_ids, corrupt_ids, metric, layers, mode="right", every_layer=False, all_heads=False, transpose=False
):
    view = fta.nn.ModelView(model)
    base, source = (clean_ids, corrupt_ids) if mode == "reversed" else (corrupt_ids, clean_ids)
    layers = list(range(view.n_layers)) if every_layer else list(layers)
    n, heads = base.shape[0], view.n_heads
    with torch.no_grad():
        _, cache = run_with_cache(model, source, names_filter=[f"layers.{layer}.attn.hook_z" for layer in layers])
        m_clean, m_corrupt = metric(model(clean_ids).logits).mean(), metric(model(corrupt_ids).logits).mean()
        out = torch.zeros(len(layers), heads)
        for i, layer in enumerate(layers):
            src = cache[f"layers.{layer}.attn.hook_z"]

            def patch(z, _point, src=src):
                z = einops.rearrange(z, "(c n) p h d -> c n p h d", c=heads).clone()
                for h in range(heads):
                    if all_heads:
                        z[h] = src
                    else:
                        z[h, :, :, h] = src[:, :, h]
                return einops.rearrange(z, "c n p h d -> (c n) p h d")

            logits = run_with_hooks(model, base.repeat(heads, 1), fwd_hooks=[(f"layers.{layer}.attn.hook_z", patch)])
            for h in range(heads):
                patched = metric(logits[h * n : (h + 1) * n]).mean()
                if mode == "raw":
                    out[i, h] = patched - m_corrupt
                elif mode == "clean_baseline":
                    out[i, h] = (patched - m_clean) / (m_clean - m_corrupt)
                elif mode == "patched":
                    out[i, h] = patched
                else:  # also "reversed": the right normalisation of the wrong run
                    out[i, h] = (patched - m_corrupt) / (m_clean - m_corrupt)
    return out.T if transpose else out


def patching_unnormalised(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, mode="raw")


def patching_reversed(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, mode="reversed")


def patching_clean_baseline(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, mode="clean_baseline")


def patching_patched_metric(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, mode="patched")


def patching_all_heads_of_layer(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, all_heads=True)


def patching_every_layer(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, every_layer=True)


def patching_head_layer_axes(model, clean_ids, corrupt_ids, metric, layers):
    return _head_patching(model, clean_ids, corrupt_ids, metric, layers, transpose=True)


def patching_stub(model, clean_ids, corrupt_ids, metric, layers):
    raise NotImplementedError()


# ---------------------------------------------------------------------- path_patch_to_logits
def _path(model, clean_ids, corrupt_ids, metric, mode="right"):
    base, source = (clean_ids, corrupt_ids) if mode == "reversed" else (corrupt_ids, clean_ids)
    view, base_logits, base_z, resid = _z_and_resid(model, base)
    _, source_logits, source_z, _ = _z_and_resid(model, source)
    m_base, m_source = metric(base_logits).mean(), metric(source_logits).mean()
    m_clean, m_corrupt = (m_base, m_source) if mode == "reversed" else (m_source, m_base)
    norm, unembed = _final_norm(model), model.get_output_embeddings()
    x = resid[:, -1]
    out = torch.zeros(view.n_layers, view.n_heads)
    with torch.no_grad():
        for layer in range(view.n_layers):
            dz = source_z[layer][:, -1] - base_z[layer][:, -1]  # [n, h, d]
            delta = einops.einsum(dz, _w_o(view, layer), "n h d, h d m -> h n m")
            if mode == "frozen":
                logits_diff = einops.einsum(
                    delta, _direction(model, x, metric.answer_ids, metric.wrong_ids), "h n m, n m -> h n"
                )
                for h in range(view.n_heads):
                    out[layer, h] = logits_diff[h].mean() / (m_clean - m_corrupt)
                continue
            logits = unembed(norm(x + delta))  # [h, n, vocab]
            for h in range(view.n_heads):
                patched = metric(logits[h][:, None]).mean()
                out[layer, h] = patched - m_corrupt if mode == "raw" else (patched - m_corrupt) / (m_clean - m_corrupt)
    return out


def path_frozen_scale(model, clean_ids, corrupt_ids, metric):
    return _path(model, clean_ids, corrupt_ids, metric, mode="frozen")


def path_unnormalised(model, clean_ids, corrupt_ids, metric):
    return _path(model, clean_ids, corrupt_ids, metric, mode="raw")


def path_reversed(model, clean_ids, corrupt_ids, metric):
    return _path(model, clean_ids, corrupt_ids, metric, mode="reversed")


def path_is_activation_patching(model, clean_ids, corrupt_ids, metric):
    """Every layer downstream recomputed: activation patching of each head at every position."""
    view = fta.nn.ModelView(model)
    return _head_patching(model, clean_ids, corrupt_ids, metric, list(range(view.n_layers)))


def path_stub(model, clean_ids, corrupt_ids, metric):
    raise NotImplementedError()


MUTANTS = {
    "check_logit_diff": mutants_patching.MUTANTS["check_logit_diff"],
    "check_head_dla": [
        (dla_no_scale, "final norm's scale"),
        (dla_no_centring, "LayerNorm subtracts the mean"),
        (dla_no_norm_weight, "final norm's weight"),
        (dla_swapped, "not the other way round"),
        (dla_first_position, "last position (-1)"),
        (dla_wrong_head_split, "'(head d_head)', not '(d_head head)'"),
        (dla_per_prompt, "average over the batch"),
    ],
    "check_head_patching": [
        (patching_unnormalised, "normalise"),
        (patching_reversed, "wrong direction"),
        (patching_clean_baseline, "subtract the corrupted run's metric"),
        (patching_patched_metric, "the patched metric itself"),
        (patching_all_heads_of_layer, "every head of the layer"),
        (patching_every_layer, "one row per layer in 'layers'"),
        (patching_head_layer_axes, "[head, layer]"),
    ],
    "check_path_patch_to_logits": [
        (path_frozen_scale, "recompute the final norm"),
        (path_unnormalised, "normalise"),
        (path_reversed, "wrong direction"),
        (path_is_activation_patching, "this is activation patching"),
    ],
}
STUBS = {
    "check_logit_diff": mutants_patching.STUBS["check_logit_diff"],
    "check_head_dla": dla_stub,
    "check_head_patching": patching_stub,
    "check_path_patch_to_logits": path_stub,
}

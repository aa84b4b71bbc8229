"""Known-wrong versions of lab 03's exercises: each check must fail on them, with the hint in its message."""

import einops
import torch


# ---------------------------------------------------------------------- logit_diff
def diff_first_position(logits, answer_ids, wrong_ids):
    rows = torch.arange(logits.shape[0])
    return logits[rows, 0, answer_ids] - logits[rows, 0, wrong_ids]


def diff_swapped(logits, answer_ids, wrong_ids):
    rows = torch.arange(logits.shape[0])
    return logits[rows, -1, wrong_ids] - logits[rows, -1, answer_ids]


def diff_mean(logits, answer_ids, wrong_ids):
    rows = torch.arange(logits.shape[0])
    return (logits[rows, -1, answer_ids] - logits[rows, -1, wrong_ids]).mean()


def diff_broadcast(logits, answer_ids, wrong_ids):
    return logits[:, -1, answer_ids] - logits[:, -1, wrong_ids]


def diff_probabilities(logits, answer_ids, wrong_ids):
    rows = torch.arange(logits.shape[0])
    probs = logits[:, -1].softmax(-1)
    return probs[rows, answer_ids] - probs[rows, wrong_ids]


def diff_stub(logits, answer_ids, wrong_ids):
    raise NotImplementedError()


# ---------------------------------------------------------------------- head_outputs
def _head_outputs(model, input_ids, pattern="b p (h d) -> b p h d", remove=True, read="input"):
    n_heads = model.config.n_head
    cache, handles = {}, []
    for layer, block in enumerate(model.transformer.h):
        def pre(module, args, layer=layer):
            if read == "input":
                cache[layer] = einops.rearrange(args[0].detach(), pattern, h=n_heads)

        def post(module, args, output, layer=layer):
            cache[layer] = einops.rearrange(output.detach(), pattern, h=n_heads)

        hook = block.attn.c_proj.register_forward_pre_hook(pre) if read == "input" else block.attn.c_proj.register_forward_hook(post)
        handles.append(hook)
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        if remove:
            for handle in handles:
                handle.remove()
    return cache


def outputs_wrong_split(model, input_ids):
    return _head_outputs(model, input_ids, pattern="b p (d h) -> b p h d")


def outputs_of_c_proj(model, input_ids):
    return _head_outputs(model, input_ids, read="output")


def outputs_hooks_left(model, input_ids):
    return _head_outputs(model, input_ids, remove=False)


def outputs_not_split(model, input_ids):
    return {layer: z.flatten(2) for layer, z in _head_outputs(model, input_ids).items()}


def outputs_stub(model, input_ids):
    raise NotImplementedError()


# ---------------------------------------------------------------------- patch_head
def _patch(model, source_ids, target_ids, layer, head, pos, all_heads=False, all_positions=False, remove=True):
    n_heads = model.config.n_head
    source_z = _head_outputs(model, source_ids)[layer]
    c_proj = model.transformer.h[layer].attn.c_proj

    def pre(module, args):
        z = einops.rearrange(args[0], "b p (h d) -> b p h d", h=n_heads).clone()
        p = slice(None) if all_positions else pos
        h = slice(None) if all_heads else head
        z[:, p, h] = source_z[:, p, h]
        return (einops.rearrange(z, "b p h d -> b p (h d)"),)

    handle = c_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model(target_ids).logits
    finally:
        if remove:
            handle.remove()


def patch_reversed(model, clean_ids, corrupt_ids, layer, head, pos):
    return _patch(model, corrupt_ids, clean_ids, layer, head, pos)


def patch_all_heads(model, clean_ids, corrupt_ids, layer, head, pos):
    return _patch(model, clean_ids, corrupt_ids, layer, head, pos, all_heads=True)


def patch_all_positions(model, clean_ids, corrupt_ids, layer, head, pos):
    return _patch(model, clean_ids, corrupt_ids, layer, head, pos, all_positions=True)


def patch_hook_left(model, clean_ids, corrupt_ids, layer, head, pos):
    return _patch(model, clean_ids, corrupt_ids, layer, head, pos, remove=False)


def patch_hook_returns_nothing(model, clean_ids, corrupt_ids, layer, head, pos):
    """Modifies a copy of the input inside the hook but never returns it: the model runs unpatched."""
    clean_z = _head_outputs(model, clean_ids)[layer]
    n_heads = model.config.n_head

    def pre(module, args):
        z = einops.rearrange(args[0], "b p (h d) -> b p h d", h=n_heads).clone()
        z[:, pos, head] = clean_z[:, pos, head]

    handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model(corrupt_ids).logits
    finally:
        handle.remove()


def patch_stub(model, clean_ids, corrupt_ids, layer, head, pos):
    raise NotImplementedError()


# ---------------------------------------------------------------------- patching_sweep
def _sweep(model, clean_ids, corrupt_ids, metric, mode="right"):
    cfg = model.config
    n_pos = clean_ids.shape[1]
    with torch.no_grad():
        clean_m = metric(model(clean_ids).logits).mean()
        corrupt_m = metric(model(corrupt_ids).logits).mean()
    out = torch.zeros(cfg.n_layer, n_pos, cfg.n_head)
    for layer in range(cfg.n_layer):
        for pos in range(n_pos):
            for head in range(cfg.n_head):
                patched = metric(_patch(model, clean_ids, corrupt_ids, layer, head, pos)).mean()
                if mode == "raw":
                    out[layer, pos, head] = patched - corrupt_m
                elif mode == "clean_baseline":
                    out[layer, pos, head] = (patched - clean_m) / (clean_m - corrupt_m)
                elif mode == "patched":
                    out[layer, pos, head] = patched
                else:
                    out[layer, pos, head] = (patched - corrupt_m) / (clean_m - corrupt_m)
    return out.transpose(1, 2) if mode == "axes" else out


def sweep_unnormalised(model, clean_ids, corrupt_ids, metric):
    return _sweep(model, clean_ids, corrupt_ids, metric, "raw")


def sweep_clean_baseline(model, clean_ids, corrupt_ids, metric):
    return _sweep(model, clean_ids, corrupt_ids, metric, "clean_baseline")


def sweep_head_pos_axes(model, clean_ids, corrupt_ids, metric):
    return _sweep(model, clean_ids, corrupt_ids, metric, "axes")


def sweep_patched_metric(model, clean_ids, corrupt_ids, metric):
    return _sweep(model, clean_ids, corrupt_ids, metric, "patched")


def sweep_stub(model, clean_ids, corrupt_ids, metric):
    raise NotImplementedError()


# ---------------------------------------------------------------------- cross_model_patch
def _cmap(base, ft, input_ids, heads, whole_layers=False):
    n_heads = base.config.n_head
    ft_z = _head_outputs(ft, input_ids)
    by_layer = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    handles = []
    for layer, hs in by_layer.items():
        def pre(module, args, layer=layer, hs=hs):
            z = einops.rearrange(args[0], "b p (h d) -> b p h d", h=n_heads).clone()
            idx = list(range(n_heads)) if whole_layers else hs
            z[:, :, idx] = ft_z[layer][:, :, idx]
            return (einops.rearrange(z, "b p h d -> b p (h d)"),)

        handles.append(base.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return base(input_ids).logits
    finally:
        for handle in handles:
            handle.remove()


def cmap_reversed(base, ft, input_ids, heads):
    return _cmap(ft, base, input_ids, heads)


def cmap_whole_layers(base, ft, input_ids, heads):
    return _cmap(base, ft, input_ids, heads, whole_layers=True)


def cmap_returns_ft(base, ft, input_ids, heads):
    with torch.no_grad():
        return ft(input_ids).logits


def cmap_stub(base, ft, input_ids, heads):
    raise NotImplementedError()


MUTANTS = {
    "check_logit_diff": [
        (diff_first_position, "last position"),
        (diff_swapped, "not the other way round"),
        (diff_mean, "one value per example"),
        (diff_broadcast, "its own answer"),
        (diff_probabilities, "not probabilities"),
    ],
    "check_head_outputs": [
        (outputs_wrong_split, "'(h d)', not '(d h)'"),
        (outputs_of_c_proj, "*input* of c_proj"),
        (outputs_hooks_left, "handle.remove()"),
        (outputs_not_split, "split the last axis"),
    ],
    "check_patch_head": [
        (patch_reversed, "you patched corrupt into clean"),
        (patch_all_heads, "only the given head"),
        (patch_all_positions, "only position pos"),
        (patch_hook_left, "handle.remove()"),
        (patch_hook_returns_nothing, "nothing changed"),
    ],
    "check_patching_sweep": [
        (sweep_unnormalised, "normalise"),
        (sweep_clean_baseline, "subtract the corrupted run's metric"),
        (sweep_head_pos_axes, "[layer, pos, head]"),
        (sweep_patched_metric, "the patched metric itself"),
    ],
    "check_cross_model_patch": [
        (cmap_reversed, "wrong direction"),
        (cmap_whole_layers, "only the listed heads"),
        (cmap_returns_ft, "fine-tuned model's logits"),
    ],
}
STUBS = {
    "check_logit_diff": diff_stub,
    "check_head_outputs": outputs_stub,
    "check_patch_head": patch_stub,
    "check_patching_sweep": sweep_stub,
    "check_cross_model_patch": cmap_stub,
}

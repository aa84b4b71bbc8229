"""Known-wrong versions of lab 04's exercises: each check must fail on them, with the hint in its message."""

import torch


def _mask_from_flat(deltas, keep):
    pieces = torch.split(keep, [d.numel() for d in deltas.values()])
    return {name: piece.reshape(d.shape) for (name, d), piece in zip(deltas.items(), pieces)}


def _global_top_k(deltas, scores, k, largest=True):
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, largest=largest).indices] = True
    return _mask_from_flat(deltas, keep)


def _n(deltas):
    return sum(d.numel() for d in deltas.values())


# ---------------------------------------------------------------------- top_k_mask
def top_k_per_tensor(deltas, sparsity):
    out = {}
    for name, d in deltas.items():
        k = max(1, round(sparsity * d.numel()))
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.topk(d.abs().reshape(-1), k).indices] = True
        out[name] = keep.reshape(d.shape)
    return out


def top_k_signed(deltas, sparsity):
    return _global_top_k(deltas, list(deltas.values()), max(1, round(sparsity * _n(deltas))))


def top_k_smallest(deltas, sparsity):
    return _global_top_k(deltas, [d.abs() for d in deltas.values()], max(1, round(sparsity * _n(deltas))), largest=False)


def top_k_fraction_removed(deltas, sparsity):
    return _global_top_k(deltas, [d.abs() for d in deltas.values()], max(1, round((1 - sparsity) * _n(deltas))))


def top_k_floor(deltas, sparsity):
    return _global_top_k(deltas, [d.abs() for d in deltas.values()], max(1, int(sparsity * _n(deltas))))


def top_k_float_mask(deltas, sparsity):
    mask = _global_top_k(deltas, [d.abs() for d in deltas.values()], max(1, round(sparsity * _n(deltas))))
    return {name: m.float() for name, m in mask.items()}


def top_k_stub(deltas, sparsity):
    raise NotImplementedError()


# ---------------------------------------------------------------------- graft
def graft_no_base(base, ft, mask):
    return {n: mask[n] * ft[n] for n in mask}


def graft_task_vector_only(base, ft, mask):
    return {n: mask[n] * (ft[n] - base[n]) for n in mask}


def graft_inverted(base, ft, mask):
    return {n: torch.where(mask[n], base[n], ft[n]) for n in mask}


def graft_from_ft(base, ft, mask):
    return {n: ft[n] + mask[n] * (ft[n] - base[n]) for n in mask}


def graft_in_place(base, ft, mask):
    for n in mask:
        base[n].add_(mask[n] * (ft[n] - base[n]))
    return base


def graft_stub(base, ft, mask):
    raise NotImplementedError()


# ---------------------------------------------------------------------- recovery
def recovery_ratio(acc_graft, acc_base, acc_ft):
    return acc_graft / acc_ft


def recovery_over_ft(acc_graft, acc_base, acc_ft):
    return (acc_graft - acc_base) / acc_ft


def recovery_lost(acc_graft, acc_base, acc_ft):
    return (acc_ft - acc_graft) / (acc_ft - acc_base)


def recovery_no_nan(acc_graft, acc_base, acc_ft):
    return (acc_graft - acc_base) / (acc_ft - acc_base)


def recovery_zero_without_gain(acc_graft, acc_base, acc_ft):
    return (acc_graft - acc_base) / (acc_ft - acc_base) if acc_ft != acc_base else 0.0


def recovery_stub(acc_graft, acc_base, acc_ft):
    raise NotImplementedError()


# ---------------------------------------------------------------------- relaxed_mask
def relaxed_no_flip(S, base_mask, bias):
    return base_mask.float() + torch.sigmoid(S - bias)


def relaxed_plus_bias(S, base_mask, bias):
    g = base_mask.float()
    return g + (1 - 2 * g) * torch.sigmoid(S + bias)


def relaxed_no_bias(S, base_mask, bias):
    g = base_mask.float()
    return g + (1 - 2 * g) * torch.sigmoid(S)


def relaxed_rounded(S, base_mask, bias):
    g = base_mask.float()
    return (g + (1 - 2 * g) * torch.sigmoid(S - bias) > 0.5).float()


def relaxed_detached(S, base_mask, bias):
    g = base_mask.float()
    return g + (1 - 2 * g) * torch.sigmoid(S.detach() - bias)


def relaxed_stub(S, base_mask, bias):
    raise NotImplementedError()


MUTANTS = {
    "check_top_k_mask": [
        (top_k_per_tensor, "rank all tensors together"),
        (top_k_signed, "rank by |delta|"),
        (top_k_smallest, "*largest* |delta|"),
        (top_k_fraction_removed, "fraction of entries *kept*"),
        (top_k_floor, "round(), not int()"),
        (top_k_float_mask, "return bool tensors"),
    ],
    "check_graft": [
        (graft_no_base, "add the base"),
        (graft_task_vector_only, "masked task vector"),
        (graft_inverted, "the mask is inverted"),
        (graft_from_ft, "start from the base"),
        (graft_in_place, "in place"),
    ],
    "check_recovery": [
        (recovery_ratio, "ignores the base"),
        (recovery_over_ft, "fine-tuning *gain*"),
        (recovery_lost, "fraction *lost*"),
        (recovery_no_nan, "return float('nan')"),
        (recovery_zero_without_gain, "return float('nan'), not a number"),
    ],
    "check_relaxed_mask": [
        (relaxed_no_flip, "*decrease*"),
        (relaxed_plus_bias, "shift by minus the bias"),
        (relaxed_no_bias, "subtract the bias"),
        (relaxed_rounded, "not its rounding"),
        (relaxed_detached, "differentiable in S"),
    ],
}
STUBS = {"check_top_k_mask": top_k_stub, "check_graft": graft_stub, "check_recovery": recovery_stub, "check_relaxed_mask": relaxed_stub}

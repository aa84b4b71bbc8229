"""Known-wrong versions of lab 05's exercises: each check must fail on them, with the hint in its message."""

import torch


def _keep(tau, k, score):
    n_keep = int(k * tau.numel())
    if n_keep == 0:
        return torch.zeros_like(tau)
    idx = score.topk(n_keep).indices
    mask = torch.zeros_like(tau, dtype=torch.bool)
    mask[idx] = True
    return tau * mask


# ---------------------------------------------------------------------- trim
def trim_signed(tau, k):
    return _keep(tau, k, tau)


def trim_smallest(tau, k):
    return _keep(tau, k, -tau.abs())


def trim_count(tau, k):
    n_keep = max(1, int(k * 10))  # k read as "entries per ten", i.e. the wrong count
    return _keep(tau, n_keep / tau.numel(), tau.abs())


def trim_mask(tau, k):
    return (_keep(tau, k, tau.abs()) != 0).float()


def trim_stub(tau, k):
    raise NotImplementedError()


# ---------------------------------------------------------------------- elect_sign
def sign_by_count(stacked):
    return torch.sign(torch.sign(stacked).sum(0))


def sign_sum(stacked):
    return stacked.sum(0)


def sign_first(stacked):
    return torch.sign(stacked[0])


def sign_stub(stacked):
    raise NotImplementedError()


# ---------------------------------------------------------------------- disjoint_mean
def mean_all(stacked, sign):
    return stacked.mean(0)


def mean_over_tasks(stacked, sign):
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / stacked.shape[0]


def mean_zeros_vote(stacked, sign):
    agree = stacked * sign >= 0
    return (stacked * agree).sum(0) / agree.sum(0).clamp_min(1)


def mean_nan(stacked, sign):
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0)


def mean_stub(stacked, sign):
    raise NotImplementedError()


# ---------------------------------------------------------------------- ties_merge
def _trim_all(taus, k):
    return torch.stack([_keep(t, k, t.abs()) for t in taus])


def ties_no_election(taus, k, lam):
    trimmed = _trim_all(taus, k)
    return lam * trimmed.sum(0) / (trimmed != 0).sum(0).clamp_min(1)


def ties_no_trim(taus, k, lam):
    sign = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    return lam * (taus * agree).sum(0) / agree.sum(0).clamp_min(1)


def ties_no_lam(taus, k, lam):
    trimmed = _trim_all(taus, k)
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def ties_sum(taus, k, lam):
    return lam * _trim_all(taus, k).sum(0)


def ties_stub(taus, k, lam):
    raise NotImplementedError()


# ---------------------------------------------------------------------- dare
def dare_no_rescale(tau, p, generator):
    return tau * (torch.rand(tau.shape, generator=generator) >= p)


def dare_rescale_by_p(tau, p, generator):
    return tau * (torch.rand(tau.shape, generator=generator) >= p) / p


def dare_keep_p(tau, p, generator):
    return tau * (torch.rand(tau.shape, generator=generator) < p) / (1 - p)


def dare_own_randomness(tau, p, generator):
    return tau * (torch.rand(tau.shape) >= p) / (1 - p)


def dare_stub(tau, p, generator):
    raise NotImplementedError()


MUTANTS = {
    "check_trim": [
        (trim_signed, "by magnitude"),
        (trim_smallest, "*largest* magnitude"),
        (trim_count, "keep exactly int(k * n)"),
        (trim_mask, "not the 0/1 mask"),
    ],
    "check_elect_sign": [
        (sign_by_count, "not by counting signs"),
        (sign_sum, "not the sum itself"),
        (sign_first, "first task"),
    ],
    "check_disjoint_mean": [
        (mean_all, "you averaged every task"),
        (mean_over_tasks, "not by the number of tasks"),
        (mean_zeros_vote, "do not vote"),
        (mean_nan, "not NaN"),
    ],
    "check_ties_merge": [
        (ties_no_election, "no sign election"),
        (ties_no_trim, "trim each task vector"),
        (ties_no_lam, "multiply the merged vector by lam"),
        (ties_sum, "merging is not summing"),
    ],
    "check_dare": [
        (dare_no_rescale, "rescale the kept entries by 1 / (1 - p)"),
        (dare_rescale_by_p, "not by 1 / p"),
        (dare_keep_p, "p is the drop probability"),
        (dare_own_randomness, "with the given generator"),
    ],
}
STUBS = {
    "check_trim": trim_stub,
    "check_elect_sign": sign_stub,
    "check_disjoint_mean": mean_stub,
    "check_ties_merge": ties_stub,
    "check_dare": dare_stub,
}

"""Known-wrong versions of lab 02's exercises: each check must fail on them, with the hint in its message."""

import torch


def _svd(W):
    return torch.linalg.svd(W, full_matrices=False)


# ---------------------------------------------------------------------- max_cosine
def cos_signed(W0, W1, k):
    U0, _, _ = _svd(W0)
    U1, _, _ = _svd(W1)
    return (U1[:, :k].T @ U0).max(dim=1).values


def cos_top_only(W0, W1, k):
    U0, _, _ = _svd(W0)
    U1, _, _ = _svd(W1)
    return (U1[:, :k].T @ U0[:, :k]).abs().max(dim=1).values


def cos_right(W0, W1, k):
    _, _, V0h = _svd(W0)
    _, _, V1h = _svd(W1)
    return (V1h[:k] @ V0h.T).abs().max(dim=1).values


def cos_rows(W0, W1, k):
    U0, _, _ = _svd(W0)
    U1, _, _ = _svd(W1)
    return (U1[:k] @ U0.T).abs().max(dim=1).values


def cos_stub(W0, W1, k):
    raise NotImplementedError()


# ---------------------------------------------------------------------- count_intruders
def _max_cos(W0, W1, k):
    U0, _, _ = _svd(W0)
    U1, _, _ = _svd(W1)
    return (U1[:, :k].T @ U0).abs().max(dim=1).values


def count_above(W0, W1, k, eps):
    return int((_max_cos(W0, W1, k) >= eps).sum())


def count_all_vectors(W0, W1, k, eps):
    return int((_max_cos(W0, W1, min(W1.shape)) < eps).sum())


def count_stub(W0, W1, k, eps):
    raise NotImplementedError()


# ---------------------------------------------------------------------- scale_direction
def scale_whole(W1, j, lam):
    return lam * W1


def scale_add_lam(W1, j, lam):
    U, S, Vh = _svd(W1)
    return W1 + lam * S[j] * torch.outer(U[:, j], Vh[j])


def scale_direction_only(W1, j, lam):
    U, S, Vh = _svd(W1)
    return lam * S[j] * torch.outer(U[:, j], Vh[j])


def scale_one_based(W1, j, lam):
    U, S, Vh = _svd(W1)
    return W1 + (lam - 1) * S[j + 1] * torch.outer(U[:, j + 1], Vh[j + 1])


def scale_stub(W1, j, lam):
    raise NotImplementedError()


MUTANTS = {
    "check_max_cosine": [
        (cos_signed, "take |cos|"),
        (cos_top_only, "*every* singular vector of W0"),
        (cos_right, "left singular vectors"),
        (cos_rows, "*columns* of U"),
    ],
    "check_count_intruders": [
        (count_above, "*below* eps"),
        (count_all_vectors, "only at the top k"),
    ],
    "check_scale_direction": [
        (scale_whole, "scale only the j-th"),
        (scale_add_lam, "add (lam - 1) times it"),
        (scale_direction_only, "add it to W1"),
        (scale_one_based, "0-based"),
    ],
}
STUBS = {"check_max_cosine": cos_stub, "check_count_intruders": count_stub, "check_scale_direction": scale_stub}

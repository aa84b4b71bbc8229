"""Spectral probes of a fine-tune: intruder dimensions, spectra of the update, subspace overlap.

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228),
Definition 3.1 and Algorithm 1: take the SVDs ``W0 = U0 S0 V0^T`` and ``W1 = U1 S1 V1^T``; a top-k singular
vector ``u1_j`` of the fine-tuned matrix (``j <= k`` by singular value) is an **intruder dimension** when

    max_i |cos(u1_j, u0_i)| < eps        over *every* singular vector u0_i of W0

(defaults ``k = 10``, ``eps = 0.5``, left singular vectors, as in the official code). The model-level count is the
sum over weight matrices. A fine-tuned LoRA model is compared after merging, i.e. the SVD is of ``W0 + dW``.

Everything here reads matrices in the canonical ``(out, in)`` float32 orientation of :mod:`ftanalysis.nn`
(GPT-2's ``Conv1D`` is transposed and its fused ``c_attn`` split into q, k, v before any SVD), so "left" means
the output space of the layer whatever the source library stores.

:func:`spectral_report` compares two checkpoints matrix by matrix. It streams from safetensors files (one
matrix of each checkpoint in memory at a time), caches the base's decompositions in an :class:`SVDCache` so a
second fine-tune of the same base costs only its own work, and computes the top-k of ``W1`` from an
eigendecomposition of its Gram matrix with an a-posteriori certificate (Wedin's perturbation bound), falling
back to a full SVD for any matrix where the certificate cannot guarantee the same count.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._validation import check_float, check_int, check_option
from ..methods.targets import match_names
from ..nn.view import _BLOCK_LISTS, _LAYOUTS, MatrixRef, ModelView, family_of

SIDES = ("left", "right")
TOPK_METHODS = ("auto", "svd")
_EPS64 = float(torch.finfo(torch.float64).eps)
_EPS32 = float(torch.finfo(torch.float32).eps)
_LANCZOS_MIN_DIM = 256  # below this, a dense eigensolver of the Gram matrix is as fast


# ====================================================================== argument checks
def _check_k_eps_side(k, eps, side, owner: str) -> tuple[int, float, str]:
    k = check_int(k, "k", owner, 1)
    eps = check_float(eps, "eps", owner, low=0.0, high=1.0, low_open=True)
    check_option(side, "side", owner, SIDES)
    return k, eps, side


def _as_matrix(W, name: str, owner: str) -> torch.Tensor:
    """``W`` as a 2-D float32 CPU tensor (a copy is never needed: callers do not write into it)."""
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"The {name!r} parameter of {owner} must be a 2-D torch.Tensor or numpy array. Got {type(W).__name__}.")
    if W.ndim != 2:
        raise ValueError(f"The {name!r} parameter of {owner} must be a 2-D matrix. Got shape {tuple(W.shape)}.")
    W = W.detach().to(device="cpu", dtype=torch.float32)
    _check_finite(W, f"{name!r} of {owner}")
    return W


def _check_finite(W: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"The matrix {what} has {bad} NaN or infinite entries; spectral probes need finite weights.")


def _check_finite_by_norm(W: torch.Tensor, norm: float, what: str) -> None:
    """:func:`_check_finite` only when ``norm`` (a norm computed anyway, of ``W`` or of a difference with ``W``)
    is not finite: a finite norm proves finite entries, and the full scan costs as much as the norm."""
    if not math.isfinite(norm):
        _check_finite(W, what)


def _check_k_fits(k: int, shape, what: str, owner: str) -> None:
    if k > min(shape):
        raise ValueError(
            f"The 'k' parameter of {owner} must be <= min(out, in) = {min(shape)} for {what} of shape "
            f"{tuple(shape)}. Got {k}."
        )


# ====================================================================== linear algebra
def _svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32: ``U (m, r)``, ``S (r,)`` descending, ``V (n, r)`` with ``r = min(m, n)``.

    On a CPU, scipy's LAPACK (``gesdd``) when scipy is installed, so that the whole report runs on one BLAS
    thread pool (see :func:`_gram`); torch's otherwise (and on other devices).
    """
    if W.device.type == "cpu":
        try:
            from scipy.linalg import svd
        except ImportError:
            pass
        else:
            U, S, Vh = svd(W.detach().float().numpy(), full_matrices=False, check_finite=False, lapack_driver="gesdd")
            return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vh.T)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U, S, Vh.T


@contextmanager
def _heavy_algebra_in_scipy():
    """Run torch single-threaded while scipy's BLAS does the heavy algebra (when scipy is installed).

    Between scipy calls the report only converts, subtracts and takes norms in torch. With both libraries
    multi-threaded, each one's idle threads spin while the other works: on two cores the report took 1.3x
    longer in wall time than with one thread. torch's thread count is restored on exit.
    """
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """All singular values of ``W`` (descending, float32), from the float64 Gram matrix of its smaller side.

    ``sigma_i = sqrt(lambda_i(W^T W))``; forming the Gram matrix in float64 keeps singular values down to about
    ``1e-7 * sigma_1`` exact, which the entropy effective rank needs (a float32 Gram matrix would blur
    everything below ``3e-4 * sigma_1``). It is 2-5x faster than ``torch.linalg.svdvals`` on a CPU.
    """
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"The 'W' parameter of singular_values must be a 2-D torch.Tensor or numpy array. Got {type(W).__name__}.")
    if W.ndim != 2:
        raise ValueError(f"The 'W' parameter of singular_values must be a 2-D matrix. Got shape {tuple(W.shape)}.")
    if W.is_complex() or not (W.is_floating_point() or W.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"The 'W' parameter of singular_values must hold real numbers. Got dtype {W.dtype}.")
    _check_finite(W, "'W' of singular_values")  # LAPACK would fail to converge on NaN (an unreadable LinAlgError)
    G, lower = _gram(W.detach().to("cpu", torch.float64).numpy())  # (d, d), d = min(m, n)
    lam = _eigvalsh(G, lower)
    return torch.from_numpy(np.sqrt(np.clip(lam[::-1], 0.0, None)).copy()).to(torch.float32)


def _gram(A: np.ndarray) -> tuple[np.ndarray, bool]:
    """The Gram matrix of the smaller side of a float64 ``A`` (``A^T A`` if ``m >= n``, else ``A A^T``).

    Returns ``(G, lower)``: only the triangle that ``lower`` names is valid. With scipy it is one BLAS ``syrk``
    from scipy's own BLAS, the library its eigensolvers use: numpy and scipy each ship an OpenBLAS with its own
    thread pool, and alternating between the two in one loop makes their idle threads spin against each other
    (twice the wall time on two cores). Without scipy, numpy's product (both triangles).
    """
    try:
        from scipy.linalg.blas import dsyrk
    except ImportError:
        return (A.T @ A if A.shape[0] >= A.shape[1] else A @ A.T), True
    want_AtA = A.shape[0] >= A.shape[1]
    if A.flags.f_contiguous:  # syrk(X, trans=1) = X^T X, syrk(X, trans=0) = X X^T, X read in place
        G = dsyrk(1.0, A, trans=1 if want_AtA else 0)
    else:  # A.T is Fortran-ordered: no copy
        G = dsyrk(1.0, A.T if A.flags.c_contiguous else np.asfortranarray(A.T), trans=0 if want_AtA else 1)
    return G, False  # syrk fills the upper triangle


def _eigvalsh(G: np.ndarray, lower: bool = True) -> np.ndarray:
    """All eigenvalues (ascending) of a symmetric ``G`` given by its ``lower`` (or upper) triangle."""
    try:
        from scipy.linalg import eigh
    except ImportError:  # scipy is optional: torch gives the same values, a little slower
        return torch.linalg.eigvalsh(torch.from_numpy(G), UPLO="L" if lower else "U").numpy()
    return eigh(G, lower=lower, eigvals_only=True, driver="evd", check_finite=False)


def _top_eigh(G: np.ndarray, n_top: int, lower: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_top`` largest eigenpairs of a symmetric ``G`` (values descending, vectors as columns)."""
    d = G.shape[0]
    try:
        from scipy.linalg import eigh
    except ImportError:
        lam, X = torch.linalg.eigh(torch.from_numpy(G), UPLO="L" if lower else "U")
        lam, X = lam.numpy(), X.numpy()
        return lam[::-1][:n_top].copy(), X[:, ::-1][:, :n_top].copy()
    lam, X = eigh(G, lower=lower, subset_by_index=[d - n_top, d - 1], driver="evr", check_finite=False)
    return lam[::-1].copy(), X[:, ::-1].copy()


def _max_abs_cos(top: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``|top^T basis|`` ``[k, r0]`` and its row maxima: |cosine| of each top vector with every base vector."""
    cos = (top.T @ basis).abs()  # [k, r0]
    return cos, cos.max(dim=1).values


@dataclass
class _TopK:
    """The top-k singular triplets of ``W1`` that the intruder test needs, and how they were obtained."""

    vectors: torch.Tensor  # [d_side, k] left (or right) singular vectors
    sigma: torch.Tensor  # [k]
    path: str  # "gram" (certified) or "svd"
    bound: torch.Tensor  # [k] bound on | max|cos| - exact max|cos| | (0 for the SVD path)


def _topk_svd(W: torch.Tensor, k: int, side: str) -> _TopK:
    U, S, V = _svd(W)
    vectors = (U if side == "left" else V)[:, :k]
    return _TopK(vectors, S[:k], "svd", torch.zeros(k))


def _topk_gram(W: torch.Tensor, k: int, side: str) -> _TopK | None:
    """Top-k singular triplets from the Gram matrix of the smaller side, with Wedin error bounds.

    Returns ``None`` when the triplets cannot be certified (a zero singular value among the top k, or clustered
    singular values), in which case the caller uses a full SVD.

    Certificate. For a computed unit pair ``(u, v)`` with ``sigma = u^T W v``, let the residual be
    ``r = sqrt(|W v - sigma u|^2 + |W^T u - sigma v|^2)`` and ``delta`` the distance from ``sigma`` to every
    other singular value of ``W``. Wedin's theorem (Wedin 1972; Stewart and Sun 1990, Thm V.4.4) bounds the
    angle to the exact singular vector: ``sin(theta) <= r / delta``. A unit vector within angle ``theta`` of the
    exact one (after fixing its sign) moves every ``|cos|`` with a fixed unit vector by at most
    ``2 sin(theta / 2) <= sqrt(2) sin(theta)``. So a top-k vector whose ``max |cos|`` lies farther than that
    from ``eps`` is classified exactly as the full SVD would classify it. The other singular values are known to
    within their own residuals (k + 1 triplets are computed, so the k-th vector's gap includes the (k+1)-th).

    The k + 1 eigenpairs come from Lanczos iteration (ARPACK) on large matrices, which could in principle miss
    an eigenvalue; :func:`_rest_is_below` then proves with one Cholesky factorisation that every eigenvalue
    not returned lies below the returned ones. Without that proof (or on small matrices) they come from
    LAPACK's dense solver.
    """
    m, n = W.shape
    d = min(m, n)
    n_top = min(k + 1, d)
    W = W.detach().double()  # a float64 Gram matrix certifies clustered top singular values; float32 cannot
    G, lower = _gram(W.numpy())  # W^T W when n <= m, else W W^T
    if d >= _LANCZOS_MIN_DIM and 4 * n_top <= d:
        pairs = _top_eigh_lanczos(G, n_top, lower)
        if pairs is not None:
            top = _certified_triplets(W, *pairs, k, side, rest_check=(G, lower))
            if top is not None:
                return top
    return _certified_triplets(W, *_top_eigh(G, n_top, lower), k, side)


def _top_eigh_lanczos(G: np.ndarray, n_top: int, lower: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``n_top`` largest eigenpairs of ``G`` by implicitly restarted Lanczos (None without scipy or when
    ARPACK does not converge). The start vector is fixed, so results are reproducible."""
    try:
        from scipy.linalg.blas import dsymv
        from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh
    except ImportError:
        return None
    d = G.shape[0]
    op = LinearOperator((d, d), matvec=lambda x: dsymv(1.0, G, np.ravel(x), lower=lower), dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(d)
    try:
        lam, X = eigsh(op, k=n_top, which="LA", ncv=min(d, max(2 * n_top + 1, 32)), tol=1e-10, v0=v0)
    except ArpackError:  # ArpackNoConvergence included
        return None
    order = np.argsort(lam)[::-1]
    return lam[order], np.asfortranarray(X[:, order])


def _rest_is_below(G: np.ndarray, lower: bool, lam: np.ndarray, X: np.ndarray, bound: float, margin: float) -> bool:
    """Whether every eigenvalue of ``G`` but the ``p = len(lam)`` largest is ``<= bound`` (proved, not estimated).

    For any ``X`` with ``p`` columns, ``lambda_{p+1}(G) <= max_{x ⊥ X} x^T G x <= lambda_max(G - X diag(lam) X^T)``
    (Courant-Fischer). A Cholesky factorisation of ``t I - (G - X diag(lam) X^T)`` exists only when that
    maximum is below ``t``; ``t = bound - margin``, where ``margin`` covers the rounding of the Gram matrix and of
    the factorisation (Higham 2002, Thm 10.3).
    """
    from scipy.linalg.blas import dsyrk
    from scipy.linalg.lapack import dpotrf

    Y = np.asfortranarray(X * np.sqrt(lam))
    M = dsyrk(1.0, Y, beta=-1.0, c=G, trans=0, lower=lower)  # X diag(lam) X^T - G, same triangle as G
    M[np.diag_indices_from(M)] += bound - margin
    _, info = dpotrf(M, lower=lower, clean=0, overwrite_a=1)
    return info == 0


def _certified_triplets(W, lam, X, k: int, side: str, rest_check=None) -> _TopK | None:
    """Singular triplets of float64 ``W`` from the top eigenpairs ``(lam, X)`` of its Gram matrix, with bounds.

    ``rest_check = (G, lower)`` when the eigenpairs might not be the top ones (Lanczos): then every other
    singular value must be proved below all of the computed ones (see :func:`_rest_is_below`).
    """
    m, n = W.shape
    d = min(m, n)
    n_top = len(lam)
    right_first = n <= m
    if not np.all(lam > 0):
        return None
    X = torch.from_numpy(np.ascontiguousarray(X))
    if right_first:
        V = X
        WV = W @ V  # [m, n_top]
        sigma = WV.norm(dim=0)
        if not bool((sigma > 0).all()):
            return None
        U = WV / sigma
        res = (W.T @ U - V * sigma).norm(dim=0)  # W V - U sigma = 0 by construction
    else:
        U = X
        WtU = W.T @ U
        sigma = WtU.norm(dim=0)
        if not bool((sigma > 0).all()):
            return None
        V = WtU / sigma
        res = (W @ V - U * sigma).norm(dim=0)
    # rounding of the float64 products above: a few units of float64 precision on sigma_1
    res = res + 4 * math.sqrt(max(m, n)) * _EPS64 * float(sigma.max())
    s = sigma.double()
    s_low = float((s - res).min())  # every computed singular value lies within its residual of a true one
    if rest_check is not None:
        if s_low <= 0:
            return None
        G, lower = rest_check
        s1_sq, fro_sq = float(s.max() + res.max()) ** 2, float(np.trace(G))  # trace(W^T W) = |W|_F^2
        margin = _EPS64 * (4 * d * (d + 1) * s1_sq + 2 * max(m, n) * fro_sq + 2 * n_top * d * s1_sq)
        if not _rest_is_below(G, lower, lam, X.numpy(), s_low**2, margin):
            return None
    bounds = torch.empty(k, dtype=torch.float64)
    for j in range(k):
        others = [i for i in range(n_top) if i != j]
        if not others:
            gap = float(s[j]) - float(res[j])  # a single singular value: distance to 0 bounds the gap
        else:
            # singular values below the (k+1)-th lie farther from sigma_j than it does (LAPACK's top k + 1;
            # after Lanczos, proved by the rest check: all of them are below s_low)
            gap = min(abs(float(s[j]) - float(s[i])) - float(res[i]) for i in others) - float(res[j])
            if rest_check is not None:
                gap = min(gap, float(s[j]) - s_low - float(res[j]))
        if gap <= 0:
            return None
        bounds[j] = math.sqrt(2) * min(1.0, float(res[j]) / gap)
    vectors = (U if side == "left" else V)[:, :k].float().contiguous()
    # rounding the unit vectors to float32 moves each |cos| by at most sqrt(len) * eps32
    bounds = bounds + math.sqrt(vectors.shape[0]) * _EPS32
    return _TopK(vectors, sigma[:k].float(), "gram", bounds.float())


# ====================================================================== matrix-level probes
@dataclass
class IntruderResult:
    """Intruder dimensions of one fine-tuned matrix against its base (see :func:`intruder_dimensions`).

    Attributes
    ----------
    count : int
        Number of intruders among the top-k singular vectors of ``W1``.
    max_cos : Tensor ``[k]``
        For each top-k vector of ``W1`` (by singular value), its largest |cosine| with any singular vector of
        ``W0``.
    ranks : tuple of int
        1-based ranks (1 = largest singular value of ``W1``) of the intruders.
    singular_values : Tensor ``[k]``
        The top-k singular values of ``W1``.
    cos : Tensor ``[k, r0]``
        |cosine| of each top-k vector of ``W1`` with each singular vector of ``W0`` (columns in ``W0``'s order).
    """

    count: int
    max_cos: torch.Tensor
    ranks: tuple[int, ...]
    singular_values: torch.Tensor
    cos: torch.Tensor
    k: int
    eps: float
    side: str
    base_singular_values: torch.Tensor | None = None

    @property
    def min_max_cos(self) -> float:
        return float(self.max_cos.min())

    def to_frame(self) -> pd.DataFrame:
        """One row per top-k vector: ``rank``, ``sigma``, ``max_cos``, ``best_base_rank``, ``intruder``."""
        return pd.DataFrame(
            {
                "rank": np.arange(1, self.k + 1),
                "sigma": self.singular_values.numpy(),
                "max_cos": self.max_cos.numpy(),
                "best_base_rank": self.cos.argmax(dim=1).numpy() + 1,
                "intruder": (self.max_cos < self.eps).numpy(),
            }
        )

    def plot(self, n_base: int | None = None, ax=None):
        """|cos| heatmap of the top-k vectors of ``W1`` against ``W0``'s first ``n_base`` vectors (a Figure)."""
        from .spectral_plots import plot_cos_heatmap

        return plot_cos_heatmap(self, n_base=n_base, ax=ax)

    def __repr__(self) -> str:
        return (
            f"IntruderResult(count={self.count}, ranks={list(self.ranks)}, k={self.k}, eps={self.eps}, "
            f"side={self.side!r}, min_max_cos={self.min_max_cos:.3f})"
        )


def intruder_dimensions(W0, W1, k: int = 10, eps: float = 0.5, side: str = "left") -> IntruderResult:
    """Intruder dimensions of a fine-tuned matrix ``W1`` against its pretrained ``W0``.

    Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228),
    Algorithm 1: with thin SVDs ``W = U S V^T`` of both matrices (float32, as the official code), the j-th
    singular vector of ``W1`` (``j <= k``, by singular value) is an intruder when
    ``max_i |<u1_j, u0_i>| < eps`` over every singular vector ``u0_i`` of ``W0``.

    Parameters
    ----------
    W0, W1 : Tensor or ndarray ``(out, in)``
        The base and fine-tuned matrices, same shape, finite. For model weights use the canonical orientation
        (``fta.nn.ModelView(model).get(name)``); GPT-2's ``Conv1D`` stores ``(in, out)``.
    k : int, default=10
        How many top singular vectors of ``W1`` are tested, in ``[1, min(out, in)]``. The paper's figures use
        10 and sweep it (their Fig. 15).
    eps : float, default=0.5
        Cosine threshold in ``(0, 1]``. The smallest possible ``max |cos|`` against an orthonormal basis of
        ``R^n`` is ``1/sqrt(n)`` (0.036 for n = 768), far below 0.5.
    side : {"left", "right"}, default="left"
        ``"left"`` compares left singular vectors (the output space, the paper's choice); ``"right"`` the right
        ones (the input space). This matters for non-square matrices: for a tall ``W0`` (out > in, e.g. an MLP
        up-projection ``(4d, d)``) the thin ``U0`` spans only ``in`` of the ``out`` output dimensions, so a
        left "intruder" may simply point out of ``W0``'s column space; the right vectors then live in a space
        that ``V0`` spans completely. For a wide matrix the roles swap.

    Returns
    -------
    IntruderResult
        ``.count``, ``.max_cos`` ``[k]``, ``.ranks`` (1-based), ``.cos`` ``[k, min(out, in)]``, ``.to_frame()``,
        ``.plot()``.

    Notes
    -----
    The count does not depend on the sign of any singular vector (|cosine| is used). Use
    :func:`spectral_report` for whole models; it computes the same count faster.

    Examples
    --------
    >>> import torch, ftanalysis as fta
    >>> W0 = torch.randn(64, 64)
    >>> fta.probes.intruder_dimensions(W0, W0).count
    0
    """
    owner = "intruder_dimensions"
    k, eps, side = _check_k_eps_side(k, eps, side, owner)
    W0 = _as_matrix(W0, "W0", owner)
    W1 = _as_matrix(W1, "W1", owner)
    if W0.shape != W1.shape:
        raise ValueError(f"W0 and W1 of {owner} must have the same shape. Got {tuple(W0.shape)} and {tuple(W1.shape)}.")
    _check_k_fits(k, W0.shape, "W0", owner)
    U0, S0, V0 = _svd(W0)
    top = _topk_svd(W1, k, side)
    cos, max_cos = _max_abs_cos(top.vectors, U0 if side == "left" else V0)
    flags = max_cos < eps
    return IntruderResult(
        count=int(flags.sum()),
        max_cos=max_cos,
        ranks=tuple(int(i) + 1 for i in torch.nonzero(flags).flatten()),
        singular_values=top.sigma,
        cos=cos,
        k=k,
        eps=eps,
        side=side,
        base_singular_values=S0,
    )


@dataclass
class Spectra:
    """Singular values of ``W0``, ``W1`` and ``dW = W1 - W0`` (descending), with update statistics."""

    base: torch.Tensor
    finetuned: torch.Tensor
    update: torch.Tensor

    def to_frame(self) -> pd.DataFrame:
        """Long table: ``index`` (1-based), ``matrix`` in {W0, W1, dW}, ``sigma``."""
        rows = []
        for label, s in (("W0", self.base), ("W1", self.finetuned), ("dW", self.update)):
            rows.append(pd.DataFrame({"index": np.arange(1, len(s) + 1), "matrix": label, "sigma": s.numpy()}))
        return pd.concat(rows, ignore_index=True)

    def plot(self, ax=None):
        from .spectral_plots import plot_spectra

        return plot_spectra(self, ax=ax)


def spectra(W0, W1) -> Spectra:
    """Singular values of ``W0``, ``W1`` and ``dW = W1 - W0`` (each descending, float32).

    Biderman et al. 2024, "LoRA Learns Less and Forgets Less" (arXiv 2405.09673), Sec. 4.6, compare these three
    spectra for full fine-tuning; a LoRA update has at most ``r`` nonzero singular values.
    """
    W0 = _as_matrix(W0, "W0", "spectra")
    W1 = _as_matrix(W1, "W1", "spectra")
    if W0.shape != W1.shape:
        raise ValueError(f"W0 and W1 of spectra must have the same shape. Got {tuple(W0.shape)} and {tuple(W1.shape)}.")
    return Spectra(singular_values(W0), singular_values(W1), singular_values(W1 - W0))


def update_statistics(sigma: torch.Tensor, energy: float = 0.9) -> dict[str, float]:
    """Rank statistics of an update from its singular values ``sigma`` (any order).

    - ``stable_rank = sum(sigma^2) / max(sigma)^2`` (Rudelson and Vershynin 2007);
    - ``effective_rank = exp(H(p))`` with ``p_i = sigma_i / sum(sigma)`` (Roy and Vetterli 2007, the entropy
      effective rank of the paper's App. H);
    - ``rank_energy``: the smallest ``r`` with ``sum_{i<=r} sigma_i^2 >= energy * sum(sigma^2)`` (the
      "rank needed to explain 90% of the variance" of Biderman et al. 2024, Fig. 6).

    A zero update has all three equal to 0.
    """
    check_float(energy, "energy", "update_statistics", low=0.0, high=1.0, low_open=True)
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().cpu()
    try:
        s = np.asarray(sigma, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"The 'sigma' parameter of update_statistics must be a 1-D array of singular values. Got {type(sigma).__name__}.") from err
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"The 'sigma' parameter of update_statistics must be a non-empty 1-D array. Got shape {s.shape}.")
    if not np.isfinite(s).all() or (s < 0).any():
        raise ValueError(
            "The 'sigma' parameter of update_statistics must hold singular values: finite and >= 0. "
            f"Got {int((~np.isfinite(s)).sum())} non-finite and {int((s < 0).sum())} negative value(s)."
        )
    s = np.sort(s)[::-1]
    total_sq = float((s**2).sum())
    if total_sq == 0.0:
        return {"stable_rank": 0.0, "effective_rank": 0.0, "rank_energy": 0}
    p = s / s.sum()
    p = p[p > 0]
    cumulative = np.cumsum(s**2) / total_sq
    return {
        "stable_rank": total_sq / float(s[0] ** 2),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "rank_energy": int(np.searchsorted(cumulative, energy - 1e-12) + 1),
    }


def principal_angles(A, B, i: int | None = None, j: int | None = None, side: str = "left") -> torch.Tensor:
    """Principal angles (radians, ascending) between the top-``i`` singular subspace of ``A`` and top-``j`` of ``B``.

    ``cos(theta_t)`` are the singular values of ``U_A[:, :i]^T U_B[:, :j]`` (Bjorck and Golub 1973); there are
    ``min(i, j)`` of them. ``side="right"`` uses the right singular vectors. ``i``/``j`` default to the full rank.
    """
    U_A, U_B, i, j = _two_bases(A, B, i, j, side, "principal_angles")
    cos = torch.linalg.svdvals(U_A[:, :i].T @ U_B[:, :j]).clamp(0.0, 1.0)
    return torch.arccos(cos)  # svdvals are descending, so the angles ascend


def subspace_similarity(A, B, i: int, j: int, side: str = "left") -> float:
    """Normalised subspace similarity of two matrices (e.g. two updates), Hu et al. 2021, LoRA, Sec. 7, eq. (4).

    ``phi(A, B, i, j) = ||U_A[:, :i]^T U_B[:, :j]||_F^2 / min(i, j)`` in ``[0, 1]``: 1 when one subspace
    contains the other, 0 when they are orthogonal. Two random subspaces of ``R^d`` give ``max(i, j) / d`` on
    average (the control to compare with).
    """
    U_A, U_B, i, j = _two_bases(A, B, i, j, side, "subspace_similarity")
    return float((U_A[:, :i].T @ U_B[:, :j]).pow(2).sum() / min(i, j))


def _two_bases(A, B, i, j, side, owner):
    check_option(side, "side", owner, SIDES)
    A = _as_matrix(A, "A", owner)
    B = _as_matrix(B, "B", owner)
    dim = 0 if side == "left" else 1
    if A.shape[dim] != B.shape[dim]:
        raise ValueError(
            f"A and B of {owner} must share their {'row' if dim == 0 else 'column'} dimension for side={side!r}. "
            f"Got shapes {tuple(A.shape)} and {tuple(B.shape)}."
        )
    i = min(A.shape) if i is None else check_int(i, "i", owner, 1, min(A.shape))
    j = min(B.shape) if j is None else check_int(j, "j", owner, 1, min(B.shape))
    U_A, _, V_A = _svd(A)
    U_B, _, V_B = _svd(B)
    return (U_A, U_B, i, j) if side == "left" else (V_A, V_B, i, j)


# ====================================================================== the base's SVD cache
class SVDCache:
    """Decompositions of base matrices, reused across reports of several fine-tunes of one base.

    An entry holds all singular values of ``W0`` and its left or right singular vectors (only the side the
    intruder test needs: about one matrix's worth of memory). Keys identify the matrix: ``(file, size,
    modification time, tensor name, part)`` for a safetensors checkpoint, a BLAKE2 digest of the values for an
    in-memory model, plus the side.

    Parameters
    ----------
    directory : str or Path, optional
        Keep entries on disk (one safetensors file each) instead of in memory: they survive the process (the CLI
        reuses them across runs) and cost no RAM.
    max_bytes : int, default=2 GiB
        In-memory mode: least recently used entries are dropped beyond this size.
    """

    def __init__(self, directory: str | Path | None = None, max_bytes: int = 2 << 30):
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = check_int(max_bytes, "max_bytes", "SVDCache", 0)
        self._store: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _digest(key) -> str:
        return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()

    def get(self, key, W0: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S0, basis)`` for ``W0`` (``basis = U0`` or ``V0`` by ``side``), computed once per key."""
        name = self._digest((key, side))
        if self.directory is not None:
            path = self.directory / f"{name}.safetensors"
            if path.is_file():
                from safetensors.torch import load_file

                self.hits += 1
                entry = load_file(str(path))
                return entry["S"], entry["basis"]
        elif name in self._store:
            self.hits += 1
            self._store.move_to_end(name)
            return self._store[name]
        self.misses += 1
        U, S, V = _svd(W0)
        basis = (U if side == "left" else V).contiguous()
        if self.directory is not None:
            from safetensors.torch import save_file

            tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            save_file({"S": S.contiguous(), "basis": basis}, str(tmp))
            os.replace(tmp, self.directory / f"{name}.safetensors")
        else:
            size = S.numel() * 4 + basis.numel() * 4
            self._store[name] = (S, basis)
            self.nbytes += size
            while self.nbytes > self.max_bytes and self._store:
                _, (s, b) = self._store.popitem(last=False)
                self.nbytes -= s.numel() * 4 + b.numel() * 4
        return S, basis

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        if self.directory is not None:
            return len(list(self.directory.glob("*.safetensors")))
        return len(self._store)

    def __repr__(self) -> str:
        where = f"directory={str(self.directory)!r}" if self.directory else f"in memory, {self.nbytes / 2**20:.1f} MiB"
        return f"SVDCache({where}, entries={len(self)}, hits={self.hits}, misses={self.misses})"


DEFAULT_CACHE = SVDCache()


def _resolve_cache(cache) -> SVDCache | None:
    if cache is None or cache is True:
        return DEFAULT_CACHE
    if cache is False:
        return None
    if isinstance(cache, SVDCache):
        return cache
    if isinstance(cache, (str, Path)):
        return SVDCache(directory=cache)
    raise TypeError(f"The 'cache' parameter must be None, True, False, a directory or an SVDCache. Got {type(cache).__name__}.")


# ====================================================================== sources of matrices
class _ModelSource:
    """Canonical matrices of an in-memory model (through :class:`ModelView`)."""

    def __init__(self, model: nn.Module, role: str):
        self.view = ModelView(model)
        self.role = role
        self.label = f"{type(model).__name__} ({role})"
        for name in self.view.matrix_names():
            if self.view.wrapper(name) is not self.view.module(name):
                raise ValueError(
                    f"The {role!r} model carries an adapter at {self.view.ref(name).module_path} "
                    f"({type(self.view.wrapper(name)).__name__}); spectral probes compare dense weights. Merge it first "
                    "(result.merged_model(), method.merge(model) or PEFT's merge_and_unload())."
                )
        self.family = self.view.family
        self.model_type = getattr(self.view.config, "model_type", None)
        self.names = self.view.matrix_names()
        self.n_layers = self.view.n_layers

    def kind(self, name: str) -> str:
        return self.view.ref(name).kind

    def shape(self, name: str) -> tuple[int, int]:
        module = self.view.module(name)
        ref = self.view.ref(name)
        out, inp = module.weight.shape[::-1] if ref.transposed else module.weight.shape
        return (out // ref.n_parts, inp)

    def matrix(self, name: str) -> torch.Tensor:
        return self.view.get(name)

    def key(self, name: str, W: torch.Tensor):
        return ("tensor", hashlib.blake2b(W.numpy().tobytes(), digest_size=16).hexdigest(), tuple(W.shape))

    def close(self) -> None:
        pass


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a safetensors file; spectral probes read safetensors checkpoints only.")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"No checkpoint folder or safetensors file at {path}.")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for f in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin files are not read: convert them with save_pretrained(safe_serialization=True))"
        raise FileNotFoundError(f"{path} holds no *.safetensors weights{hint if list(path.glob('*.bin')) else ''}.")
    return files


class _FileSource:
    """Canonical matrices streamed one at a time from the safetensors files of a checkpoint.

    The architecture comes from ``config.json`` when the folder has one, else from the tensor names (so our own
    ``model.safetensors`` checkpoints without a config work too). Each matrix is read with
    ``safetensors.safe_open`` (only the file headers are read up front) and turned into ``(out, in)`` float32
    by :meth:`MatrixRef.to_canonical`; the last raw tensor is kept so that q, k and v of a fused GPT-2
    ``c_attn`` are read once.
    """

    def __init__(self, path: str | Path, role: str):
        from safetensors import safe_open

        self.path = Path(path).expanduser()
        self.role = role
        self.label = str(self.path)
        self.files = _weight_files(self.path)
        key_file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for key in handle.keys():
                        key_file[key] = f
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
            except Exception as err:
                raise ValueError(f"The {role!r} checkpoint file {f} could not be read as safetensors: {err}") from err
        self.key_file = key_file
        config_path = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        self.model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
        self.family, self.refs = self._find_matrices()
        self.names = list(self.refs)
        self.n_layers = 1 + max(r.layer for r in self.refs.values())
        self._last: tuple[str, torch.Tensor] | None = None

    def _find_matrices(self) -> tuple[str, dict[str, MatrixRef]]:
        families = [family_of(self.model_type)] if self.model_type else list(_LAYOUTS)
        for family in families:
            block = re.escape(_BLOCK_LISTS[family])
            found: dict[tuple[int, str], list[str]] = {}
            for kind, (path, _) in _LAYOUTS[family].items():
                pattern = re.compile(rf"(?:.*\.)?{block}\.(\d+)\.{re.escape(path)}\.weight")
                for key in self.key_file:
                    hit = pattern.fullmatch(key)
                    if hit:
                        found.setdefault((int(hit.group(1)), kind), []).append(key)
            if found:
                break
        else:
            raise ValueError(
                f"The {self.role!r} checkpoint {self.path} has no transformer block weights of a supported "
                f"architecture (gpt2, llama/qwen2/mistral, bert/roberta). First tensor names: {sorted(self.key_file)[:5]}."
            )
        for (layer, kind), keys in found.items():
            if len(keys) > 1:
                raise ValueError(f"The {self.role!r} checkpoint {self.path} holds several tensors for layers.{layer}.{kind}: {keys}.")
        n_layers = 1 + max(layer for layer, _ in found)
        expected = [(layer, kind) for layer in range(n_layers) for kind in _LAYOUTS[family]]
        missing = [f"layers.{layer}.{kind}" for layer, kind in expected if (layer, kind) not in found]
        if missing:
            raise ValueError(
                f"The {self.role!r} checkpoint {self.path} is missing weight matrices {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''} (found {len(found)} of {len(expected)} for {n_layers} {family} layers)."
            )
        refs = {}
        for layer, kind in expected:
            key = found[(layer, kind)][0]
            part = _LAYOUTS[family][kind][1]
            refs[f"layers.{layer}.{kind}"] = MatrixRef(
                name=f"layers.{layer}.{kind}",
                layer=layer,
                kind=kind,
                module_path=key[: -len(".weight")],
                param_name=key,
                part=part,
                n_parts=3 if part is not None else 1,
                transposed=family == "gpt2",  # Hugging Face GPT-2 stores every projection as Conv1D (in, out)
            )
        return family, refs

    def kind(self, name: str) -> str:
        return self.refs[name].kind

    def shape(self, name: str) -> tuple[int, int]:
        ref = self.refs[name]
        raw = self._shapes[ref.param_name]
        if len(raw) != 2:
            raise ValueError(f"The {self.role!r} tensor {ref.param_name} is not a matrix: shape {tuple(raw)}.")
        out, inp = (raw[1], raw[0]) if ref.transposed else (raw[0], raw[1])
        return (out // ref.n_parts, inp)

    def matrix(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        ref = self.refs[name]
        if self._last is None or self._last[0] != ref.param_name:
            self._last = None  # free the previous tensor before reading the next
            # open per read: the file's memory map (and the pages it touched) goes away with the handle, so
            # streaming a checkpoint never leaves it resident in this process
            with safe_open(str(self.key_file[ref.param_name]), framework="pt") as handle:
                raw = handle.get_tensor(ref.param_name)
            self._last = (ref.param_name, raw)
        return ref.to_canonical(self._last[1])

    def key(self, name: str, W: torch.Tensor):
        ref = self.refs[name]
        f = self.key_file[ref.param_name]
        stat = f.stat()
        return ("file", str(f.resolve()), stat.st_size, stat.st_mtime_ns, ref.param_name, ref.part)

    def close(self) -> None:
        self._last = None


def _resolve_name(x):
    """A zoo name (``"gpt2-tiny"``, ``"minilm"``, ...) that is no local path becomes its checkpoint folder."""
    if isinstance(x, str) and not Path(x).expanduser().exists():
        from ..zoo.loading import zoo_path

        folder = zoo_path(x)
        if folder is not None:
            return folder
    return x


def _open_source(x, role: str, owner: str):
    if isinstance(x, nn.Module):
        return _ModelSource(x, role)
    if isinstance(x, (str, Path)):
        return _FileSource(_resolve_name(x), role)
    raise TypeError(
        f"The {role!r} parameter of {owner} must be a model (nn.Module), a checkpoint folder or a safetensors file. "
        f"Got {type(x).__name__}."
    )


def _load_adapter(base, adapter: str | Path) -> nn.Module:
    """The base with a PEFT LoRA adapter merged in, as a plain model (``fta.load_peft`` when available)."""
    import ftanalysis as fta

    adapter = Path(adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder: adapter_config.json is missing.")
    if not isinstance(base, nn.Module):
        base, _ = fta.load_model(_resolve_name(base))
    load_peft = getattr(fta, "load_peft", None)
    if load_peft is not None:
        return load_peft(base, str(adapter))
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload()


def _base_basis(W0: torch.Tensor, source, name: str, side: str, svd_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and the ``side`` singular vectors of the base matrix, from ``svd_cache`` when given."""
    if svd_cache is not None:
        return svd_cache.get(source.key(name, W0), W0, side)
    U, S, V = _svd(W0)
    return S, (U if side == "left" else V)


def _select(names: list[str], kind_of, modules, owner: str) -> list[str]:
    """Names picked by ``modules`` (None: all): canonical names, kinds, ``"attn"``/``"mlp"`` or regexes."""
    if modules is None:
        return list(names)
    entries = [modules] if isinstance(modules, str) else list(modules) if isinstance(modules, (list, tuple)) else None
    if not entries or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"The 'modules' parameter of {owner} must be None, a string or a list of strings. Got {modules!r}.")
    kinds = sorted({kind_of(n) for n in names})
    chosen: set[str] = set()
    for entry in entries:
        matched = match_names(entry, names, kind_of)
        if not matched:
            raise ValueError(
                f"The 'modules' entry {entry!r} of {owner} matches no weight matrix. Use a kind among "
                f"{kinds + ['attn', 'mlp']}, a name such as {names[0]!r}, or a regular expression over those names."
            )
        chosen |= matched
    return [n for n in names if n in chosen]


def _check_same_architecture(src0, src1, owner: str) -> None:
    types = (src0.model_type or src0.family, src1.model_type or src1.family)
    if src0.family != src1.family or (src0.model_type and src1.model_type and src0.model_type != src1.model_type):
        raise ValueError(
            f"The 'base' and 'ft' checkpoints of {owner} have different architectures: {types[0]} ({src0.label}) "
            f"vs {types[1]} ({src1.label})."
        )
    if src0.n_layers != src1.n_layers:
        raise ValueError(
            f"The 'base' and 'ft' checkpoints of {owner} have different architectures: {src0.n_layers} vs "
            f"{src1.n_layers} {src0.family} layers."
        )
    missing = [n for n in src0.names if n not in src1.names]
    if missing:
        raise ValueError(f"The 'ft' checkpoint ({src1.label}) is missing weight matrices {missing[:8]} of the base.")


# ====================================================================== the report
def _probe(W0, W1, S0, B0, k, eps, side, topk: str):
    """Intruder statistics of one matrix pair given the base's cached ``(S0, basis)``."""
    top = None
    if topk == "auto":
        gram = _topk_gram(W1, k, side)
        if gram is not None:
            _, max_cos = _max_abs_cos(gram.vectors, B0)
            if bool(((max_cos - eps).abs() > gram.bound + 1e-6).all()):
                top = gram
    if top is None:
        top = _topk_svd(W1, k, side)
    _, max_cos = _max_abs_cos(top.vectors, B0)
    return top, max_cos


def spectral_report(
    base,
    ft=None,
    k: int = 10,
    eps: float = 0.5,
    modules: str | Iterable[str] | None = None,
    side: str = "left",
    *,
    peft: str | Path | None = None,
    cache: SVDCache | str | Path | bool | None = None,
    topk: str = "auto",
    energy: float = 0.9,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per weight matrix: how a fine-tune changed it, and its intruder dimensions.

    Shuttleworth et al. 2024 (arXiv 2410.21228) for the intruder count (see :func:`intruder_dimensions`);
    Biderman et al. 2024 (arXiv 2405.09673, Sec. 4.6) for the rank of the update at 90% energy.

    Parameters
    ----------
    base : nn.Module, checkpoint folder or safetensors file
        The pretrained model. A folder may be a Hugging Face checkpoint (``config.json`` + safetensors, sharded
        or not) or one of ours (``model.safetensors`` of ``fta.finetune`` checkpoints or ``fta.cached_finetune``),
        or a zoo name from ``fta.zoo.available()`` (``"gpt2-tiny"``, ``"minilm"``, ...).
    ft : nn.Module, checkpoint folder, safetensors file or zoo name, optional
        The fine-tuned model, same architecture. Omit it when ``peft`` is given.
    k, eps, side : see :func:`intruder_dimensions` (defaults 10, 0.5, "left").
    modules : str or list of str, optional
        Which matrices: canonical names (``"layers.3.attn.q"``), kinds (``"attn.q"``, ``"mlp.down"``), module
        types (``"attn"``, ``"mlp"``) or regular expressions over the names. Default: every attention and MLP
        matrix (embeddings and heads are never included).
    peft : str or Path, optional
        A PEFT LoRA adapter folder: ``ft`` becomes ``base`` with the adapter merged (``fta.load_peft``).
    cache : SVDCache, directory, bool or None, default=None
        Where the base's SVDs are kept: None/True uses a process-wide in-memory cache, a directory a disk
        cache, False none. A second report against the same base then skips every base SVD.
    topk : {"auto", "svd"}, default="auto"
        ``"svd"`` takes the top-k of ``W1`` from a full SVD (the reference). ``"auto"`` takes them from the k + 1
        largest eigenpairs of the Gram matrix of the smaller side (Lanczos iteration with a Cholesky proof that
        no eigenvalue was missed, or LAPACK's dense solver on small matrices) and keeps
        them only where Wedin's bound proves that every top-k vector falls on the same side of ``eps`` as the
        exact one would (column ``topk_path`` says ``"gram"``); elsewhere it falls back to the full SVD.
    energy : float, default=0.9
        Energy fraction of ``rank_energy`` (cumulative ``sigma^2``).
    progress : bool, default=False
        A tqdm bar over matrices.

    Returns
    -------
    pandas.DataFrame
        Columns ``name, layer, kind, module, out, in, dW_norm, W0_norm, dW_rel (= ||dW||_F / ||W0||_F),
        dW_sigma1, stable_rank, effective_rank, rank_energy, intruders, min_max_cos, intruder_ranks,
        max_cos (tuple of k), sigma_top (tuple of k), topk_path``; statistics of ``dW = W1 - W0`` come from all
        its singular values (:func:`singular_values`). ``df.attrs`` holds ``k``, ``eps``, ``side``, ``energy``.
        :func:`summarize_report` groups it.

    Notes
    -----
    Streaming: with checkpoint folders, one matrix of each checkpoint is in memory at a time (plus the cached
    base decompositions, about one base matrix each; use ``cache=<directory>`` to keep them on disk).

    Examples
    --------
    >>> import ftanalysis as fta
    >>> base, tok = fta.zoo.load("gpt2-tiny")
    >>> fta.probes.spectral_report(base, base)["intruders"].sum()
    0
    """
    owner = "spectral_report"
    k, eps, side = _check_k_eps_side(k, eps, side, owner)
    check_option(topk, "topk", owner, TOPK_METHODS)
    energy = check_float(energy, "energy", owner, low=0.0, high=1.0, low_open=True)
    if peft is not None:
        if ft is not None:
            raise ValueError(f"{owner}: pass either 'ft' or 'peft' (an adapter merged into 'base'), not both.")
        ft = _load_adapter(base, peft)
    elif ft is None:
        raise ValueError(f"{owner} needs the fine-tuned model: pass 'ft' (a model or checkpoint) or 'peft' (an adapter folder).")
    svd_cache = _resolve_cache(cache)
    with ExitStack() as stack:
        stack.enter_context(_heavy_algebra_in_scipy())
        src0 = _open_source(base, "base", owner)
        stack.callback(src0.close)
        src1 = _open_source(ft, "ft", owner)
        stack.callback(src1.close)
        _check_same_architecture(src0, src1, owner)
        names = _select(src0.names, src0.kind, modules, owner)
        for name in names:  # every shape check before any SVD
            s0, s1 = src0.shape(name), src1.shape(name)
            if s0 != s1:
                raise ValueError(f"The matrix {name} has shape {s0} in 'base' but {s1} in 'ft' ({owner} needs one architecture).")
            _check_k_fits(k, s0, name, owner)
        rows = []
        for name in tqdm(names, desc="spectral report", disable=not progress, leave=False):
            W0, W1 = src0.matrix(name), src1.matrix(name)
            W1 = W1.double()  # exact; the Gram matrices need float64
            dW = W1 - W0.double()  # exact: float32 operands, float64 difference
            w0_norm, dw_norm = float(W0.norm()), float(dW.norm())
            _check_finite_by_norm(W0, w0_norm, f"{name} of 'base'")
            _check_finite_by_norm(W1, dw_norm, f"{name} of 'ft'")
            S0, B0 = _base_basis(W0, src0, name, side, svd_cache)
            top, max_cos = _probe(W0, W1, S0, B0, k, eps, side, topk)
            sigma_dw = singular_values(dW)
            stats = update_statistics(sigma_dw, energy)
            flags = (max_cos < eps).tolist()
            layer_text, kind = name.split(".", 2)[1], src0.kind(name)
            rows.append(
                {
                    "name": name,
                    "layer": int(layer_text),
                    "kind": kind,
                    "module": kind.split(".")[0],
                    "out": W0.shape[0],
                    "in": W0.shape[1],
                    "dW_norm": dw_norm,
                    "W0_norm": w0_norm,
                    "dW_rel": dw_norm / w0_norm if w0_norm > 0 else float("nan"),
                    "dW_sigma1": float(sigma_dw[0]),
                    "stable_rank": stats["stable_rank"],
                    "effective_rank": stats["effective_rank"],
                    "rank_energy": stats["rank_energy"],
                    "intruders": int(sum(flags)),
                    "min_max_cos": float(max_cos.min()),
                    "intruder_ranks": tuple(i + 1 for i, f in enumerate(flags) if f),
                    "max_cos": tuple(float(c) for c in max_cos),
                    "sigma_top": tuple(float(s) for s in top.sigma),
                    "topk_path": top.path,
                }
            )
            del W0, W1, dW
    report = pd.DataFrame(rows)
    report.attrs.update({"k": k, "eps": eps, "side": side, "energy": energy})
    return report


def intruder_counts(report: pd.DataFrame, k: int | None = None, eps: float | None = None) -> pd.Series:
    """Per-matrix intruder counts of a report recounted at another ``k`` (<= the report's) or ``eps``.

    Uses the ``max_cos`` tuples the report stored, so sweeps over ``eps`` and ``k`` (the paper's Figs. 4 and
    15) cost no new SVD. Recounts at an ``eps`` other than the report's are not re-certified: a value within
    about 1e-5 of the new threshold may differ from a full-SVD count.
    """
    owner = "intruder_counts"
    if not isinstance(report, pd.DataFrame) or "max_cos" not in report:
        raise TypeError(f"The 'report' parameter of {owner} must be a DataFrame from fta.probes.spectral_report. Got {type(report).__name__}.")
    k_report = int(report.attrs.get("k", len(report["max_cos"].iloc[0])))
    k = k_report if k is None else check_int(k, "k", owner, 1, k_report)
    eps = float(report.attrs.get("eps", 0.5)) if eps is None else check_float(eps, "eps", owner, 0.0, 1.0, low_open=True)
    counts = [sum(c < eps for c in cos[:k]) for cos in report["max_cos"]]
    return pd.Series(counts, index=report.index, name="intruders")


def summarize_report(report: pd.DataFrame, by: str | list[str] = "kind") -> pd.DataFrame:
    """Group a :func:`spectral_report` table (by ``"kind"``, ``"module"``, ``"layer"`` or a list of them).

    Columns: ``matrices``, ``intruders`` (sum), ``with_intruders`` (matrices with at least one),
    ``dW_rel`` (mean), ``effective_rank`` (mean), ``stable_rank`` (mean), ``rank_energy`` (mean),
    ``min_max_cos`` (min); a last row ``total`` sums or averages over every matrix.
    """
    keys = [by] if isinstance(by, str) else list(by)
    unknown = [key for key in keys if key not in report.columns]
    if unknown:
        raise ValueError(f"The 'by' parameter of summarize_report must name report columns such as 'kind', 'module', 'layer'. Got {unknown}.")
    agg = {
        "matrices": ("name", "count"),
        "intruders": ("intruders", "sum"),
        "with_intruders": ("intruders", lambda s: int((s > 0).sum())),
        "dW_rel": ("dW_rel", "mean"),
        "effective_rank": ("effective_rank", "mean"),
        "stable_rank": ("stable_rank", "mean"),
        "rank_energy": ("rank_energy", "mean"),
        "min_max_cos": ("min_max_cos", "min"),
    }
    grouped = report.groupby(keys, sort=True).agg(**agg).reset_index()
    total = report.assign(_all="total").groupby("_all").agg(**agg).reset_index(drop=True)
    for key in keys:
        total[key] = "total"
    return pd.concat([grouped, total[grouped.columns]], ignore_index=True)


# ====================================================================== interventions and overlaps
def _as_model(x, role: str, owner: str) -> nn.Module:
    if isinstance(x, nn.Module):
        return x
    if isinstance(x, (str, Path)):
        from ..zoo.loading import load_model

        return load_model(x)[0]
    raise TypeError(f"The {role!r} parameter of {owner} must be a model (nn.Module) or a checkpoint folder. Got {type(x).__name__}.")


def scale_intruders(
    base,
    ft,
    lam: float,
    k: int = 10,
    eps: float = 0.5,
    which: str = "top",
    side: str = "left",
    modules: str | Iterable[str] | None = None,
    *,
    control: bool = False,
    seed: int = 0,
    cache: SVDCache | str | Path | bool | None = None,
    return_info: bool = False,
):
    """A copy of ``ft`` with its intruder dimensions scaled by ``lam`` (the paper's causal intervention).

    Shuttleworth et al. 2024 (arXiv 2410.21228), Sec. 5 / App. G: with ``W1 = W0 + dW = U S V^T``,

        W' = W0 + dW + (lam - 1) * u_i s_i v_i^T

    for the top intruder ``i`` of each matrix (``which="top"``, the paper) or for every intruder among the top k
    (``which="all"``, the variant of PEFT's ``reduce_intruder_dimension``, which also re-truncates the adapter to
    rank r). ``lam = 1`` changes nothing, ``lam = 0`` removes the direction, ``lam > 1`` amplifies it.

    Parameters
    ----------
    base, ft : models or checkpoint folders (``ft`` is loaded as a model; ``base`` may stream).
    lam : float >= 0
    k, eps, side, modules : as in :func:`spectral_report`.
    which : {"top", "all"}, default="top"
    control : bool, default=False
        Scale, in every matrix that has intruders, as many randomly chosen *non-intruder* singular directions
        of ``W1`` from its top k (if too few: from the next k) instead: the control of the causal test.
    seed : int, default=0
        Seeds the control's choice.
    return_info : bool, default=False
        Also return a DataFrame of the scaled directions (``name, rank, sigma, max_cos, intruder``).

    Returns
    -------
    nn.Module (and a DataFrame with ``return_info=True``)
        A new model; ``ft`` is not modified.
    """
    owner = "scale_intruders"
    lam = check_float(lam, "lam", owner, low=0.0)
    k, eps, side = _check_k_eps_side(k, eps, side, owner)
    check_option(which, "which", owner, ("top", "all"))
    seed = check_int(seed, "seed", owner)
    svd_cache = _resolve_cache(cache)
    out = copy.deepcopy(_as_model(ft, "ft", owner))
    view = ModelView(out)
    generator = torch.Generator().manual_seed(seed)
    info = []
    with ExitStack() as stack:
        src0 = _open_source(base, "base", owner)
        stack.callback(src0.close)
        src1 = _ModelSource(out, "ft")
        _check_same_architecture(src0, src1, owner)
        names = _select(src0.names, src0.kind, modules, owner)
        for name in names:
            W0, W1 = src0.matrix(name), view.get(name)
            if W0.shape != W1.shape:
                raise ValueError(f"The matrix {name} has shape {tuple(W0.shape)} in 'base' but {tuple(W1.shape)} in 'ft'.")
            _check_k_fits(k, W0.shape, name, owner)
            _check_finite(W0, f"{name} of 'base'")
            _check_finite(W1, f"{name} of 'ft'")
            _, B0 = _base_basis(W0, src0, name, side, svd_cache)
            U, S, V = _svd(W1)
            n_check = min(2 * k, len(S)) if control else k
            _, max_cos = _max_abs_cos((U if side == "left" else V)[:, :n_check], B0)
            intruders = [j for j in range(k) if float(max_cos[j]) < eps]
            if not intruders:
                continue
            chosen = intruders[:1] if which == "top" else intruders
            if control:
                pool = [j for j in range(k) if j not in intruders]
                if len(pool) < len(chosen):
                    pool += [j for j in range(k, n_check) if float(max_cos[j]) >= eps]
                if len(pool) < len(chosen):
                    raise ValueError(f"{owner}(control=True): {name} has too few non-intruder directions to scale.")
                picks = torch.randperm(len(pool), generator=generator)[: len(chosen)]
                chosen = sorted(pool[int(p)] for p in picks)
            idx = torch.tensor(chosen)
            W_new = W1 + (lam - 1.0) * (U[:, idx] * S[idx]) @ V[:, idx].T
            view.set(name, W_new)
            for j in chosen:
                info.append({"name": name, "rank": j + 1, "sigma": float(S[j]), "max_cos": float(max_cos[j]), "intruder": j in intruders})
    out.eval()
    if return_info:
        return out, pd.DataFrame(info, columns=["name", "rank", "sigma", "max_cos", "intruder"])
    return out


def subspace_overlap(
    base,
    ft_a,
    ft_b,
    i: int = 8,
    j: int = 8,
    side: str = "left",
    modules: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """Overlap of two fine-tunes' updates ``dW_a = A - W0`` and ``dW_b = B - W0``, matrix by matrix.

    Per matrix: the normalised subspace similarity ``phi`` of their top-``i`` and top-``j`` singular subspaces
    (Hu et al. 2021, LoRA, Sec. 7; :func:`subspace_similarity`), the random-subspace baseline
    ``max(i, j) / d``, and the smallest and mean principal angle in degrees. Streams like
    :func:`spectral_report`.
    """
    owner = "subspace_overlap"
    i = check_int(i, "i", owner, 1)
    j = check_int(j, "j", owner, 1)
    check_option(side, "side", owner, SIDES)
    rows = []
    with ExitStack() as stack:
        src0 = _open_source(base, "base", owner)
        stack.callback(src0.close)
        src_a = _open_source(ft_a, "ft_a", owner)
        stack.callback(src_a.close)
        src_b = _open_source(ft_b, "ft_b", owner)
        stack.callback(src_b.close)
        _check_same_architecture(src0, src_a, owner)
        _check_same_architecture(src0, src_b, owner)
        for name in _select(src0.names, src0.kind, modules, owner):
            W0 = src0.matrix(name)
            dA, dB = src_a.matrix(name) - W0, src_b.matrix(name) - W0
            if dA.shape != W0.shape or dB.shape != W0.shape:
                raise ValueError(f"The matrix {name} differs in shape between the checkpoints of {owner}.")
            ii, jj = min(i, min(W0.shape)), min(j, min(W0.shape))
            angles = principal_angles(dA, dB, ii, jj, side)
            d = W0.shape[0] if side == "left" else W0.shape[1]
            rows.append(
                {
                    "name": name,
                    "layer": int(name.split(".")[1]),
                    "kind": src0.kind(name),
                    "phi": subspace_similarity(dA, dB, ii, jj, side),
                    "phi_random": max(ii, jj) / d,
                    "min_angle_deg": float(torch.rad2deg(angles.min())),
                    "mean_angle_deg": float(torch.rad2deg(angles.mean())),
                }
            )
    return pd.DataFrame(rows)


__all__ = [
    "DEFAULT_CACHE",
    "IntruderResult",
    "SVDCache",
    "Spectra",
    "intruder_counts",
    "intruder_dimensions",
    "principal_angles",
    "scale_intruders",
    "singular_values",
    "spectra",
    "spectral_report",
    "subspace_overlap",
    "subspace_similarity",
    "summarize_report",
    "update_statistics",
]

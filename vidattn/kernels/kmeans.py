"""Batched k-means for semantic clustering of attention queries / keys (Sparse VideoGen 2 style).

One call clusters ``G`` independent point sets at once (G = heads, or batch x heads) with a fixed
number of Lloyd iterations. The assignment step
(``argmin_k |c_k|^2 - 2 x.c_k``; ``|x|^2`` is constant per point and dropped) runs as one fused
Triton kernel on CUDA (tensor-core dot products over centroid tiles with a running min/argmin, the
``[G, N, K]`` distance matrix is never stored) and as chunked batched matmuls + ``argmin`` elsewhere
(CPU, or ``VIDATTN_KMEANS_TRITON=0``); the update step is a ``scatter_add_`` of the points and
their counts. There is no host
synchronisation (no ``.item()``, ``.cpu()`` or data-dependent Python branch), so a call can be
captured in a CUDA graph and never stalls the stream.

Conventions (as in the Sparse VideoGen 2 code, ``svg/kmeans_utils.py``): the returned labels are
those of the *last assignment step* and the returned centroids those *after* the last update;
sizes count the returned labels; an empty cluster keeps its previous centroid.
"""

from __future__ import annotations

from typing import Optional, Tuple

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

__all__ = ["batched_kmeans", "kmeans_assign", "kmeans_assign_torch", "kmeans_assign_triton", "strided_init"]


if triton is not None:
    @triton.jit
    def _assign_kernel(X, C, CSQ, OUT, N, K, D, sxg, sxn, scg, sck,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < N
        d_ok = offs_d < D
        x = tl.load(X + g * sxg + offs_n[:, None] * sxn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            c = tl.load(C + g * scg + offs_k[:, None] * sck + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0)
            csq = tl.load(CSQ + g * K + offs_k, mask=k_ok, other=float("inf"))
            dist = csq[None, :] - 2.0 * tl.dot(x, tl.trans(c))  # [BLOCK_N, BLOCK_K], fp32 accumulate
            dmin = tl.min(dist, axis=1)
            amin = tl.argmin(dist, axis=1).to(tl.int32) + k0
            upd = dmin < best  # strict: the earlier tile (lower index) wins ties
            best = tl.where(upd, dmin, best)
            best_i = tl.where(upd, amin, best_i)
        tl.store(OUT + g * N + offs_n, best_i, mask=n_ok)


def _use_triton(x: torch.Tensor) -> bool:
    if triton is None or os.environ.get("VIDATTN_KMEANS_TRITON", "1") == "0":
        return False
    return x.is_cuda  # CPU (also under TRITON_INTERPRET): the torch path; tests call the kernel directly


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Fused nearest-centroid kernel. ``x`` ``[G, N, D]`` (its dtype is the dot-product dtype),
    ``centroids`` ``[G, K, D]``; returns int64 ``[G, N]``. D up to 512."""
    G, N, D = x.shape
    K = centroids.shape[1]
    if D > 512:
        raise ValueError(f"kmeans_assign_triton supports D <= 512, got {D}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    c = centroids.to(x.dtype).contiguous()
    csq = centroids.float().pow(2).sum(-1).contiguous()
    out = torch.empty(G, N, dtype=torch.int32, device=x.device)
    bd = max(16, triton.next_power_of_2(D))
    bn = 128 if bd <= 128 else (64 if bd <= 256 else 32)
    bk = 64 if bd <= 256 else 32
    grid = (triton.cdiv(N, bn), G)
    _assign_kernel[grid](x, c, csq, out, N, K, D, x.stride(0), x.stride(1), c.stride(0), c.stride(1),
                         BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, num_warps=4 if bn <= 64 else 8)
    return out.long()


def strided_init(x: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Deterministic initial centroids: ``num_clusters`` evenly spaced points of each set.

    Args:
        x: ``[G, N, D]`` float.
        num_clusters: K with ``1 <= K <= N``.
    Returns:
        float32 ``[G, K, D]``.
    """
    G, N, D = x.shape
    idx = (torch.arange(num_clusters, device=x.device) * N) // num_clusters
    return x.index_select(1, idx).float()


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Nearest centroid (squared Euclidean) of every point: the fused Triton kernel on CUDA,
    :func:`kmeans_assign_torch` otherwise (same arguments and result)."""
    if _use_triton(x) and x.shape[-1] <= 512:
        return kmeans_assign_triton(x, centroids)
    return kmeans_assign_torch(x, centroids, chunk)


def kmeans_assign_torch(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Nearest centroid (squared Euclidean) of every point, chunked batched matmuls.

    Args:
        x: ``[G, N, D]`` float (the cross term runs in x's dtype: bf16/fp16 inputs use tensor
            cores with fp32 accumulation inside the matmul; float32 inputs are exact float32).
        centroids: ``[G, K, D]`` float.
        chunk: tokens per distance block (memory ``G * chunk * K`` elements).
    Returns:
        int64 ``[G, N]`` labels in ``[0, K)`` (ties: lowest index).
    """
    G, N, D = x.shape
    c = centroids.to(x.dtype)
    c_sq = centroids.float().pow(2).sum(-1)  # [G, K]
    ct = c.transpose(1, 2)
    labels = torch.empty(G, N, dtype=torch.long, device=x.device)
    for n0 in range(0, N, chunk):  # static bounds: no host sync
        n1 = min(N, n0 + chunk)
        cross = torch.bmm(x[:, n0:n1], ct).float()  # [G, n, K]
        dist = torch.addcmul(c_sq[:, None, :], cross, torch.full((), -2.0, device=x.device))
        labels[:, n0:n1] = dist.argmin(-1)
    return labels


def batched_kmeans(x: torch.Tensor, num_clusters: int, iters: int, init: Optional[torch.Tensor] = None,
                   chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations of k-means on ``G`` point sets at once.

    Args:
        x: ``[G, N, D]`` float16/bfloat16/float32, any device.
        num_clusters: K, ``1 <= K <= N``.
        iters: number of iterations (>= 1; fixed, no tolerance test, so no host sync).
        init: float ``[G, K, D]`` warm-start centroids (e.g. the previous diffusion step's), or
            None for :func:`strided_init`.
        chunk: tokens per distance block in the assignment step.
    Returns:
        ``(labels, centroids, sizes)``: int64 ``[G, N]`` (last assignment), float32 ``[G, K, D]``
        (after the last update), int64 ``[G, K]`` (counts of ``labels``).
    Raises:
        ValueError: bad shapes or counts.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor [G, N, D], got {getattr(x, 'shape', type(x))}")
    G, N, D = x.shape
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= N:
        raise ValueError(f"num_clusters must be an int in [1, N={N}], got {num_clusters!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    K = num_clusters
    if init is None:
        cent = strided_init(x, K)
    else:
        if not isinstance(init, torch.Tensor) or tuple(init.shape) != (G, K, D):
            raise ValueError(f"init must be a float tensor [G={G}, K={K}, D={D}], got {getattr(init, 'shape', init)}")
        cent = init.to(device=x.device, dtype=torch.float32)
    xf = x.float()
    ones = torch.ones(G, N, dtype=torch.float32, device=x.device)
    labels = sizes = None
    for _ in range(iters):
        labels = kmeans_assign(x, cent, chunk)
        sums = torch.zeros(G, K, D, dtype=torch.float32, device=x.device)
        sums.scatter_add_(1, labels[..., None].expand(G, N, D), xf)
        cnt = torch.zeros(G, K, dtype=torch.float32, device=x.device).scatter_add_(1, labels, ones)
        cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1.0)[..., None], cent)
        sizes = cnt
    return labels, cent, sizes.long()

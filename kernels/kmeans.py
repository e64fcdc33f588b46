"""Batched k-means for semantic clustering of attention queries / keys (Sparse VideoGen 2 style).

One call clusters ``G`` independent point sets at once (G = heads, or batch x heads) with a fixed
number of Lloyd iterations. Everything is fused torch ops on the device: the assignment step is
one batched ``baddbmm`` (``|c|^2 - 2 x.c``; ``|x|^2`` is constant per point and dropped) and an
``argmin``, processed in token chunks so the ``[G, n, K]`` distance buffer stays bounded; the
update step is a ``scatter_add_`` of the points and their counts. There is no host
synchronisation (no ``.item()``, ``.cpu()`` or data-dependent Python branch), so a call can be
captured in a CUDA graph and never stalls the stream.

Conventions (as in the Sparse VideoGen 2 code, ``svg/kmeans_utils.py``): the returned labels are
those of the *last assignment step* and the returned centroids those *after* the last update;
sizes count the returned labels; an empty cluster keeps its previous centroid.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["batched_kmeans", "kmeans_assign", "strided_init"]


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
    """Nearest centroid (squared Euclidean) of every point.

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

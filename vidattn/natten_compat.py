"""NATTEN-compatible functional API: ``na1d / na2d / na3d`` on ``[B, *spatial, heads, D]``.

Same argument names and semantics as ``natten.na1d/na2d/na3d`` (0.21), so a NATTEN user can
switch by changing the import. Runs through :func:`vidattn.sparse_attention`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import sparse_attention
from .layout import TokenLayout
from .patterns.neighborhood import Neighborhood, check_na_against_grid, normalize_na_args

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention"]


def neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, na_dim: int, kernel_size,
                           stride=1, dilation=1, is_causal=False, scale: Optional[float] = None,
                           backend: str = "auto", return_lse: bool = False):
    """Neighborhood attention on ``[B, *spatial, heads, D]`` with ``len(spatial) == na_dim``.

    Args:
        query: ``[B, *spatial, H, D]``; key/value: ``[B, *spatial, Hk, D]`` (Hk divides H).
        kernel_size, stride, dilation, is_causal: int/bool or per-axis tuples (NATTEN semantics).
        scale: softmax scale, default ``D ** -0.5``.
        backend: vidattn backend (``"auto" | "reference" | "flex" | "triton"``).
        return_lse: also return the float32 log-sum-exp ``[B, *spatial, H]``.
    Returns:
        ``[B, *spatial, H, D]`` in query's dtype (and the lse).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != na_dim + 3:
            raise ValueError(f"{name} must have shape [B, {', '.join('XYZ'[:na_dim])}, heads, D] for na{na_dim}d "
                             f"({na_dim + 3} dims), got {tuple(t.shape)}")
    if key.shape[:-2] != query.shape[:-2] or value.shape[:-2] != query.shape[:-2]:
        raise ValueError(f"query, key and value must share [B, *spatial], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    spatial = tuple(query.shape[1:1 + na_dim])
    k, d, s, c = normalize_na_args(na_dim, kernel_size, dilation, stride, is_causal)
    check_na_against_grid(spatial, k, d)
    B, H, D = query.shape[0], query.shape[-2], query.shape[-1]
    layout = TokenLayout(spatial)
    flat = lambda t: t.reshape(B, layout.seq_len, t.shape[-2], t.shape[-1])  # noqa: E731
    pattern = Neighborhood(kernel_size=k, dilation=d, stride=s, is_causal=c)
    res = sparse_attention(flat(query), flat(key), flat(value), pattern, layout, backend=backend, scale=scale,
                           return_lse=return_lse)
    if return_lse:
        out, lse = res
        return out.reshape(query.shape[:-1] + (value.shape[-1],)), lse.transpose(1, 2).reshape(B, *spatial, H)
    return res.reshape(query.shape[:-1] + (value.shape[-1],))


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, backend="auto",
         return_lse=False):
    """1-D neighborhood attention, ``[B, L, heads, D]`` (see :func:`neighborhood_attention`)."""
    return neighborhood_attention(query, key, value, 1, kernel_size, stride, dilation, is_causal, scale, backend,
                                  return_lse)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, backend="auto",
         return_lse=False):
    """2-D neighborhood attention, ``[B, H, W, heads, D]`` (see :func:`neighborhood_attention`)."""
    return neighborhood_attention(query, key, value, 2, kernel_size, stride, dilation, is_causal, scale, backend,
                                  return_lse)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, backend="auto",
         return_lse=False):
    """3-D neighborhood attention, ``[B, T, H, W, heads, D]`` (see :func:`neighborhood_attention`)."""
    return neighborhood_attention(query, key, value, 3, kernel_size, stride, dilation, is_causal, scale, backend,
                                  return_lse)

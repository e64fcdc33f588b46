"""NATTEN-compatible functional API: ``na1d / na2d / na3d`` on ``[B, *spatial, heads, D]``.

Same signature, argument names and semantics as ``natten.na1d/na2d/na3d`` (0.21), so NATTEN code
runs with only the import changed. Runs through :func:`vidattn.sparse_attention`
(:class:`~vidattn.patterns.neighborhood.Neighborhood` pattern).

NATTEN's keywords, and what vidattn does with them:

* ``kernel_size``, ``stride``, ``dilation``, ``is_causal``, ``scale``: NATTEN semantics, exact.
* ``additional_keys`` / ``additional_values`` ``[B, S_add, heads_kv, D]`` / ``[..., D_v]``:
  extra keys that every query attends besides its neighborhood, merged into one softmax
  (computed as NATTEN does: a dense cross-attention over the extra tokens merged with the
  neighborhood output through their log-sum-exps; exact up to float rounding).
* ``return_lse``: also return the float32 log-sum-exp ``[B, *spatial, heads]`` (of the merged
  softmax when additional keys are given).
* ``backend``: NATTEN names are accepted: ``None``, ``"cutlass-fna"``, ``"hopper-fna"``,
  ``"blackwell-fna"`` run vidattn's ``"auto"`` backend (the fused Triton kernel on CUDA, the
  reference on CPU), ``"flex-fna"`` runs ``"flex"``; vidattn's own names (``"auto"``,
  ``"reference"``, ``"flex"``, ``"triton"``) are accepted too.
* ``q_tile_shape``: honoured: the plan tiles tokens in that shape and uses
  ``prod(q_tile_shape)`` token blocks (the Triton kernel needs a power of two in [16, 256]; other
  sizes fall back to flex/reference). It changes speed only, never the result.
* ``kv_tile_shape``: accepted and checked; keys are always cut into the query tiles (one
  token order for queries and keys), so it has no further effect.
* ``backward_q_tile_shape``, ``backward_kv_tile_shape``, ``backward_kv_splits``,
  ``backward_use_pt_reduction``, ``run_persistent_kernel``, ``kernel_schedule``,
  ``torch_compile``, ``attention_kwargs``: accepted and ignored (CUTLASS/Flex tuning knobs of
  NATTEN's own kernels; vidattn's backward and cross-attention have no such settings).

``torch.compile(fullgraph=True)`` traces these functions without a graph break: under
compilation the neighborhood attention runs as the custom op ``vidattn::neighborhood_attn``
(pattern and plan are built inside the op from plain ints, cached per value), and the
additional-keys merge is plain torch code.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .attention import BACKENDS, sparse_attention
from .layout import TokenLayout
from .patterns.neighborhood import Neighborhood, check_na_against_grid, normalize_na_args

__all__ = ["na1d", "na2d", "na3d", "neighborhood_attention", "NATTEN_BACKENDS"]

# NATTEN backend name -> vidattn backend
NATTEN_BACKENDS = {"cutlass-fna": "auto", "hopper-fna": "auto", "blackwell-fna": "auto", "flex-fna": "flex"}
_ADDITIONAL_CHUNK = 4096  # queries per chunk of the additional-keys cross-attention


def _vidattn_backend(backend) -> str:
    if backend is None:
        return "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend in NATTEN_BACKENDS:
        return NATTEN_BACKENDS[backend]
    if backend in BACKENDS:
        return backend
    raise ValueError(f"backend must be None, one of NATTEN's {sorted(NATTEN_BACKENDS)} or one of vidattn's "
                     f"{list(BACKENDS)}, got {backend!r}")


def _tile_arg(name, value, na_dim) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * na_dim
    if (not isinstance(value, (tuple, list)) or len(value) != na_dim
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise ValueError(f"{name} must be a tuple of {na_dim} positive ints (one per axis), got {value!r}")
    return tuple(value)


# ----------------------------------------------------------------------------- compiled path
_patterns: Dict[tuple, Neighborhood] = {}


def _pattern(kernel_size, dilation, stride, is_causal, tile) -> Neighborhood:
    """The Neighborhood of these plain values (one object per value, so its plan cache is reused)."""
    key = (tuple(kernel_size), tuple(dilation), tuple(stride), tuple(is_causal), tuple(tile))
    pat = _patterns.get(key)
    if pat is None:
        if len(_patterns) > 256:
            _patterns.clear()
        pat = Neighborhood(kernel_size=key[0], dilation=key[1], stride=key[2], is_causal=key[3],
                           tile_shape=key[4] or None, block_size=math.prod(key[4]) if key[4] else None)
        _patterns[key] = pat
    return pat


@torch.library.custom_op("vidattn::neighborhood_attn", mutates_args=())
def _na_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: List[int], kernel_size: List[int],
           dilation: List[int], stride: List[int], is_causal: List[bool], tile: List[int], backend: str,
           scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    pat = _pattern(kernel_size, dilation, stride, is_causal, tile)
    out, lse = sparse_attention(q, k, v, pat, TokenLayout(tuple(grid)), backend=backend, scale=scale,
                                return_lse=True)
    return out.contiguous(), lse.contiguous()


@_na_op.register_fake
def _na_op_fake(q, k, v, grid, kernel_size, dilation, stride, is_causal, tile, backend, scale):
    B, S, H, _ = q.shape
    return q.new_empty(B, S, H, v.shape[-1]), q.new_empty(B, H, S, dtype=torch.float32)


_pool = None


def _worker():
    global _pool
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidattn-na-backward")
    return _pool


@torch.library.custom_op("vidattn::neighborhood_attn_backward", mutates_args=())
def _na_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor,
               grid: List[int], kernel_size: List[int], dilation: List[int], stride: List[int],
               is_causal: List[bool], tile: List[int], scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pat = _pattern(kernel_size, dilation, stride, is_causal, tile)

    def vjp():  # exact reference recomputation under autograd
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            out, lse = sparse_attention(qq, kk, vv, pat, TokenLayout(tuple(grid)), backend="reference",
                                        scale=scale, return_lse=True)
            return torch.autograd.grad((out, lse), (qq, kk, vv), (grad_out, grad_lse), allow_unused=True)

    # a custom op's body runs with autograd dispatch excluded (thread-local): recompute on a worker
    # thread, whose dispatch state is the default one
    gq, gk, gv = _worker().submit(vjp).result()
    zero = lambda g, t: torch.zeros_like(t) if g is None else g.contiguous()  # noqa: E731
    return zero(gq, q), zero(gk, k), zero(gv, v)


@_na_bwd_op.register_fake
def _na_bwd_fake(q, k, v, grad_out, grad_lse, grid, kernel_size, dilation, stride, is_causal, tile, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _na_setup(ctx, inputs, output):
    q, k, v, *args = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = args


def _na_backward(ctx, grad_out, grad_lse):
    """Backward of ``vidattn::neighborhood_attn``: one opaque op (traceable by AOT autograd)."""
    q, k, v = ctx.saved_tensors
    grid, kernel_size, dilation, stride, is_causal, tile, _backend, scale = ctx.args
    if grad_out is None:
        grad_out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    if grad_lse is None:
        grad_lse = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
    gq, gk, gv = _na_bwd_op(q, k, v, grad_out, grad_lse, grid, kernel_size, dilation, stride, is_causal, tile, scale)
    return gq, gk, gv, None, None, None, None, None, None, None, None


_na_op.register_autograd(_na_backward, setup_context=_na_setup)


# ----------------------------------------------------------------------------- additional keys
def _cross_attention_lse(q, k, v, scale):
    """Dense attention of ``q [B, N, H, D]`` over ``k [B, M, Hk, D]``, ``v [B, M, Hk, Dv]``.
    Returns float32 ``out [B, N, H, Dv]`` and ``lse [B, N, H]`` (chunked over queries)."""
    H, Hk = q.shape[2], k.shape[2]
    kf = k.float().repeat_interleave(H // Hk, dim=2) if Hk != H else k.float()
    vf = v.float().repeat_interleave(H // Hk, dim=2) if Hk != H else v.float()
    outs, lses = [], []
    for s0 in range(0, q.shape[1], _ADDITIONAL_CHUNK):
        logits = torch.einsum("bnhd,bmhd->bhnm", q[:, s0:s0 + _ADDITIONAL_CHUNK].float(), kf) * scale
        lse = torch.logsumexp(logits, dim=-1)  # [B, H, n]
        p = torch.exp(logits - lse[..., None])
        outs.append(torch.einsum("bhnm,bmhd->bnhd", p, vf))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _merge(out1, lse1, out2, lse2):
    """Merge two softmax partials (float32 ``out [B, N, H, Dv]``, ``lse [B, N, H]``)."""
    lse = torch.logaddexp(lse1, lse2)
    w1, w2 = torch.exp(lse1 - lse)[..., None], torch.exp(lse2 - lse)[..., None]
    return out1 * w1 + out2 * w2, lse


# ----------------------------------------------------------------------------- public API
def neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, na_dim: int, kernel_size,
                           stride=1, dilation=1, is_causal=False, scale: Optional[float] = None,
                           additional_keys: Optional[torch.Tensor] = None,
                           additional_values: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                           q_tile_shape=None, kv_tile_shape=None, return_lse: bool = False):
    """Neighborhood attention on ``[B, *spatial, heads, D]`` with ``len(spatial) == na_dim``.

    Args:
        query: ``[B, *spatial, H, D]``; key: ``[B, *spatial, Hk, D]``; value: ``[B, *spatial, Hk, Dv]``
            (Hk divides H); float16/bfloat16/float32.
        kernel_size, stride, dilation, is_causal: int/bool or per-axis tuples (NATTEN semantics).
        scale: softmax scale, default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, M, Hk, D]`` / ``[B, M, Hk, Dv]`` or None: keys
            every query attends besides its neighborhood (one softmax over both).
        backend: NATTEN or vidattn backend name (see the module docstring), None = auto.
        q_tile_shape: per-axis token tile of the plan (block = its product) or None (automatic).
        kv_tile_shape: accepted for NATTEN compatibility (keys use the query tiles).
        return_lse: also return the float32 log-sum-exp ``[B, *spatial, H]``.
    Returns:
        ``[B, *spatial, H, Dv]`` in query's dtype (and the lse).
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
    vb = _vidattn_backend(backend)
    tile = _tile_arg("q_tile_shape", q_tile_shape, na_dim)
    _tile_arg("kv_tile_shape", kv_tile_shape, na_dim)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must both be tensors or both be None")
    if additional_keys is not None:
        for name, t in (("additional_keys", additional_keys), ("additional_values", additional_values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a tensor [B, seqlen_kv, heads_kv, D], got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        ak, av = additional_keys, additional_values
        if (ak.shape[0] != query.shape[0] or ak.shape[2] != key.shape[-2] or ak.shape[3] != key.shape[-1]
                or av.shape[:3] != ak.shape[:3] or av.shape[3] != value.shape[-1]):
            raise ValueError(f"additional_keys {tuple(ak.shape)} / additional_values {tuple(av.shape)} must be "
                             f"[B={query.shape[0]}, seqlen_kv, heads_kv={key.shape[-2]}, D={key.shape[-1]}] / "
                             f"[..., Dv={value.shape[-1]}]")
    spatial = tuple(query.shape[1:1 + na_dim])
    k, d, s, c = normalize_na_args(na_dim, kernel_size, dilation, stride, is_causal)
    check_na_against_grid(spatial, k, d)
    B, H, D = query.shape[0], query.shape[-2], query.shape[-1]
    N = math.prod(spatial)
    scale = float(D ** -0.5 if scale is None else scale)
    flat = lambda t: t.reshape(B, N, t.shape[-2], t.shape[-1])  # noqa: E731
    q, kk, v = flat(query), flat(key), flat(value)
    if torch.compiler.is_compiling():
        out, lse = _na_op(q, kk, v, list(spatial), list(k), list(d), list(s), list(c), list(tile or ()), vb, scale)
    else:
        pattern = _pattern(k, d, s, c, tile or ())
        out, lse = sparse_attention(q, kk, v, pattern, TokenLayout(spatial), backend=vb, scale=scale,
                                    return_lse=True)
    lse = lse.transpose(1, 2)  # [B, N, H]
    if additional_keys is not None:
        out2, lse2 = _cross_attention_lse(q, additional_keys, additional_values, scale)
        out, lse = _merge(out.float(), lse.float(), out2, lse2)
        out = out.to(query.dtype)
    out = out.reshape(query.shape[:-1] + (value.shape[-1],))
    if return_lse:
        return out, lse.reshape(B, *spatial, H)
    return out


_NATTEN_DOC = """{n}-D neighborhood attention, ``{shape}`` (NATTEN's ``na{n}d`` signature; see
    :func:`neighborhood_attention` for the arguments and the module docstring for what each NATTEN
    keyword does here). Returns ``[B, *spatial, heads, Dv]`` (and the float32 lse
    ``[B, *spatial, heads]`` with ``return_lse=True``)."""


def _na(n):
    def fn(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, attention_kwargs=None, backend=None, q_tile_shape=None, kv_tile_shape=None,
           backward_q_tile_shape=None, backward_kv_tile_shape=None, backward_kv_splits=None,
           backward_use_pt_reduction=False, run_persistent_kernel=True, kernel_schedule=None, torch_compile=False,
           return_lse=False):
        return neighborhood_attention(query, key, value, n, kernel_size, stride, dilation, is_causal, scale,
                                      additional_keys, additional_values, backend, q_tile_shape, kv_tile_shape,
                                      return_lse)

    fn.__name__ = fn.__qualname__ = f"na{n}d"
    fn.__doc__ = _NATTEN_DOC.format(n=n, shape=("[B, L, heads, D]", "[B, H, W, heads, D]",
                                                "[B, T, H, W, heads, D]")[n - 1])
    return fn


na1d = _na(1)
na2d = _na(2)
na3d = _na(3)

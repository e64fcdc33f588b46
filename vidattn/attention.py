"""``sparse_attention``: validate inputs, compile the pattern to a plan, pick a backend, run it.

Backends (all execute the same :class:`~vidattn.plan.BlockPlan`):

* ``"reference"`` — exact pure PyTorch, chunked (``vidattn.kernels.reference``);
* ``"flex"`` — torch FlexAttention ``BlockMask`` built from the plan (``vidattn.kernels.flex``);
* ``"triton"`` — the fused Triton kernel (``vidattn.kernels.sparse_flash``);
* ``"auto"`` — triton on CUDA, reference on CPU.

A backend that cannot handle a case raises ``BackendUnsupported`` internally; the dispatcher
then falls back (triton -> flex -> reference) with a one-time warning naming the reason.

A plan's output *epilogue* (``Rectification.out_scale`` / ``out_shift``, RectifiedSparse's
authors' method) is applied here, in :func:`run_plan`, after whichever backend ran: backends
receive the plan without those terms and compute plain block-sparse attention.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import replace
from typing import Callable, Dict, Optional

import torch

from .errors import BackendUnsupported
from .layout import TokenLayout
from .patterns.base import Pattern
from .plan import BlockPlan

__all__ = ["sparse_attention", "run_plan", "register_backend", "BackendUnsupported", "available_backends",
           "check_qkv", "add_observer", "apply_epilogue", "backend_plan"]

log = logging.getLogger("vidattn")

BACKENDS = ("reference", "flex", "triton", "auto")


_registry: Dict[str, Callable] = {}
_warned: set = set()
_observers: Dict[int, Callable] = {}


class _ObserverHandle:
    def __init__(self, key):
        self.key = key

    def remove(self):
        _observers.pop(self.key, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def add_observer(fn: Callable) -> _ObserverHandle:
    """Call ``fn(q, k, v, plan, out, scale)`` after every :func:`run_plan` (q/k/v/out
    ``[B, S, H, D]``). Used by the quality probes. Returns a handle with ``remove()`` (also a
    context manager). Observers must not modify their arguments."""
    key = id(fn) ^ len(_observers) << 48
    _observers[key] = fn
    return _ObserverHandle(key)


def register_backend(name: str, fn: Callable) -> None:
    """Register ``fn(q, k, v, plan, scale, return_lse)`` under ``name`` (q/k/v ``[B, S, H, D]``)."""
    _registry[name] = fn


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)


def _get_backend(name: str) -> Callable:
    if name in _registry:
        return _registry[name]
    if name == "reference":
        from vidattn.kernels.reference import block_sparse_attention_reference as fn
    elif name == "flex":
        from vidattn.kernels.flex import block_sparse_attention_flex as fn
    elif name == "triton":
        try:
            # the differentiable wrapper (Triton backward from the saved LSE); plain forward without grad
            from vidattn.kernels.sparse_flash_autograd import block_sparse_attention_triton_autograd as fn
        except ImportError as e:  # kernel module missing or triton not installed
            raise BackendUnsupported(f"triton backend unavailable: {e}") from e
    else:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _registry[name] = fn
    return fn


def available_backends(device: torch.device | str = "cpu") -> Dict[str, str]:
    """Map backend name -> 'ok' or the reason it cannot run on ``device``."""
    dev = torch.device(device)
    out = {"reference": "ok"}
    try:
        from torch.nn.attention import flex_attention as _flex  # noqa: F401  (plain `import torch.x` would make torch local)
        out["flex"] = "ok" if dev.type == "cuda" else "ok (eager, slow on CPU)"
    except Exception as e:  # pragma: no cover
        out["flex"] = f"unavailable: {e}"
    try:
        _get_backend("triton")
        out["triton"] = "ok" if dev.type == "cuda" else "interpreter only (TRITON_INTERPRET=1)"
    except BackendUnsupported as e:
        out["triton"] = str(e)
    return out


def check_qkv(q, k, v, layout: Optional[TokenLayout] = None) -> None:
    """Validate ``q [B, S, H, D]``, ``k``/``v [B, S, Hk, D]`` (Hk divides H), float dtypes, same
    device; and ``S`` against ``layout``. Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, S, heads, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, S, heads, D], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, S, H, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != S or v.shape[1] != S:
        raise ValueError(f"k and v must have the same sequence length as q ({S}) [self-attention], got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    if H % k.shape[2] != 0:
        raise ValueError(f"k/v heads ({k.shape[2]}) must divide q heads ({H}) for GQA/MQA")
    if k.shape[3] != D:
        raise ValueError(f"k head dim {k.shape[3]} must equal q head dim {D}")
    if layout is not None:
        layout.check_seq_len(S, name="q")


_backend_plans: "weakref.WeakKeyDictionary[BlockPlan, BlockPlan]" = weakref.WeakKeyDictionary()


def backend_plan(plan: BlockPlan) -> BlockPlan:
    """The plan a backend executes: ``plan`` without its output epilogue (``out_scale`` /
    ``out_shift``). Returns ``plan`` itself when it has no epilogue; otherwise one stripped copy
    per plan object (cached weakly, so per-plan backend caches such as flex's BlockMask keep
    working across calls)."""
    rect = plan.rectification
    if rect is None or not rect.has_epilogue:
        return plan
    out = _backend_plans.get(plan)
    if out is None:
        out = replace(plan, rectification=rect.without_epilogue())
        _backend_plans[plan] = out
    return out


def _token_blocks(plan: BlockPlan, device) -> torch.Tensor:
    """Int64 ``[Hx, S]`` (Hx = perm heads or 1): plan query block of each *original* token."""
    S = plan.seq_len
    blk = torch.arange(S, device=device) // plan.block_q  # block of each plan position
    if plan.perm is None:
        return blk[None]
    perm = plan.perm.to(device)
    out = torch.empty_like(perm)
    return out.scatter_(1, perm, blk.expand_as(perm).contiguous())


def apply_epilogue(out: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Apply the plan's output epilogue: ``out_i = out_scale[b, h, qb(i)] * out_i + out_shift[b, h, qb(i)]``
    with ``qb(i)`` the plan query block of token ``i`` (through ``plan.perm``).

    Args:
        out: ``[B, S, H, Dv]`` sparse attention output in original token order (any float dtype).
        plan: the plan (``Bp in {1, B}``, ``Hp in {1, H}``).
    Returns:
        ``out`` itself if the plan has no epilogue, else a new ``[B, S, H, Dv]`` tensor in
        ``out``'s dtype (computed in float32). Pure torch ops (traceable, differentiable in ``out``);
        memory ``O(B * S * H * Dv)``.
    """
    rect = plan.rectification
    if rect is None or not rect.has_epilogue:
        return out
    blk = _token_blocks(plan, out.device)  # [Hx, S]
    res = out.float()
    if rect.out_scale is not None:
        sc = rect.out_scale.to(out.device, torch.float32)  # [Bp, Hp, NQB]
        hx = max(sc.shape[1], blk.shape[0])
        idx = blk.expand(hx, -1)[None].expand(sc.shape[0], -1, -1)
        tok = torch.gather(sc.expand(-1, hx, -1), 2, idx)  # [Bp, Hx, S]
        res = res * tok.transpose(1, 2)[..., None]
    if rect.out_shift is not None:
        sh = rect.out_shift.to(out.device, torch.float32)  # [Bp, Hp, NQB, Dv]
        if sh.shape[-1] != out.shape[-1]:
            raise ValueError(f"plan out_shift has value dim {sh.shape[-1]} but the output has {out.shape[-1]}")
        hx = max(sh.shape[1], blk.shape[0])
        idx = blk.expand(hx, -1)[None, :, :, None].expand(sh.shape[0], -1, -1, sh.shape[-1])
        tok = torch.gather(sh.expand(-1, hx, -1, -1), 2, idx)  # [Bp, Hx, S, Dv]
        res = res + tok.transpose(1, 2)
    return res.to(out.dtype)


def _check_not_detached(name: str, out: torch.Tensor, q, k, v) -> None:
    """A grad-requiring input must never get a silently detached output (a LoRA on the attention
    projections would receive no gradient): raise instead."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) and not out.requires_grad:
        raise RuntimeError(f"vidattn: backend {name!r} returned an output without grad_fn for inputs that require "
                           "grad; run under torch.no_grad() or use a differentiable backend")


def run_plan(q, k, v, plan: BlockPlan, backend: str = "auto", scale: Optional[float] = None,
             return_lse: bool = False):
    """Execute a prebuilt plan on ``q [B, S, H, D]``, ``k/v [B, S, Hk, D]``; see
    :func:`sparse_attention`. Falls back triton -> flex -> reference with a one-time warning.

    The backend runs :func:`backend_plan` (the plan without its output epilogue); the epilogue,
    if any, is then applied here by :func:`apply_epilogue`, identically for every backend. The
    LSE returned with ``return_lse`` is that of the sparse softmax only (what the backend
    computed): the epilogue is not a softmax over a key set, so it has no log-sum-exp; do not
    merge an epilogue plan's output with other attention partials through its LSE."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    B, S, H, _ = q.shape
    if plan.seq_len != S:
        raise ValueError(f"plan was built for {plan.seq_len} tokens but q has {S}")
    if plan.plan_batch not in (1, B) or plan.plan_heads not in (1, H):
        raise ValueError(f"plan batch/heads {plan.plan_batch}/{plan.plan_heads} do not fit q {tuple(q.shape)}")
    if plan.device != q.device:
        plan = plan.to(q.device)
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "reference"
    chain = {"triton": ["triton", "flex", "reference"], "flex": ["flex", "reference"], "reference": ["reference"]}[backend]
    last_err = None
    bplan = backend_plan(plan)
    for i, name in enumerate(chain):
        try:
            fn = _get_backend(name)
            res = fn(q, k, v, bplan, scale=scale, return_lse=return_lse)
            _check_not_detached(name, res[0] if return_lse else res, q, k, v)
            if bplan is not plan:
                res = (apply_epilogue(res[0], plan), res[1]) if return_lse else apply_epilogue(res, plan)
            if _observers:
                out = res[0] if return_lse else res
                for obs in list(_observers.values()):
                    obs(q, k, v, plan, out, scale)
            return res
        except (BackendUnsupported, NotImplementedError) as e:
            last_err = e
        except Exception as e:  # flex raises its own error types
            if name == "reference" or type(e).__name__ not in ("FlexUnsupported", "TritonUnsupported"):
                raise
            last_err = e
        nxt = chain[i + 1]
        _warn_once(f"{name}->{nxt}:{type(last_err).__name__}:{last_err}",
                   f"vidattn: backend {name!r} cannot run this case ({last_err}); falling back to {nxt!r}")
    raise RuntimeError(f"no backend could run this case: {last_err}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, layout: TokenLayout,
                     backend: str = "auto", scale: Optional[float] = None, return_lse: bool = False):
    """Sparse attention of ``pattern`` over ``layout``.

    Args:
        q: ``[B, S, H, D]`` float16/bfloat16/float32.
        k, v: ``[B, S, Hk, D]`` (Hk divides H: GQA/MQA), same dtype/device as q.
        pattern: a :class:`~vidattn.patterns.base.Pattern` (Neighborhood, Dense, Radial, ...).
        layout: :class:`~vidattn.layout.TokenLayout` with ``seq_len == S``.
        backend: ``"reference" | "flex" | "triton" | "auto"``.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return float32 log-sum-exp ``[B, H, S]``.
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the lse).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Dense, ...), got {type(pattern).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a vidattn.TokenLayout, got {type(layout).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_qkv(q, k, v, layout)
    pattern.validate(layout)
    if getattr(pattern, "needs_values", False):  # e.g. RectifiedSparse: pooled V columns, scale-aware selection
        plan = pattern.plan(layout, q, k, v=v, scale=scale, num_heads=q.shape[2], device=q.device)
    else:
        plan = pattern.plan(layout, q, k, num_heads=q.shape[2], device=q.device)
    return run_plan(q, k, v, plan, backend=backend, scale=scale, return_lse=return_lse)

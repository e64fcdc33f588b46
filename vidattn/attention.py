"""``sparse_attention``: validate inputs, compile the pattern to a plan, pick a backend, run it.

Backends (all execute the same :class:`~vidattn.plan.BlockPlan`, registered in
:mod:`vidattn.backends`, each declaring what it can run):

* ``"reference"`` — exact pure PyTorch, chunked (``vidattn.kernels.reference``);
* ``"cpu"`` — per query block, SDPA over its gathered key blocks (``vidattn.kernels.cpu_gather``);
* ``"flex"`` — torch FlexAttention ``BlockMask`` built from the plan (``vidattn.kernels.flex``);
* ``"triton"`` — the fused Triton kernel (``vidattn.kernels.sparse_flash``);
* ``"auto"`` — the first of triton (CUDA) / cpu (CPU) / flex (CUDA, e.g. with gradients) / reference
  that can run the case.

A backend that cannot run a case says so (``can_run`` before the call, or
``BackendUnsupported`` during it); the dispatcher then falls back along the backend's chain
(triton -> flex -> reference, cpu -> reference) with a one-time warning naming the reason. Any
other exception inside a backend is a bug and propagates.

A plan's output *epilogue* (``Rectification.out_scale`` / ``out_shift``, RectifiedSparse's
authors' method) is applied here, in :func:`run_plan`, after whichever backend ran: backends
receive the plan without those terms and compute plain block-sparse attention.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import weakref
from dataclasses import replace
from typing import Callable, Dict, Optional

import contextlib
import contextvars

import torch

from . import backends as _backends
from .backends import _warned, backend_names, grad_required, register_backend  # noqa: F401  (_warned: tests)
from .errors import BackendUnsupported
from .layout import TokenLayout
from .patterns.base import Pattern
from .plan import BlockPlan

__all__ = ["sparse_attention", "run_plan", "precision", "register_backend", "BackendUnsupported", "available_backends",
           "check_qkv", "add_observer", "apply_epilogue", "backend_plan", "BACKENDS"]

log = logging.getLogger("vidattn")

BACKENDS = ("reference", "cpu", "flex", "triton", "auto")  # the built-ins (vidattn.backends.backend_names(): all)

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


def available_backends(device: torch.device | str = "cpu") -> Dict[str, str]:
    """Map backend name -> 'ok' or the reason it cannot run on ``device`` (a tiny float16 dense
    probe case; a backend may still refuse particular plans or dtypes)."""
    from .plan import FULL, plan_from_block_mask

    dev = torch.device(device)
    x = torch.zeros(1, 16, 1, 16, dtype=torch.float16 if dev.type == "cuda" else torch.float32, device=dev)
    cls = torch.full((1, 1, 1, 1), FULL, dtype=torch.int8, device=dev)
    plan = plan_from_block_mask(cls, seq_len=16, block_q=16, block_k=16, rule=None, token_density=1.0)
    out = {}
    for name in backend_names():
        if name == "auto":
            continue
        ok, why = _backends.get_backend(name).can_run(plan, x, x, x)
        out[name] = "ok" if ok else why
    return out


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q, k, v, layout: Optional[TokenLayout] = None) -> None:
    """Validate ``q [B, S, H, D]``, ``k``/``v [B, S, Hk, D]`` (Hk divides H; every dimension >= 1),
    one dtype of float16/bfloat16/float32/float64 (float8 and integer tensors are rejected), one
    device; and ``S`` against ``layout``. Raises ``TypeError``/``ValueError`` naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, S, heads, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, S, heads, D], got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")
        for dim, label in zip(t.shape, ("batch size B", "sequence length S", "heads", "head dim D")):
            if dim < 1:
                raise ValueError(f"{name} must have {label} >= 1, got shape {tuple(t.shape)} [B, S, heads, D]")
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


def check_scale(scale) -> Optional[float]:
    """``None`` (``D ** -0.5``) or a finite real number, returned as a float. Raises ``TypeError``
    for other types (strings, tensors, bools) and ``ValueError`` for NaN / infinite values."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _finite_check_off() -> bool:
    """No finiteness pass while compiling or capturing a CUDA graph (it needs one host sync), or
    with ``VIDATTN_CHECK_FINITE=0`` (then non-finite inputs give whatever the backend computes)."""
    if torch.compiler.is_compiling() or os.environ.get("VIDATTN_CHECK_FINITE", "1") == "0":
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


PROFILER_RANGES = True  # run_plan and the processors emit torch.profiler ranges (vidattn.bench.breakdown reads them)


def _profiler_range(name: str):
    """A ``torch.profiler.record_function`` range in eager mode (a no-op context while compiling)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


def _all_finite(*tensors: torch.Tensor) -> bool:
    """True when every entry of ``tensors`` (any float dtype and shape) is finite: one read pass per
    tensor (a float32 / float64 sum, which is non-finite whenever an entry is) and one host sync. A
    sum of finite entries can overflow; such inputs then take the guarded path, which returns the
    same result, only slower."""
    sums = [t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double() for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())


def _run_guarded(be, q, k, v, plan: BlockPlan, scale, return_lse):
    """``be.run`` with the documented non-finite semantics (see :func:`sparse_attention`).

    Finite inputs (the normal case: one fused check, one host sync) run unchanged. Otherwise the
    backend runs on inputs with the non-finite entries zeroed, plus one indicator pass (float32)
    whose output is, per row and channel, the softmax weight on non-finite value entries or
    non-finite key tokens; entries with a non-zero weight, and rows of non-finite queries, are set
    to NaN."""
    if _finite_check_off() or _all_finite(q, k, v):
        return be.run(q, k, v, plan, scale=scale, return_lse=return_lse)
    q_bad = ~torch.isfinite(q).all(-1, keepdim=True)  # [B, S, H, 1]
    k_bad = ~torch.isfinite(k).all(-1, keepdim=True)  # [B, S, Hk, 1]
    v_bad = ~torch.isfinite(v)  # [B, S, Hk, Dv]
    q0, k0, v0 = q.masked_fill(q_bad, 0), k.masked_fill(k_bad, 0), v.masked_fill(v_bad, 0)
    res = be.run(q0, k0, v0, plan, scale=scale, return_lse=return_lse)
    out, lse = (res if return_lse else (res, None))
    qf, kf = q0.detach().float(), k0.detach().float()
    with torch.no_grad():
        hit = be.run(qf, kf, (v_bad | k_bad).float(), plan, scale=scale) > 0  # [B, S, H, Dv]
    nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    out = torch.where(hit | q_bad, nan, out)
    if lse is None:
        return out
    with torch.no_grad():
        k_hit = q_bad[..., 0]
        if bool(k_bad.any()):
            k_hit = k_hit | (be.run(qf, kf, k_bad.float().expand_as(v).contiguous(), plan, scale=scale)[..., 0] > 0)
    return out, lse.masked_fill(k_hit.transpose(1, 2), float("nan"))


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


_PRECISION: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("vidattn_precision", default=None)


@contextlib.contextmanager
def precision(name: Optional[str]):
    """Context manager: every vidattn attention call inside it that names no ``precision`` of its
    own runs in ``name`` (None, ``"fp8"``, ``"int8"`` or ``"int8_fp8"``; see
    :func:`sparse_attention`), e.g. a whole pipeline call::

        with vidattn.precision("fp8"):
            video = pipe(...)

    Calls that diffusers or timm run without vidattn (dense layers vidattn leaves alone) are not
    affected. A backend that cannot run the precision is skipped like any other "cannot"; if none
    can, the call raises (no silent fallback to another precision). Per thread / async context."""
    token = _PRECISION.set(_backends.check_precision(name))
    try:
        yield
    finally:
        _PRECISION.reset(token)


def run_plan(q, k, v, plan: BlockPlan, backend: str = "auto", scale: Optional[float] = None,
             return_lse: bool = False, precision: Optional[str] = None):
    """Execute a prebuilt plan on ``q [B, S, H, D]``, ``k/v [B, S, Hk, D]``; see
    :func:`sparse_attention`. A backend that cannot run the case is skipped along its fallback
    chain with a one-time warning; an exception inside a backend propagates.

    The backend runs :func:`backend_plan` (the plan without its output epilogue); the epilogue,
    if any, is then applied here by :func:`apply_epilogue`, identically for every backend. The
    LSE returned with ``return_lse`` is that of the sparse softmax only (what the backend
    computed): the epilogue is not a softmax over a key set, so it has no log-sum-exp; do not
    merge an epilogue plan's output with other attention partials through its LSE."""
    names = backend_names()
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")
    scale = check_scale(scale)
    precision = _backends.check_precision(precision if precision is not None else _PRECISION.get())
    B, S, H, _ = q.shape
    if plan.seq_len != S:
        raise ValueError(f"plan was built for {plan.seq_len} tokens but q has {S}")
    if plan.plan_batch not in (1, B) or plan.plan_heads not in (1, H):
        raise ValueError(f"plan batch/heads {plan.plan_batch}/{plan.plan_heads} do not fit q {tuple(q.shape)}")
    if plan.device != q.device:
        plan = plan.to(q.device)
    bplan = backend_plan(plan)
    tried: tuple = ()
    while True:
        be = _backends.choose_backend(backend, bplan, q, k, v, skip=tried, precision=precision)
        try:
            with _profiler_range("vidattn::run_plan"):
                # a precision other than None binds into the backend's run (the non-finite
                # indicator passes then run in that precision too, consistent with its output)
                res = _run_guarded(_backends.with_precision(be, precision), q, k, v, bplan, scale, return_lse)
        except BackendUnsupported as e:  # declared while running (e.g. the kernel does not fit the GPU)
            tried += (be.name,)
            _backends.warn_once(f"{be.name}:run:{e}", f"vidattn: backend {be.name!r} cannot run this case ({e}); "
                                                      f"trying the next backend")
            continue
        break
    _backends.ran[be.name] = _backends.ran.get(be.name, 0) + 1
    out = res[0] if return_lse else res
    if grad_required(q, k, v) and out.grad_fn is None:
        raise RuntimeError(f"backend {be.name!r} returned an output without autograd history while q/k/v require "
                           f"grad: it has no backward (register it with differentiable=False so the dispatcher "
                           f"skips it when gradients are needed)")
    if bplan is not plan:
        res = (apply_epilogue(res[0], plan), res[1]) if return_lse else apply_epilogue(res, plan)
    if _observers:
        out = res[0] if return_lse else res
        for obs in list(_observers.values()):
            obs(q, k, v, plan, out, scale)
    return res


_takes_values: Dict[type, tuple] = {}  # plan class -> (takes v, takes scale)


def plan_for_call(pattern: Pattern, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: Optional[float], **kwargs) -> BlockPlan:
    """``pattern.plan`` for one call on ``q [B, S, H, D]``, ``k/v [B, S, Hk, D]`` (``num_heads`` = H,
    on q's device; ``kwargs`` passed on, e.g. ``state_key``). Every built-in family has the
    ``plan(layout, q, k, v, *, scale, num_heads, device)`` protocol; a user pattern still on the
    older ``plan(layout, q, k, *, num_heads, device)`` signature gets ``v`` / ``scale`` only where
    its signature names them."""
    cls = type(pattern)
    if cls not in _takes_values:
        import inspect

        params = inspect.signature(cls.plan).parameters
        _takes_values[cls] = ("v" in params, "scale" in params)
    takes_v, takes_scale = _takes_values[cls]
    if takes_v:
        kwargs["v"] = v
    if takes_scale:
        kwargs["scale"] = scale
    return pattern.plan(layout, q, k, num_heads=q.shape[2], device=q.device, **kwargs)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, layout: TokenLayout,
                     backend: str = "auto", scale: Optional[float] = None, return_lse: bool = False,
                     precision: Optional[str] = None):
    """Sparse attention of ``pattern`` over ``layout``.

    Args:
        q: ``[B, S, H, D]`` float16/bfloat16/float32.
        k, v: ``[B, S, Hk, D]`` (Hk divides H: GQA/MQA), same dtype/device as q.
        pattern: a :class:`~vidattn.patterns.base.Pattern` (Neighborhood, Dense, Radial, ...).
        layout: :class:`~vidattn.layout.TokenLayout` with ``seq_len == S``.
        backend: ``"auto" | "reference" | "cpu" | "flex" | "triton"`` or a name registered with
            :func:`vidattn.backends.register_backend`.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return float32 log-sum-exp ``[B, H, S]``.
        precision: None (compute in the inputs' dtype, fp32 accumulate) or one of the triton
            backend's opt-in quantised paths (per-token Q / per-block K quantisation with K smoothing;
            :mod:`vidattn.kernels.quant_fp8`):

            * ``"int8"``: int8 Q.K^T (int32 accumulate), P.V in the inputs' 16-bit dtype; the
              most accurate, ~1.2% relative L2 error vs exact attention on Gaussian inputs
              (SageAttention 1.0.6: 1.35% on the same inputs, H200);
            * ``"int8_fp8"``: int8 Q.K^T and an e4m3 P.V (per-channel V scales); ~4%;
            * ``"fp8"``: e4m3 Q.K^T and P.V; ~5% (e4m3 has 3 mantissa bits).

            All: forward only, CUDA compute capability >= 8.9, no pooled rectification; no
            other backend offers them, so a case they cannot run raises ``BackendUnsupported``
            with the reason (never a silent bf16 fallback). Output in q's dtype.
    Returns:
        ``[B, S, H, D]`` in q's dtype (and the lse).

    Dtypes: float16 / bfloat16 are computed with float32 accumulation; float64 is computed in
    float64 by the reference and cpu backends (and flex on CPU); the triton backend declares
    float64 unsupported (fallback with one warning). float8 and integer inputs raise TypeError.

    Non-finite inputs (the same on every backend, applied by :func:`run_plan`): NaN is
    propagated only where the math puts it. A non-finite value entry ``v[b, j, h, c]`` makes
    channel ``c`` NaN in exactly the rows that give key ``j`` non-zero softmax weight; a
    non-finite key token makes every channel (and the LSE) of those rows NaN; a non-finite
    query row makes that row NaN. Other rows are unaffected. Rows with no allowed key (fully
    masked) are 0 with LSE ``-inf``. ``scale`` must be a finite real number (else
    ``ValueError`` / ``TypeError``).

    Under ``torch.compile`` a static pattern (Dense, Neighborhood, Radial) without ``return_lse``
    runs through the ``vidattn::sparse_attn`` custom op (:mod:`vidattn.ops`), so
    ``fullgraph=True`` holds, the pattern may be constructed inside the compiled region too.
    Checking finiteness costs one fused pass over q, k, v and
    one host sync per call (skipped while compiling or capturing a CUDA graph, or with
    ``VIDATTN_CHECK_FINITE=0``; non-finite inputs then give whatever the backend computes).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Dense, ...), got {type(pattern).__name__}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a vidattn.TokenLayout, got {type(layout).__name__}")
    if backend not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")
    precision = _backends.check_precision(precision)
    if torch.compiler.is_compiling() and not pattern.is_dynamic and not return_lse and precision is None:
        # under torch.compile a static pattern goes through the vidattn::sparse_attn custom op
        # (the plan is looked up inside it), so the caller's graph has no break
        from .ops import sparse_attention_op

        return sparse_attention_op(q, k, v, pattern, layout, backend=backend, scale=check_scale(scale))
    check_qkv(q, k, v, layout)
    scale = check_scale(scale)
    pattern.validate(layout)
    plan = plan_for_call(pattern, layout, q, k, v, scale=scale)
    return run_plan(q, k, v, plan, backend=backend, scale=scale, return_lse=return_lse, precision=precision)

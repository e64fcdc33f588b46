"""Backend registry: every backend that executes a :class:`~vidattn.plan.BlockPlan` declares what it
can run, and the dispatcher asks before it calls.

A backend is a :class:`Backend`: ``run(q, k, v, plan, scale=, return_lse=)`` plus
``can_run(plan, q, k, v) -> (ok, reason)``. :func:`choose_backend` resolves a requested name:

* ``"auto"``: the first backend of :data:`AUTO_ORDER` whose ``can_run`` says yes: ``triton`` on
  CUDA, ``cpu`` on CPU, ``flex`` on CUDA when the Triton path cannot (e.g. gradients are needed:
  the Triton kernel has no backward registered), else ``reference``; the choice and the reasons of the ones skipped are
  logged once per distinct outcome (``logging`` at INFO, logger ``"vidattn"``);
* a name: that backend if it can run the case, else the next of its ``fallback`` chain that can,
  with one ``RuntimeWarning`` per distinct reason.

A backend may also declare "cannot" while running by raising
:class:`~vidattn.errors.BackendUnsupported` (e.g. the Triton kernel does not fit the GPU); the
dispatcher then moves down the same chain with one warning. Any other exception raised inside a
backend is a bug and propagates unchanged.

Built-ins: ``reference`` (exact, pure PyTorch), ``cpu`` (per-query-block SDPA over gathered key
blocks, :mod:`vidattn.kernels.cpu_gather`), ``flex`` (FlexAttention ``BlockMask``), ``triton`` (the
fused kernel, forward only). Register more with :func:`register_backend`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .errors import BackendUnsupported
from .plan import BlockPlan

__all__ = ["Backend", "ran", "register_backend", "get_backend", "backend_names", "choose_backend", "AUTO_ORDER",
           "grad_required", "precision_names", "check_precision", "with_precision"]

log = logging.getLogger("vidattn")

Verdict = Tuple[bool, str]
AUTO_ORDER: Tuple[str, ...] = ("triton", "cpu", "flex", "reference")


@dataclass(frozen=True)
class Backend:
    """One registered backend.

    Attributes:
        name: registry name.
        run: ``run(q, k, v, plan, scale=None, return_lse=False)`` with q ``[B, S, H, D]``, k/v
            ``[B, S, Hk, D]``; returns ``[B, S, H, D]`` in q's dtype (and float32 LSE ``[B, H, S]``).
        can_run: ``can_run(plan, q, k, v) -> (ok, reason)``; must be cheap and must not raise for
            inputs that passed :func:`vidattn.attention.check_qkv`.
        differentiable: its output carries autograd history (a backward exists).
        fallback: names tried next, in order, when this backend cannot run a case.
        auto_devices: device types on which ``"auto"`` may pick it (None: any); e.g. the Triton
            kernel runs on CPU only under ``TRITON_INTERPRET=1``, a debugging path auto never takes.
        precisions: compute precisions it offers: None (the inputs' dtype) and e.g. ``"fp8"``,
            ``"int8"``, ``"int8_fp8"`` (the triton backend's quantised paths). For a
            precision other than None the dispatcher calls ``can_run(..., precision=p)`` and
            ``run(..., precision=p)``; a backend that does not list it is never chosen for it.
    """

    name: str
    run: Callable
    can_run: Callable[..., Verdict]
    differentiable: bool = False
    fallback: Tuple[str, ...] = ("reference",)
    auto_devices: Optional[Tuple[str, ...]] = None
    precisions: Tuple[Optional[str], ...] = (None,)


_registry: Dict[str, Backend] = {}
ran: Dict[str, int] = {}  # backend name -> calls it ran (run_plan counts; reports say which backend really ran)
_warned: set = set()
_logged: set = set()


def register_backend(name: str, run: Callable, can_run: Optional[Callable[..., Verdict]] = None, *,
                     differentiable: bool = False, fallback: Tuple[str, ...] = ("reference",),
                     auto_devices: Optional[Tuple[str, ...]] = None,
                     precisions: Tuple[Optional[str], ...] = (None,)) -> Backend:
    """Register (or replace) backend ``name``; see :class:`Backend` for the arguments
    (``can_run=None``: runs everything). Returns the :class:`Backend`."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(run):
        raise TypeError(f"run must be callable, got {type(run).__name__}")
    be = Backend(name, run, can_run or (lambda plan, q, k, v: (True, "")), bool(differentiable),
                 tuple(f for f in fallback if f != name), None if auto_devices is None else tuple(auto_devices),
                 tuple(precisions))
    _registry[name] = be
    return be


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; ``ValueError`` listing the names for an unknown one."""
    if name not in _registry:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _registry[name]


def backend_names() -> Tuple[str, ...]:
    """Registered backend names plus ``"auto"``."""
    return tuple(_registry) + ("auto",)


def precision_names() -> Tuple[Optional[str], ...]:
    """Every precision some registered backend offers (None first)."""
    out = [None]
    for be in _registry.values():
        out += [p for p in be.precisions if p not in out]
    return tuple(out)


def check_precision(precision) -> Optional[str]:
    """``precision`` if a registered backend offers it, else ``ValueError`` naming the argument."""
    names = precision_names()
    if precision not in names:
        raise ValueError(f"precision must be one of {names} (None: the inputs' dtype), got {precision!r}")
    return precision


def with_precision(be: Backend, precision: Optional[str]) -> Backend:
    """``be`` itself for precision None, else a copy whose ``run`` passes ``precision=precision``."""
    if precision is None:
        return be
    return replace(be, run=functools.partial(be.run, precision=precision))


def grad_required(q, k, v) -> bool:
    """True when autograd is on and any of q, k, v requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def _verdict(be: Backend, plan: BlockPlan, q, k, v, precision: Optional[str] = None) -> Verdict:
    if precision not in be.precisions:
        return False, f"{be.name} does not offer precision={precision!r}"
    if grad_required(q, k, v) and not be.differentiable:
        return False, f"{be.name} has no backward and q/k/v require grad"
    if precision is None:
        ok, reason = be.can_run(plan, q, k, v)
    else:
        ok, reason = be.can_run(plan, q, k, v, precision=precision)
    return bool(ok), str(reason)


def warn_once(key: str, msg: str) -> None:
    """One ``RuntimeWarning`` (and log line) per distinct ``key`` per process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        log.warning(msg)


def _chain(name: str) -> List[str]:
    out, todo = [], [name]
    while todo:
        n = todo.pop(0)
        if n not in out and n in _registry:
            out.append(n)
            todo.extend(_registry[n].fallback)
    return out


def candidates(requested: str) -> List[str]:
    """Backends to try for ``requested``, in order (auto: :data:`AUTO_ORDER`)."""
    if requested == "auto":
        return [n for n in AUTO_ORDER if n in _registry]
    get_backend(requested)
    return _chain(requested)


def choose_backend(requested: str, plan: BlockPlan, q, k, v, skip: Tuple[str, ...] = (),
                   precision: Optional[str] = None) -> Backend:
    """The backend that runs this case (see the module docstring); ``skip``: names already found
    unable at run time; ``precision``: only backends offering it are candidates. Raises
    ``BackendUnsupported`` when no candidate can run it."""
    reasons = []
    for name in candidates(requested):
        if name in skip:
            continue
        be = _registry[name]
        if requested == "auto" and be.auto_devices is not None and q.device.type not in be.auto_devices:
            ok, why = False, f"auto uses it on {'/'.join(be.auto_devices)} only"
        else:
            ok, why = _verdict(be, plan, q, k, v, precision)
        if ok:
            if requested == "auto":
                key = (name, tuple(reasons))
                if key not in _logged:
                    _logged.add(key)
                    skipped = "; ".join(f"{n}: {r}" for n, r in reasons)
                    log.info("vidattn: backend 'auto' runs %r%s", name, f" ({skipped})" if skipped else "")
            elif reasons:
                n0, r0 = reasons[0]
                warn_once(f"{n0}->{name}:{r0}", f"vidattn: backend {n0!r} cannot run this case ({r0}); "
                                               f"falling back to {name!r}")
            return be
        reasons.append((name, why))
    raise BackendUnsupported("no backend can run this case: " + "; ".join(f"{n}: {r}" for n, r in reasons))


# ----------------------------------------------------------------------------- built-in backends
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reference_can_run(plan, q, k, v) -> Verdict:
    if q.dtype not in _FLOATS:
        return False, f"dtype {q.dtype} not supported"
    return True, ""


def _cpu_can_run(plan, q, k, v) -> Verdict:
    if q.device.type != "cpu":
        return False, f"needs CPU tensors, got {q.device.type}"
    if q.dtype not in _FLOATS:
        return False, f"dtype {q.dtype} not supported"
    rect = plan.rectification
    if rect is not None and rect.has_fused:
        return False, "fused rectification terms (kept_log_scale / pooled columns) run on the reference backend"
    if plan.kv_perm is not None:
        return False, "a separate key order (kv_perm, Clustered) runs on the reference backend"
    return True, ""


def _flex_can_run(plan, q, k, v) -> Verdict:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - old torch
        return False, f"FlexAttention unavailable: {e}"
    rect = plan.rectification
    if rect is not None and rect.has_fused:
        return False, "FlexAttention does not fuse rectification terms"
    if q.device.type == "cuda":
        D = q.shape[-1]
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"dtype {q.dtype} not supported on CUDA"
        if D < 16 or D & (D - 1):
            return False, f"head dim {D} must be a power of two >= 16 for compiled FlexAttention"
        if plan.block_q % 16 or plan.block_k % 16:
            return False, f"block sizes ({plan.block_q}, {plan.block_k}) must be multiples of 16 for compiled FlexAttention"
    elif q.dtype not in _FLOATS:
        return False, f"dtype {q.dtype} not supported"
    return True, ""


def _triton_can_run(plan, q, k, v, precision=None) -> Verdict:
    try:
        from vidattn.kernels.sparse_flash import check_triton_inputs
    except ImportError as e:  # triton not installed
        return False, f"triton unavailable: {e}"
    try:
        check_triton_inputs(q, k, v, plan)
    except BackendUnsupported as e:
        return False, str(e)
    if precision is not None:  # the quantised precisions ("fp8", "int8", "int8_fp8"): the same refusals
        from vidattn.kernels.quant_fp8 import fp8_support

        if grad_required(q, k, v):
            return False, f"precision={precision!r} is forward only (q/k/v require grad; the backward is bf16)"
        rect = plan.rectification
        if rect is not None and rect.has_pooled:
            return False, f"precision={precision!r} does not fuse pooled rectification columns"
        return fp8_support(q.device, precision)
    if plan.kv_perm is not None and grad_required(q, k, v):
        return False, "the Triton backward does not support a separate key order (kv_perm, Clustered)"
    return True, ""


# plain import statements (not importlib) so Dynamo can trace through the lazy imports
def _run_reference(*args, **kwargs):
    from vidattn.kernels.reference import block_sparse_attention_reference

    return block_sparse_attention_reference(*args, **kwargs)


def _run_cpu(*args, **kwargs):
    from vidattn.kernels.cpu_gather import block_sparse_attention_cpu

    return block_sparse_attention_cpu(*args, **kwargs)


def _run_flex(*args, **kwargs):
    from vidattn.kernels.flex import block_sparse_attention_flex

    return block_sparse_attention_flex(*args, **kwargs)


def _run_triton(*args, precision=None, **kwargs):
    # the differentiable wrapper: plain forward without grad; with grad, the Triton block-sparse
    # backward from the saved LSE (vidattn.kernels.sparse_flash_autograd). The quantised precisions
    # ("fp8", "int8", "int8_fp8") are the forward only (can_run refuses them when gradients are needed)
    if precision is not None:
        from vidattn.kernels.sparse_flash import block_sparse_attention_triton

        return block_sparse_attention_triton(*args, precision=precision, **kwargs)
    from vidattn.kernels.sparse_flash_autograd import block_sparse_attention_triton_autograd

    return block_sparse_attention_triton_autograd(*args, **kwargs)


def _register_builtins() -> None:
    register_backend("reference", _run_reference,
                     _reference_can_run, differentiable=True, fallback=())
    register_backend("cpu", _run_cpu, _cpu_can_run,
                     differentiable=True, fallback=("reference",))
    register_backend("flex", _run_flex, _flex_can_run,
                     differentiable=True, fallback=("reference",), auto_devices=("cuda",))
    register_backend("triton", _run_triton,
                     _triton_can_run, differentiable=True, fallback=("flex", "reference"), auto_devices=("cuda",),
                     precisions=(None, "fp8", "int8", "int8_fp8"))


_register_builtins()

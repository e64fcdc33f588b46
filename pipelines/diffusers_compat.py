"""The one place where vidattn touches diffusers' private names.

diffusers (0.42) has no public API for what vidattn needs: registering an attention backend,
calling its context-parallel template, reading the context-parallel device mesh, the processor
attributes ``set_attention_backend`` / ``enable_parallelism`` write, a stateful ``ModelHook`` and
a model class's default attention processor. Each private name is read once, below, after
:func:`check` confirmed that the installed diffusers has it (a ``RuntimeError`` naming the
minimum version otherwise). Everything else in vidattn goes through these functions; the count
is kept down by ``benchmarks/diffusers_internals.py`` and its test, and every name is listed with
its reason in docs/diffusers_integration.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect

__all__ = ["MIN_DIFFUSERS", "TESTED_DIFFUSERS", "check", "register_backend", "active_backend", "native_backend",
           "templated_cp_attention", "cp_mesh", "BACKEND_ATTR", "PARALLEL_ATTR", "uses_dispatcher",
           "default_processor_cls", "mark_stateful", "FP32_MODULES_ATTR", "backend_enum"]

MIN_DIFFUSERS = "0.36.0"  # first release with context parallelism in attention_dispatch (checked by feature)
TESTED_DIFFUSERS = "0.42.1"

# processor protocol: diffusers' ``set_attention_backend`` / ``enable_parallelism`` write these on
# every attention processor and the dispatcher-based processors pass them to dispatch_attention_fn
BACKEND_ATTR = "_attention_backend"
PARALLEL_ATTR = "_parallel_config"
# ModelMixin class attribute: modules kept in fp32 (needs accelerate to load)
FP32_MODULES_ATTR = "_keep_in_fp32_modules"


def check():
    """``(attention_dispatch module, backend registry, CP template)`` of the installed diffusers;
    ``RuntimeError`` naming the minimum version when a piece vidattn uses is missing."""
    try:
        import diffusers

        ad = importlib.import_module("diffusers.models.attention_dispatch")
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"vidattn's diffusers backend needs diffusers >= {MIN_DIFFUSERS}: {e}") from None
    registry = getattr(ad, "_AttentionBackendRegistry", None)
    template = getattr(ad, "_templated_context_parallel_attention", None)
    missing = [n for n, x in (("AttentionBackendName", getattr(ad, "AttentionBackendName", None)),
                              ("dispatch_attention_fn", getattr(ad, "dispatch_attention_fn", None)),
                              ("the attention backend registry", registry),
                              ("the context-parallel attention template", template)) if x is None]
    if registry is not None:
        try:
            if "supports_context_parallel" not in inspect.signature(registry.register).parameters:
                missing.append("backend registration with supports_context_parallel=")
        except (TypeError, ValueError):  # pragma: no cover
            missing.append("backend registration")
    if missing:
        raise RuntimeError(f"diffusers {diffusers.__version__} lacks {', '.join(missing)}: vidattn's attention backend "
                           f"needs diffusers >= {MIN_DIFFUSERS} (tested with {TESTED_DIFFUSERS})")
    return ad, registry, template


@functools.lru_cache(maxsize=1)
def _pieces():
    return check()


def backend_enum():
    """diffusers' ``AttentionBackendName`` enum."""
    return _pieces()[0].AttentionBackendName


def _extend_enum(enum_cls, name: str, value: str):
    """The member ``name = value`` of the str-Enum ``enum_cls``, added if missing (what NVIDIA
    ModelOpt and cache-dit do; Python has no public way to add a member). Lookup by value and
    ``__members__`` see it; iterating the enum does not."""
    try:
        return enum_cls(value)
    except ValueError:
        pass
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    enum_cls._member_map_[name] = enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return member


def register_backend(name: str, value: str, fn):
    """Register ``fn`` as a context-parallel capable attention backend named ``value``; returns
    its ``AttentionBackendName`` member."""
    _, registry, _ = _pieces()
    member = _extend_enum(backend_enum(), name, value)
    registry.register(member, constraints=[], supports_context_parallel=True)(fn)
    return member


def active_backend():
    """The backend name diffusers' ``attention_backend(...)`` context (or its default) selects."""
    return _pieces()[1].get_active_backend()[0]


def dispatch_attention_fn(*args, **kwargs):
    """diffusers' public ``dispatch_attention_fn``."""
    return _pieces()[0].dispatch_attention_fn(*args, **kwargs)


def native_backend():
    """diffusers' native (SDPA) backend member."""
    return backend_enum().NATIVE


def templated_cp_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, *,
                           forward_op, backward_op, parallel_config):
    """diffusers' context-parallel template (Ulysses all-to-all, Ring LSE merge, or both)
    around ``forward_op`` / ``backward_op`` (``[B, S_local, H, D]`` in and out)."""
    return _pieces()[2](query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                      forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config)


def cp_mesh(cp_config):
    """The ``("ring", "ulysses")`` DeviceMesh diffusers set up for ``cp_config`` (a
    ``ContextParallelConfig`` after ``enable_parallelism``); index it with ``["ring"]`` /
    ``["ulysses"]`` for the groups and local ranks."""
    mesh = cp_config._mesh
    if mesh is None:
        raise RuntimeError("the ContextParallelConfig has no device mesh: call transformer.enable_parallelism first")
    return mesh


def uses_dispatcher(proc_cls: type) -> bool:
    """Whether processors of ``proc_cls`` go through ``dispatch_attention_fn`` (diffusers' own
    test: the class declares the backend attribute ``set_attention_backend`` writes)."""
    return hasattr(proc_cls, BACKEND_ATTR)


def default_processor_cls(attn_cls: type):
    """The default processor class an attention module class declares, or None."""
    return getattr(attn_cls, "_default_processor_cls", None)


def mark_stateful(hook_cls: type) -> type:
    """Mark a ``ModelHook`` subclass stateful: diffusers then hands it the pipeline's
    ``cache_context`` and resets it with ``reset_stateful_hooks``."""
    hook_cls._is_stateful = True
    return hook_cls

"""Pattern base class: what every sparse attention family provides, and the value-keyed plan cache."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Dict, Optional

import torch

from ..layout import TokenLayout
from ..plan import BlockPlan

__all__ = ["Pattern", "StaticPattern", "default_block_size", "check_block_size", "pattern_key", "pattern_by_key",
           "PLAN_CACHE_SIZE"]

PLAN_CACHE_SIZE = 64  # plans kept by the value-keyed cache (oldest dropped first)

_plans: Dict[tuple, BlockPlan] = {}
_key_of: Dict[object, int] = {}
_by_key: Dict[int, "Pattern"] = {}
_next_key = itertools.count(1)


def _identity(pattern: "Pattern"):
    """Dictionary key of a pattern: the pattern itself (frozen dataclasses hash by value), or its
    ``id`` for an unhashable one."""
    try:
        hash(pattern)
        return pattern
    except TypeError:
        return ("id", id(pattern))


def _register(pattern: "Pattern") -> int:
    ident = _identity(pattern)
    key = _key_of.get(ident)
    if key is None:
        key = next(_next_key)
        _key_of[ident] = key
        _by_key[key] = pattern
    return key


@torch.compiler.assume_constant_result  # run for real while tracing, on plain constants
def _register_value(cls: type, fields: tuple) -> int:
    return _register(cls(**dict(fields)))


@torch.compiler.assume_constant_result  # run for real while tracing (a pattern made outside the graph)
def _register_object(pattern: "Pattern") -> int:
    return _register(pattern)


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(x) for x in value)
    return value is None or isinstance(value, (bool, int, float, str))


def pattern_key(pattern: "Pattern") -> int:
    """A process-unique integer for ``pattern``'s value (equal patterns share it), assigned on
    first use, so compiled graphs can refer to a pattern by a plain int (see ``vidattn.ops``).
    Under Dynamo the pattern's init fields (plain constants) are handed to an eagerly run
    registration, so a pattern constructed inside the compiled region gets its real key."""
    if torch.compiler.is_compiling():
        fields = tuple((f.name, getattr(pattern, f.name)) for f in dataclasses.fields(pattern) if f.init)
        if all(_plain(v) for _, v in fields):
            return _register_value(type(pattern), fields)
        return _register_object(pattern)  # fields that are not plain constants (e.g. a fixed plan)
    return _register(pattern)


def pattern_by_key(key: int) -> "Pattern":
    """The pattern registered under ``key`` by :func:`pattern_key`."""
    return _by_key[key]


def default_block_size() -> int:
    """Block size used when a pattern does not fix one: 128 (the kernels' tile)."""
    return 128


def check_block_size(value, name: str = "block_size", allow_none: bool = True) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming ``name`` unless ``value`` is an int >= 1 (or None
    when ``allow_none``). The Triton backend additionally needs powers of two in [16, 256]."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class Pattern:
    """A sparse attention family (frozen dataclass in every subclass).

    Subclasses implement :meth:`plan`; static ones also :meth:`mask`. ``is_dynamic`` is True
    for patterns whose plan depends on Q/K (/V) values (they need them in :meth:`plan`).
    ``needs_frames`` is True for patterns that only make sense on a ``(T, H, W)`` grid.
    """

    is_dynamic: bool = False
    needs_frames: bool = False

    @property
    def _vidattn_key(self) -> int:
        """This pattern's :func:`pattern_key`."""
        return pattern_key(self)

    def validate(self, layout: TokenLayout) -> None:
        """Raise ``ValueError`` if the pattern cannot serve ``layout``."""

    def mask(self, layout: TokenLayout, num_heads: int = 1) -> torch.Tensor:
        """Token-level mask, BoolTensor ``[h, S, S]`` (h = 1 or ``num_heads``); True = may attend."""
        raise TypeError(f"{type(self).__name__} is dynamic: its mask depends on Q/K; use plan(layout, q, k)")

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             v: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Compile to a :class:`BlockPlan`.

        Args:
            layout: the token layout.
            q, k, v: ``[B, S, heads, D]`` / ``[B, S, kv_heads, D]`` (needed by dynamic patterns,
                ignored by static ones).
            scale: the softmax scale the attention will use (None: ``D ** -0.5``); dynamic
                patterns that select blocks by attention scores use it.
            num_heads: number of query heads (per-head patterns use it when q is None).
            device: where the plan lives (defaults to q's device, else CPU).
        """
        raise NotImplementedError


class StaticPattern(Pattern):
    """A pattern fully described by a token rule on the layout; its plans are cached by value
    (equal patterns share them; no lock: a race at worst builds a plan twice)."""

    def cached_plan(self, key, build: Callable[[], BlockPlan]) -> BlockPlan:
        """The plan cached under (this pattern's value, ``key``), built by ``build()`` on a miss."""
        ck = (_identity(self), key)
        plan = _plans.get(ck)
        if plan is None:
            plan = build()
            while len(_plans) >= PLAN_CACHE_SIZE:
                _plans.pop(next(iter(_plans)), None)
            _plans[ck] = plan
        return plan

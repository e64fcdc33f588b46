"""Pattern base class: what every sparse attention family provides."""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Optional

import torch

from ..layout import TokenLayout
from ..plan import BlockPlan

__all__ = ["Pattern", "StaticPattern", "default_block_size", "pattern_by_key"]

_keys = itertools.count(1)
_by_key: "weakref.WeakValueDictionary[int, Pattern]" = weakref.WeakValueDictionary()  # no leak


def pattern_by_key(key: int) -> "Pattern":
    """The pattern constructed with integer key ``key`` (``pattern._vidattn_key``)."""
    return _by_key[key]


def default_block_size(device) -> int:
    """Block size used when a pattern does not fix one: 128 (the kernels' tile)."""
    return 128


class Pattern:
    """A sparse attention family (frozen dataclass in every subclass).

    Subclasses implement :meth:`plan`; static ones also :meth:`mask`. ``is_dynamic`` is True
    for patterns whose plan depends on Q/K values (they need ``q``/``k`` in :meth:`plan`).
    ``needs_frames`` is True for patterns that only make sense on a ``(T, H, W)`` grid.
    """

    is_dynamic: bool = False
    needs_frames: bool = False

    def __new__(cls, *args, **kwargs):
        # every pattern gets a process-unique integer key at construction, so compiled graphs can
        # refer to it by a plain int (see vidattn.ops) without reconstructing the object
        obj = super().__new__(cls)
        key = next(_keys)
        object.__setattr__(obj, "_vidattn_key", key)
        _by_key[key] = obj
        return obj

    def validate(self, layout: TokenLayout) -> None:
        """Raise ``ValueError`` if the pattern cannot serve ``layout``."""

    def mask(self, layout: TokenLayout, num_heads: int = 1) -> torch.Tensor:
        """Token-level mask, BoolTensor ``[h, S, S]`` (h = 1 or ``num_heads``); True = may attend."""
        raise TypeError(f"{type(self).__name__} is dynamic: its mask depends on Q/K; use plan(layout, q, k)")

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             *, num_heads: int = 1, device=None) -> BlockPlan:
        """Compile to a :class:`BlockPlan`.

        Args:
            layout: the token layout.
            q, k: ``[B, S, heads, D]`` (needed by dynamic patterns, ignored by static ones).
            num_heads: number of query heads (per-head patterns use it when q is None).
            device: where the plan lives (defaults to q's device, else CPU).
        """
        raise NotImplementedError


class StaticPattern(Pattern):
    """A pattern fully described by a token rule on the layout; plans are cached."""

    _cache_lock = threading.Lock()

    def _cache(self) -> dict:
        # frozen dataclasses: keep the cache outside the dataclass fields
        cache = self.__dict__.get("_plan_cache")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_plan_cache", cache)
        return cache

    def cached_plan(self, key, build):
        cache = self._cache()
        with self._cache_lock:
            plan = cache.get(key)
        if plan is None:
            plan = build()
            with self._cache_lock:
                if len(cache) > 16:
                    cache.clear()
                cache[key] = plan
        return plan

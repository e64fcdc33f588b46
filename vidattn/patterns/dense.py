"""Dense attention as a pattern (every query attends every key)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import TokenLayout
from ..plan import FULL, BlockPlan, plan_from_block_mask
from .base import StaticPattern, check_block_size, default_block_size

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense(StaticPattern):
    """Full attention. ``block_size=None`` picks the backend default (128)."""

    block_size: Optional[int] = None

    def __post_init__(self):
        check_block_size(self.block_size)

    def mask(self, layout: TokenLayout, num_heads: int = 1) -> torch.Tensor:
        """BoolTensor ``[1, S, S]`` of all True."""
        S = layout.seq_len
        return torch.ones(1, S, S, dtype=torch.bool)

    def plan(self, layout: TokenLayout, q=None, k=None, v=None, *, scale=None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Every key block full for every query block (q, k, v, scale, num_heads are not needed)."""
        dev = torch.device(device) if device is not None else (q.device if q is not None else torch.device("cpu"))
        bs = default_block_size() if self.block_size is None else self.block_size

        def build():
            S = layout.seq_len
            nqb, nkb = -(-S // bs), -(-S // bs)
            cls = torch.full((1, 1, nqb, nkb), FULL, dtype=torch.int8, device=dev)
            return plan_from_block_mask(cls, seq_len=S, block_q=bs, block_k=bs, rule=None, token_density=1.0,
                                        meta=dict(pattern="dense"))

        return self.cached_plan((layout, str(dev), bs), build)

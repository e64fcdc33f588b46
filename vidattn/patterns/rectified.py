"""Rectified sparse attention (after Liu et al., "Rectified SpaAttn: Revisiting Attention Sparsity
for Efficient Video Generation", arXiv:2511.19835).

The paper observes two biases of block-sparse attention: (1) critical (kept) tokens are
over-weighted, by the inverse of the attention mass the selection keeps; (2) non-critical
(dropped) tokens lose their attention entirely. It rectifies both against an implicit full
attention reference computed from pooled blocks: Isolated-Pooling Attention Reallocation (IPAR)
for (1) and Gain-Aware Pooling Rectification (GAPR) for (2). Only the paper's abstract was
available while writing this module; the per-block formulas below are this project's derivation
of those two ideas and are stated exactly, so they can be checked and replaced.

Notation (per batch b and head h; block ``B``; plan order = natural token order): ``Qp, Kp, Vp``
block means (``vidattn.kernels.pooling``), ``Kvar, Vvar`` per-channel block variances, ``n_kb``
tokens of key block ``kb``, ``s`` the softmax scale. All work is ``O((S/B)^2 D)``, never S^2.

* pooled logits ``L[qb, kb] = s * Qp[qb].Kp[kb] + log n_kb`` (a block of ``n`` identical keys);
  selection probabilities ``P = softmax_kb(L)``.
* selection per (b, h, qb): the top ``ceil(keep * NKB)`` key blocks by ``P`` (ties: lower index
  first) or, if ``mass`` is set, the fewest blocks whose ``P`` sums to ``>= mass``; plus the
  diagonal block and every block holding prefix/suffix (text) tokens; query blocks holding
  text tokens keep every key block.
* IPAR (kept tokens): the exact softmax over kept tokens is renormalised together with the pooled
  columns below, so the kept tokens receive ``Z_kept / (Z_kept + sum_c Z_c)`` — the share the
  pooled reference gives them — instead of 1. The pooled partition of a block is corrected for
  the spread of its keys (log-normal moment: ``E exp(s q.k) ~ exp(s q.Kp + g)`` with
  ``g[qb, kb] = 0.5 * s^2 * sum_d Qp[qb, d]^2 Kvar[kb, d]``, clamped to ``[0, 4]``), isolating
  each block's own estimate; ``kept_log_scale`` stays 0 since kept blocks are computed exactly.
* GAPR (dropped blocks): a dropped block ``kb`` gets one pooled column (key ``Kp[kb]``, value
  ``Vp[kb]``, log weight ``log n_kb + g[qb, kb]``) iff its estimated gain exceeds its pooling
  error: ``gain = rms_d(Vp[kb] - Vbar[qb])`` with ``Vbar`` the reference-weighted mean of the
  kept blocks' ``Vp`` (how far the block moves the output), ``err = rms_d(sqrt(Vvar[kb])) *
  sqrt(expm1(2 g[qb, kb]))`` (value spread times the coefficient of variation of the in-block
  weights). Both carry the same factor ``P[qb, kb]``, which cancels.

The plan has Bp = batch and Hp = heads (selection per sample and head), full blocks only (no
token rule), and a :class:`~vidattn.plan.Rectification` when ``rectify`` (FlexAttention cannot
fuse it, so ``backend="flex"`` falls back to the reference). ``keep=1.0, rectify=False`` is
dense attention exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..layout import TokenLayout
from ..plan import FULL, BlockPlan, Rectification, plan_from_block_mask
from .base import Pattern

__all__ = ["RectifiedSparse", "select_blocks"]


def select_blocks(probs: torch.Tensor, keep: Optional[float], mass: Optional[float]) -> torch.Tensor:
    """Critical key blocks per query block.

    Args:
        probs: float ``[..., NKB]`` pooled attention probabilities (rows sum to 1).
        keep: fraction of key blocks kept (top-k, ``k = max(1, ceil(keep * NKB))``), used when
            ``mass`` is None.
        mass: cumulative-mass threshold in (0, 1]: keep the fewest top blocks reaching it.
    Returns:
        BoolTensor like ``probs``. Deterministic: ties go to the lower block index.
    """
    nkb = probs.shape[-1]
    order = torch.argsort(-probs, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nkb, device=probs.device).expand_as(order).contiguous())
    if mass is None:
        kcount = max(1, math.ceil(float(keep) * nkb - 1e-9))
        return rank < kcount
    sorted_p = torch.gather(probs, -1, order)
    before = torch.cumsum(sorted_p, -1) - sorted_p  # mass of strictly higher-ranked blocks
    keep_sorted = before < mass
    keep_sorted[..., 0] = True
    return torch.gather(keep_sorted, -1, rank)


@dataclass(frozen=True)
class RectifiedSparse(Pattern):
    """Dynamic block-sparse attention with pooled rectification (see module docstring).

    Args:
        keep: fraction of key blocks kept per query block (0 < keep <= 1).
        rectify: add the pooled rectification terms (needs ``v``; ``sparse_attention`` passes it).
        block_size: block of pooling and of the plan (default 128).
        mass: optional cumulative pooled-mass threshold in (0, 1]; replaces ``keep`` when set.
        keep_diagonal: always keep each query block's own key block.
        dense_text: prefix/suffix tokens attend and are attended densely.
    """

    keep: float = 0.25
    rectify: bool = True
    block_size: int = 128
    mass: Optional[float] = None
    keep_diagonal: bool = True
    dense_text: bool = True

    is_dynamic = True
    needs_values = True

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a float in (0, 1], got {self.keep!r}")
        if self.mass is not None and (isinstance(self.mass, bool) or not isinstance(self.mass, (int, float))
                                      or not 0 < self.mass <= 1):
            raise ValueError(f"mass must be None or a float in (0, 1], got {self.mass!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not isinstance(self.rectify, bool):
            raise TypeError(f"rectify must be a bool, got {type(self.rectify).__name__}")

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None, *,
             v: Optional[torch.Tensor] = None, scale: Optional[float] = None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Select blocks from pooled Q/K and build the rectified plan.

        Args:
            layout: token layout (``S = layout.seq_len``).
            q: ``[B, S, H, D]``; k: ``[B, S, Hk, D]`` (Hk divides H); v: ``[B, S, Hk, Dv]`` or None
                (then no pooled columns are added, i.e. selection only).
            scale: softmax scale (default ``D ** -0.5``).
        Returns:
            BlockPlan with Bp = B, Hp = H, full blocks only; ``meta`` holds ``keep_fraction`` and
            ``pooled_columns`` (fraction of (qb, kb) pairs given a pooled column).
        """
        if q is None or k is None:
            raise ValueError("RectifiedSparse is dynamic: plan() needs q [B, S, H, D] and k [B, S, Hk, D]")
        for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a tensor [B, S, heads, D], got {getattr(t, 'shape', type(t))}")
        B, S, H, D = q.shape
        layout.check_seq_len(S, name="q")
        if k.shape[:2] != (B, S) or H % k.shape[2] != 0:
            raise ValueError(f"k must be [B={B}, S={S}, Hk, D] with Hk dividing {H}, got {tuple(k.shape)}")
        if v is not None and v.shape[:3] != k.shape[:3]:
            raise ValueError(f"v must match k in [B, S, Hk], got v {tuple(v.shape)} and k {tuple(k.shape)}")
        dev = torch.device(device) if device is not None else q.device
        s = D ** -0.5 if scale is None else float(scale)
        bs = self.block_size
        rep = H // k.shape[2]
        from vidattn.kernels.pooling import block_counts, block_moments

        with torch.no_grad():
            qp, _ = block_moments(q, bs)
            kp, kvar = block_moments(k, bs)
            kp, kvar = kp.repeat_interleave(rep, 1), kvar.repeat_interleave(rep, 1)  # [B, H, NB, D]
            cnt = block_counts(S, bs, q.device).float()
            nb = cnt.shape[0]
            logits = s * torch.einsum("bhqd,bhkd->bhqk", qp, kp) + cnt.log()
            probs = torch.softmax(logits, -1)
            kept = select_blocks(probs, self.keep, self.mass)
            ar = torch.arange(nb, device=q.device)
            if self.keep_diagonal:
                kept = kept | torch.eye(nb, dtype=torch.bool, device=q.device)
            if self.dense_text and (layout.prefix or layout.suffix):
                starts, ends = ar * bs, ar * bs + cnt.long()
                g0, g1 = layout.prefix, layout.prefix + layout.num_grid_tokens
                has_text = (starts < g0) | (ends > g1)  # [NB]
                kept = kept | has_text[None, None, None, :] | has_text[None, None, :, None]
            rect = None
            pooled_frac = 0.0
            if self.rectify and v is not None:
                vp, vvar = block_moments(v, bs)
                vp, vvar = vp.repeat_interleave(rep, 1), vvar.repeat_interleave(rep, 1)
                g = (0.5 * s * s * torch.einsum("bhqd,bhkd->bhqk", qp * qp, kvar)).clamp(0, 4)
                pref = torch.softmax(logits + g, -1)
                wk = pref * kept
                vbar = torch.einsum("bhqk,bhkd->bhqd", wk, vp) / wk.sum(-1, keepdim=True).clamp_min(1e-30)
                dv = vp.shape[-1]
                dist2 = ((vp * vp).sum(-1)[:, :, None, :] + (vbar * vbar).sum(-1)[:, :, :, None]
                         - 2 * torch.einsum("bhqd,bhkd->bhqk", vbar, vp)).clamp_min(0) / dv
                spread = vvar.sqrt().pow(2).mean(-1).sqrt()  # rms_d sqrt(Vvar)
                err = spread[:, :, None, :] * torch.expm1(2 * g).sqrt()
                comp = (~kept) & (dist2.sqrt() > err)
                pw = torch.where(comp, cnt.log() + g, torch.full_like(g, -math.inf))
                rect = Rectification(kept_log_scale=None, pooled_k=kp.to(dev), pooled_v=vp.to(dev),
                                     pooled_log_weight=pw.float().to(dev))
                pooled_frac = float(comp.float().mean())
            classes = torch.where(kept, FULL, 0).to(torch.int8).to(dev)
            pair = cnt[:, None] * cnt[None, :]
            density = float((kept.float() * pair).sum() / (B * H * S * S))
        meta = dict(pattern="rectified", keep=float(self.keep), mass=self.mass, rectify=self.rectify,
                    keep_fraction=float(kept.float().mean()), pooled_columns=pooled_frac)
        return plan_from_block_mask(classes, seq_len=S, block_q=bs, block_k=bs, rule=None, token_density=density,
                                    rectification=rect, meta=meta)

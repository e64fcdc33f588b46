"""Rectified sparse attention: Liu et al., "Rectified SpaAttn: Revisiting Attention Sparsity for
Efficient Video Generation", arXiv:2511.19835; reference code github.com/BienLuky/Rectified-SpaAttn
(read at commit 4b0aa10; the core of ``rectified_spaattn/gapr_mask.py`` and
``rectified_spaattn/rectified_wan21_attn.py`` / ``rectified_hunyuan_attn.py`` is unchanged since the
first commit cd000af). This module re-implements the method from those formulas; no code is copied.

Block-sparse attention has two biases: the exact softmax over the kept (*critical*) blocks
over-weights them (it renormalises to 1 the mass the full softmax gives them), and the dropped
blocks lose their share entirely. Both are corrected against an *implicit full attention* built
from block-mean pooled Q/K/V, in ``O((S/B)^2 D)`` work (never S^2). Two variants are available
through ``method``.

``method="authors"`` (default): the authors' IPAR + GAPR
-------------------------------------------------------------
Notation per (batch, head), block ``B`` (= ``block_size``), natural token order: ``q̄_a, k̄_b, v̄_b``
block means over each block's real tokens, ``δq_a, δk_b`` per-channel mean absolute deviations
from the block mean, ``n_b`` tokens of key block ``b``, ``s`` the attention's softmax scale.

1. Implicit full attention ``P_ab = softmax_b(s * q̄_a.k̄_b + log n_b)``. With equal blocks the
   ``log n_b`` term is a constant and this is the authors' ``softmax_b(d^-1/2 q̄_a.k̄_b)``.
   When ``dense_text`` and the layout has prefix/suffix tokens, those text keys are *isolated*
   (not pooled), as the authors do for HunyuanVideo: a key block's mass is
   ``n^grid_b exp(s q̄_a.k̄^grid_b) + sum_{text t in b} exp(s q̄_a.k_t)``, normalised over blocks.
2. Critical set ``C_a``: blocks sorted by ``P_ab`` descending (ties: lower index first). With
   ``mass=τ``, the authors' count ``#{j : cumsum_j <= τ} + 1``, at least ``top_k``; otherwise the
   top ``max(ceil(keep * NKB), top_k)``. Plus the diagonal block (``keep_diagonal``; the authors'
   static neighbour mask always contains a block's own block) and, with ``dense_text``, every
   block holding prefix/suffix tokens both as keys and as queries (the authors attend text keys
   densely and run text queries with full attention).
3. GAPR, for every block ``b``: gain ``G_ab = |q̄_a.k̄_b|`` against pooling error
   ``E_ab = |δq_a.k̄_b| + |q̄_a.δk_b|`` (both without the softmax scale, which cancels). A
   non-critical block with ``G_ab > E_ab`` is *pooled* (set ``G_a``), otherwise *rejected* (``N_a``).
4. IPAR: ``R_a = sum_{b in C_a ∪ N_a} P_ab`` (computed as ``1 - sum_{b in G_a} P_ab``, the same
   number, exactly 1 when nothing is pooled). Output, for every query token ``i`` of block ``a``:
   ``out_i = R_a * O^sparse_i + sum_{b in G_a} P_ab v̄_b`` where ``O^sparse`` is exact softmax
   attention over ``C_a``. The plan carries ``R`` and the pooled term as an output epilogue
   (:class:`~vidattn.plan.Rectification` ``out_scale`` / ``out_shift``) that
   :func:`vidattn.run_plan` applies after any backend (reference, flex or triton).

Where this differs from the authors' code, deliberately: (a) the last, ragged block is pooled over
its real tokens (means and deviations) and weighted by its true size ``n_b`` in ``P``; the authors
zero-pad the sequence to a multiple of ``B`` and average over the padded block (identical when
``S`` is a multiple of ``B``); (b) ties in the sort are broken by block index (the authors' sort is
not stable); (c) ``s`` is the attention's scale (the authors always use ``d^-1/2``, our default);
(d) not implemented: the authors' static 26-neighbour block mask and first-frame square (here
only the diagonal), Hilbert-curve token reordering, and dense warm-up layers/steps (a pipeline
concern: see ``dense_steps``); everything is computed in float32.

``method="joint"``: this project's earlier derivation
---------------------------------------------------
Pooled logits ``L = s * q̄.k̄ + log n`` select blocks as above (with ``mass``: fewest blocks
reaching it); a dropped block gets one *pooled column* (key ``k̄_b``, value ``v̄_b``, log weight
``log n_b + g_ab``) inside the same softmax as the kept tokens iff ``rms_d(v̄_b - V̄_a) >
rms_d(sqrt(Vvar_b)) * sqrt(expm1(2 g_ab))``, where ``g_ab = 0.5 s^2 sum_d q̄_a[d]^2 Kvar_b[d]``
(clamped to [0, 4]) is a log-normal correction of the block's partition and ``V̄_a`` the
``softmax(L + g)``-weighted mean of the kept blocks' ``v̄``. The kept tokens are thereby
renormalised together with the pooled columns (``kept_log_scale`` stays 0). Fused in the
reference and Triton kernels; FlexAttention cannot fuse it and falls back to the reference.

Gradients (both methods): the block *selection* (critical / pooled / rejected sets, kept blocks,
pooled columns) is piecewise constant and not differentiated; the rectification terms
(``out_scale``, ``out_shift``, ``pooled_k``, ``pooled_v``, ``pooled_log_weight``) are built under
autograd whenever q, k or v require grad, so the gradient is that of the method's output with the
selection held fixed (matches central finite differences: ``tests/test_gradients.py``).

Both: plan with Bp = batch and Hp = heads (selection per sample and head), full blocks only (no
token rule); ``keep=1.0, rectify=False`` is dense attention exactly, and so is
``keep=1.0, rectify=True`` with ``method="authors"`` (``R = 1``, nothing pooled). Without ``v``
(``plan(layout, q, k)``) only the selection is built (no rectification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import TokenLayout
from ..plan import FULL, BlockPlan, Rectification, plan_from_block_mask
from .base import Pattern

__all__ = ["RectifiedSparse", "select_blocks", "pooled_block_probs", "gapr_poolable", "ipar_epilogue", "METHODS"]

METHODS = ("authors", "joint")


def select_blocks(probs: torch.Tensor, keep: Optional[float], mass: Optional[float], *, min_count: int = 1,
                  inclusive: bool = False) -> torch.Tensor:
    """Critical key blocks per query block.

    Args:
        probs: float ``[..., NKB]`` pooled attention probabilities (rows sum to 1).
        keep: fraction of key blocks kept (top-k, ``k = max(min_count, ceil(keep * NKB))``), used
            when ``mass`` is None.
        mass: cumulative-mass threshold in (0, 1]. ``inclusive=False``: the fewest top blocks whose
            mass reaches it; ``inclusive=True`` (the authors' rule): ``#{j : cumsum_j <= mass} + 1``
            blocks. At least ``min_count`` either way.
        min_count: minimum number of blocks (the authors' ``top_k``).
    Returns:
        BoolTensor like ``probs``. Deterministic: ties go to the lower block index.
    """
    nkb = probs.shape[-1]
    order = torch.argsort(-probs, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nkb, device=probs.device).expand_as(order).contiguous())
    if mass is None:
        kcount = max(1, int(min_count), math.ceil(float(keep) * nkb - 1e-9))
        return rank < kcount
    sorted_p = torch.gather(probs, -1, order)
    before = torch.cumsum(sorted_p, -1) - sorted_p  # mass of strictly higher-ranked blocks
    keep_sorted = (before <= mass) if inclusive else (before < mass)
    keep_sorted |= torch.arange(nkb, device=probs.device) < max(1, int(min_count))
    return torch.gather(keep_sorted, -1, rank)


def pooled_block_probs(qp: torch.Tensor, kp: torch.Tensor, counts: torch.Tensor, scale: float,
                       text_k: Optional[torch.Tensor] = None, text_block: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """Implicit full attention over key blocks from pooled queries/keys.

    Args:
        qp: float32 ``[B, H, NQB, D]`` query block means.
        kp: float32 ``[B, H, NKB, D]`` key block means (over the pooled tokens of each block).
        counts: ``[NKB]`` number of pooled tokens per key block (0 = none).
        scale: softmax scale ``s``.
        text_k: optional float32 ``[B, H, T, D]`` isolated (unpooled) keys, e.g. text tokens.
        text_block: int64 ``[T]`` key block of each isolated key (required with ``text_k``).
    Returns:
        float32 ``[B, H, NQB, NKB]``: ``P[a, b]`` proportional to
        ``counts[b] exp(s qp_a.kp_b) + sum_{t in b} exp(s qp_a.text_k_t)``, rows sum to 1.
        Work ``O(NQB (NKB + T) D)``; deterministic (no atomics).
    """
    logits = scale * torch.einsum("bhqd,bhkd->bhqk", qp, kp)
    cnt = counts.to(logits.device, torch.float32)
    logits = torch.where(cnt > 0, logits + cnt.clamp_min(1).log(), torch.full_like(logits, -math.inf))
    if text_k is None:
        return torch.softmax(logits, -1)
    if text_block is None or text_block.shape != text_k.shape[2:3]:
        raise ValueError(f"text_block must be an int tensor [T={text_k.shape[2]}] with text_k")
    lt = scale * torch.einsum("bhqd,bhtd->bhqt", qp, text_k)  # [B, H, NQB, T]
    m = torch.maximum(logits.amax(-1, keepdim=True), lt.amax(-1, keepdim=True))
    onehot = (text_block.to(logits.device)[:, None] == torch.arange(kp.shape[2], device=logits.device)).float()  # [T, NKB]
    w = torch.exp(logits - m) + torch.exp(lt - m) @ onehot
    return w / w.sum(-1, keepdim=True)


def gapr_poolable(qp: torch.Tensor, kp: torch.Tensor, q_dev: torch.Tensor, k_dev: torch.Tensor) -> torch.Tensor:
    """The authors' gain-aware pooling test (GAPR), for every (query block, key block).

    Args:
        qp, kp: float32 ``[B, H, NQB, D]`` / ``[B, H, NKB, D]`` block means.
        q_dev, k_dev: float32, same shapes: per-channel mean absolute deviation from the mean.
    Returns:
        BoolTensor ``[B, H, NQB, NKB]``: gain ``|qp_a.kp_b|`` exceeds the pooling error
        ``|q_dev_a.kp_b| + |qp_a.k_dev_b|`` (pooling the block is expected to help).
    """
    gain = torch.einsum("bhqd,bhkd->bhqk", qp, kp).abs()
    err = torch.einsum("bhqd,bhkd->bhqk", q_dev, kp).abs() + torch.einsum("bhqd,bhkd->bhqk", qp, k_dev).abs()
    return gain > err


def ipar_epilogue(probs: torch.Tensor, pooled: torch.Tensor, vp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' reallocation (IPAR) as an output epilogue.

    Args:
        probs: float32 ``[B, H, NQB, NKB]`` implicit full attention ``P`` (rows sum to 1).
        pooled: BoolTensor ``[B, H, NQB, NKB]``: the pooled set ``G_a`` (non-critical, GAPR passed).
        vp: float32 ``[B, H, NKB, Dv]`` value block means.
    Returns:
        ``(out_scale, out_shift)``: float32 ``[B, H, NQB]`` ``R_a = 1 - sum_{b in G_a} P_ab``
        (= the mass of critical and rejected blocks) and float32 ``[B, H, NQB, Dv]``
        ``sum_{b in G_a} P_ab vp_b``.
    """
    pg = probs * pooled
    return 1.0 - pg.sum(-1), torch.einsum("bhqk,bhkd->bhqd", pg, vp)


def _text_blocks(layout: TokenLayout, seq_len: int, bs: int, device) -> torch.Tensor:
    """BoolTensor ``[NB]``: blocks holding any prefix/suffix (non-grid) token."""
    nb = -(-seq_len // bs)
    starts = torch.arange(nb, device=device) * bs
    ends = torch.clamp(starts + bs, max=seq_len)
    g0, g1 = layout.prefix, layout.prefix + layout.num_grid_tokens
    return (starts < g0) | (ends > g1)


@dataclass(frozen=True)
class RectifiedSparse(Pattern):
    """Dynamic block-sparse attention with pooled rectification (see module docstring).

    Args:
        keep: fraction of key blocks kept per query block (0 < keep <= 1), used when ``mass`` is None.
        rectify: add the rectification (needs ``v``; ``sparse_attention`` passes it).
        block_size: block of pooling and of the plan (default 128, the authors' block).
        mass: optional cumulative pooled-mass threshold in (0, 1] (the authors' ``p_remain_rates``);
            replaces ``keep`` when set.
        keep_diagonal: always keep each query block's own key block.
        dense_text: prefix/suffix tokens attend and are attended densely (and, with
            ``method="authors"``, are isolated keys in the implicit full attention).
        method: ``"authors"`` (IPAR + GAPR, output epilogue; default) or ``"joint"`` (this
            project's fused pooled-column softmax).
        top_k: minimum number of critical blocks per query block (the authors' ``top_k``).
        min_keep: optional minimum *fraction* of the grid key blocks kept per query block: at
            least ``int(min_keep * ceil(N / block_size))`` (the authors' ``top_k =
            select_block_num = int((1 - sa_drop_rate) * img_block_num)``).
        first_frame_square: also keep every (first-frame query block, first-frame key block) pair,
            ``ceil(NB // T)`` blocks each way (the authors' ``first_frame_blocks``; video grids).
    """

    keep: float = 0.25
    rectify: bool = True
    block_size: int = 128
    mass: Optional[float] = None
    keep_diagonal: bool = True
    dense_text: bool = True
    method: str = "authors"
    top_k: int = 1
    min_keep: Optional[float] = None
    first_frame_square: bool = False

    is_dynamic = True

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
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.min_keep is not None and (isinstance(self.min_keep, bool) or not isinstance(self.min_keep, (int, float))
                                          or not 0 <= self.min_keep <= 1):
            raise ValueError(f"min_keep must be None or a float in [0, 1], got {self.min_keep!r}")

    # the authors' scripts (BienLuky/Rectified-SpaAttn @ 4b0aa10, scripts/main_*.py): sa_drop_rate
    AUTHORS_DROP_RATES = {"wan21": 0.75, "wan22": 0.85, "hunyuan": 0.8, "flux": 0.9}

    @classmethod
    def from_authors(cls, model: str = "wan21", drop_rate: Optional[float] = None) -> "RectifiedSparse":
        """The authors' IPAR + GAPR with their scripts' defaults.

        Follows BienLuky/Rectified-SpaAttn at commit ``4b0aa10c87ce254951efc269b231642b68ef7eff``
        (``rectified_spaattn/rectified_wan21_attn.py`` ``_build_block_index_with_importance_optimized``
        / ``block_sparse_attention_combined``, ``scripts/main_wan21t2v.py``): block 128 both ways;
        critical blocks ``#{j : cumsum_j <= p_remain_rates} + 1`` with ``p_remain_rates = 0.3``, at
        least ``select_block_num = int((1 - sa_drop_rate) * img_block_num)`` (drop rate 0.75 Wan 2.1,
        0.85 Wan 2.2, 0.8 HunyuanVideo, 0.9 FLUX); the first-frame block square for video models;
        text keys isolated in the implicit attention and text blocks kept both ways; GAPR pooling
        of the non-critical blocks and the IPAR output correction.

        Deliberate differences (see the module docstring): the diagonal block stands in for their
        Hilbert-curve 26-neighbour static mask and no Hilbert token reordering is done; the ragged
        last block is pooled over its real tokens; dense warm-up (their first 2 layers and first 5
        steps) is the pipeline schedule's job.

        Args:
            model: ``"wan21" | "wan22" | "hunyuan" | "flux"`` (selects the drop rate).
            drop_rate: override of ``sa_drop_rate``.
        """
        if model not in cls.AUTHORS_DROP_RATES:
            raise ValueError(f"model must be one of {sorted(cls.AUTHORS_DROP_RATES)}, got {model!r}")
        drop = cls.AUTHORS_DROP_RATES[model] if drop_rate is None else float(drop_rate)
        if not 0 <= drop < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        return cls(keep=max(1e-6, 1 - drop), rectify=True, block_size=128, mass=0.3, keep_diagonal=True,
                   dense_text=True, method="authors", top_k=1, min_keep=1 - drop,
                   first_frame_square=model != "flux")

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             v: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Select blocks from pooled Q/K and build the rectified plan.

        Args:
            layout: token layout (``S = layout.seq_len``).
            q: ``[B, S, H, D]``; k: ``[B, S, Hk, D]`` (Hk divides H); v: ``[B, S, Hk, Dv]`` or None
                (then no rectification is built, i.e. selection only).
            scale: softmax scale (default ``D ** -0.5``).
        Returns:
            BlockPlan with Bp = B, Hp = H, full blocks only. ``meta`` holds ``method``,
            ``keep_fraction`` and, when rectified, ``pooled_blocks`` (authors: fraction of
            (qb, kb) pairs in the pooled set; ``pooled_columns`` is the joint method's name).
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
        # the block *selection* is not differentiable (boolean sets); the rectification terms are
        # differentiable functions of q, k, v (pooled means, implicit attention P): built under
        # autograd when an input requires grad, so gradients flow through them (else no graph)
        track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
        with torch.set_grad_enabled(track):
            build = self._plan_authors if self.method == "authors" else self._plan_joint
            kept, rect, extra = build(layout, q, k, v, s)
            from vidattn.kernels.pooling import block_counts

            cnt = block_counts(S, self.block_size, q.device).float()
            classes = torch.where(kept, FULL, 0).to(torch.int8).to(dev)
            pair = cnt[:, None] * cnt[None, :]
            # 0-dim tensors, not floats: building a per-call plan never waits for the GPU
            density = (kept.float() * pair).sum() / (B * H * S * S)
        meta = dict(pattern="rectified", method=self.method, keep=float(self.keep), mass=self.mass,
                    rectify=self.rectify, keep_fraction=kept.float().mean(), **extra)
        return plan_from_block_mask(classes, seq_len=S, block_q=self.block_size, block_k=self.block_size, rule=None,
                                    token_density=density, rectification=None if rect is None else rect.to(dev),
                                    meta=meta, full_only=True)

    # ------------------------------------------------------------------ shared
    def _min_count(self, layout: TokenLayout) -> int:
        """Minimum critical blocks per query block: ``max(top_k, int(min_keep * grid blocks))``."""
        if self.min_keep is None:
            return self.top_k
        return max(self.top_k, int(self.min_keep * -(-layout.num_grid_tokens // self.block_size)))

    def _force(self, kept: torch.Tensor, layout: TokenLayout, S: int) -> torch.Tensor:
        """Add the diagonal and text blocks (rows and columns) to a ``[B, H, NQB, NKB]`` selection."""
        nb = kept.shape[-1]
        if self.keep_diagonal:
            kept = kept | torch.eye(nb, dtype=torch.bool, device=kept.device)
        if self.first_frame_square and layout.ndim == 3 and layout.grid[0] > 0:
            nvb = -(-layout.num_grid_tokens // self.block_size)
            ffb = nvb // layout.grid[0]
            if ffb > 0:
                sq = torch.zeros(nb, nb, dtype=torch.bool, device=kept.device)
                off = layout.prefix // self.block_size  # blocks are counted from the first video token
                sq[off:off + ffb, off:off + ffb] = True
                kept = kept | sq
        if self.dense_text and (layout.prefix or layout.suffix):
            has_text = _text_blocks(layout, S, self.block_size, kept.device)
            kept = kept | has_text[None, None, None, :] | has_text[None, None, :, None]
        return kept

    # ------------------------------------------------------------------ authors
    def _plan_authors(self, layout: TokenLayout, q, k, v, s: float):
        """Authors' IPAR/GAPR. Returns ``(critical [B, H, NB, NB] bool, Rectification or None, meta)``."""
        from vidattn.kernels.pooling import block_counts, block_masked_mean, block_mean_absdev, block_mean_pool

        B, S, H, D = q.shape
        bs = self.block_size
        rep = H // k.shape[2]
        qp, qdev = block_mean_absdev(q, bs)
        kp, kdev = (t.repeat_interleave(rep, 1) for t in block_mean_absdev(k, bs))  # [B, H, NB, D]
        cnt = block_counts(S, bs, q.device)
        if self.dense_text and (layout.prefix or layout.suffix):
            grid_tok = torch.zeros(S, dtype=torch.bool, device=q.device)
            grid_tok[layout.grid_slice] = True
            kg, cnt_g = block_masked_mean(k, bs, grid_tok)
            gs = layout.grid_slice
            text_idx = torch.cat([torch.arange(0, gs.start), torch.arange(gs.stop, S)]).to(q.device)  # no sync
            text_k = k[:, text_idx].transpose(1, 2).float().repeat_interleave(rep, 1)  # [B, H, T, D]
            probs = pooled_block_probs(qp, kg.repeat_interleave(rep, 1), cnt_g, s, text_k, text_idx // bs)
        else:
            probs = pooled_block_probs(qp, kp, cnt, s)
        crit = select_blocks(probs, self.keep, self.mass, min_count=self._min_count(layout), inclusive=True)
        crit = self._force(crit, layout, S)
        if not (self.rectify and v is not None):
            return crit, None, {}
        pooled = (~crit) & gapr_poolable(qp, kp, qdev, kdev)
        vp = block_mean_pool(v, bs).repeat_interleave(rep, 1)
        out_scale, out_shift = ipar_epilogue(probs, pooled, vp)
        rect = Rectification(out_scale=out_scale.float(), out_shift=out_shift.float())
        rejected = (~crit) & (~pooled)
        return crit, rect, dict(pooled_blocks=pooled.float().mean(), rejected_blocks=rejected.float().mean(),
                                mean_out_scale=out_scale.mean())

    # ------------------------------------------------------------------ joint
    def _plan_joint(self, layout: TokenLayout, q, k, v, s: float):
        """This project's fused pooled-column softmax. Returns ``(kept, Rectification or None, meta)``."""
        from vidattn.kernels.pooling import block_counts, block_moments

        B, S, H, D = q.shape
        bs = self.block_size
        rep = H // k.shape[2]
        qp, _ = block_moments(q, bs)
        kp, kvar = block_moments(k, bs)
        kp, kvar = kp.repeat_interleave(rep, 1), kvar.repeat_interleave(rep, 1)  # [B, H, NB, D]
        cnt = block_counts(S, bs, q.device).float()
        logits = s * torch.einsum("bhqd,bhkd->bhqk", qp, kp) + cnt.log()
        probs = torch.softmax(logits, -1)
        kept = select_blocks(probs, self.keep, self.mass, min_count=self._min_count(layout))
        kept = self._force(kept, layout, S)
        if not (self.rectify and v is not None):
            return kept, None, {}
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
        rect = Rectification(kept_log_scale=None, pooled_k=kp, pooled_v=vp, pooled_log_weight=pw.float())
        frac = comp.float().mean()
        return kept, rect, dict(pooled_columns=frac, pooled_blocks=frac)

"""BlockPlan: the one structure every pattern compiles to and every backend executes.

Modeled on FlexAttention's ``BlockMask``. The sequence (after an optional token permutation) is
cut into query blocks of ``block_q`` tokens and key blocks of ``block_k`` tokens (the last block
of each may be short). For each (batch or 1, head or 1, query block) the plan lists

* *full* key blocks: every (query, key) pair inside is allowed, no masking work;
* *partial* key blocks: a token-level :class:`TokenRule` decides pair by pair.

Key blocks not listed are skipped. Optional extras:

* ``perm``: LongTensor ``[Hp, S]`` (Hp = 1 or heads). The plan's block indices refer to the
  permuted order ``x_perm[:, i] = x[:, perm[h, i]]``; backends permute Q/K/V per head before and
  inverse-permute the output after. The rule always receives *original* token indices.
* ``rectification``: :class:`Rectification` terms (RectifiedSparse): fused into the softmax and/or
  an output epilogue ``out = scale * O + shift`` per query block, applied by ``run_plan``.

A plan is pure data: cache it per (layout, pattern, device) and reuse it across layers/steps.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass, field, replace
from typing import Optional, Union

import torch

__all__ = [
    "BlockPlan",
    "TokenRule",
    "Rectification",
    "indices_from_block_mask",
    "plan_from_rule",
    "plan_from_block_mask",
    "estimate_block_density",
]

# Block classes in a classified block mask.
EMPTY, PARTIAL, FULL = 0, 1, 2


class TokenRule:
    """Token-level rule of a pattern: which (query, key) pairs may attend.

    Subclasses implement :meth:`__call__` with broadcasting torch ops only (no Python control
    flow on tensor values), so the same rule serves the reference backend, FlexAttention
    ``mask_mod`` (under vmap) and, for known subclasses, the Triton kernel (which re-implements
    the rule in-kernel from the subclass's fields). Rules must accept any index in ``[0, S)``.
    """

    def __call__(self, h: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
        """Args: ``h`` head index, ``q_idx``/``k_idx`` original token indices; integer tensors
        that broadcast together. Returns a BoolTensor of the broadcast shape."""
        raise NotImplementedError

    def kernel_form(self):
        """The rule's kernel-neutral compiled form (a dataclass of :mod:`vidattn.rules`) for
        backends that evaluate it in-kernel, or None (backends then use the torch rule)."""
        return None


@dataclass(frozen=True, eq=False)
class Rectification:
    """Rectification terms of a plan (RectifiedSparse). Two independent kinds:

    *Fused* terms (``method="joint"``), inside the block-sparse softmax. For query token ``i`` in
    query block ``qb`` (plan order) the softmax runs over

    * every listed key ``j`` (in key block ``kb``) with logit ``scale * q_i.k_j + kept_log_scale[b, h, qb, kb]``;
    * one extra *pooled column* per key block ``kb`` with logit
      ``scale * q_i.pooled_k[b, h, kb] + pooled_log_weight[b, h, qb, kb]`` and value ``pooled_v[b, h, kb]``
      (``-inf`` weight = column absent; ``log(n_tokens)`` reproduces a block of identical keys).

    Only the reference and Triton backends fuse these (flex refuses them and falls back).

    *Epilogue* terms (``method="authors"``), applied to the finished sparse output ``O`` by
    :func:`vidattn.attention.run_plan` after whichever backend ran (backends never see them):
    ``out_i = out_scale[b, h, qb] * O_i + out_shift[b, h, qb, :]`` (plan order; ``O_i`` is the
    softmax attention over the listed blocks, with the fused terms if any). ``None`` means scale 1
    / shift 0.

    Shapes (Bp = batch or 1, Hp = heads or 1, NQB/NKB = number of query/key blocks, Dv value dim):
        kept_log_scale: float32 ``[Bp, Hp, NQB, NKB]`` or None (0 everywhere).
        pooled_k, pooled_v: ``[Bp, Hp, NKB, D]`` (any float dtype) or None.
        pooled_log_weight: float32 ``[Bp, Hp, NQB, NKB]`` or None.
        out_scale: float32 ``[Bp, Hp, NQB]`` or None.
        out_shift: float32 ``[Bp, Hp, NQB, Dv]`` or None.
    """

    kept_log_scale: Optional[torch.Tensor] = None
    pooled_k: Optional[torch.Tensor] = None
    pooled_v: Optional[torch.Tensor] = None
    pooled_log_weight: Optional[torch.Tensor] = None
    out_scale: Optional[torch.Tensor] = None
    out_shift: Optional[torch.Tensor] = None

    def __post_init__(self):
        has_pool = [t is not None for t in (self.pooled_k, self.pooled_v, self.pooled_log_weight)]
        if any(has_pool) and not all(has_pool):
            raise ValueError("pooled_k, pooled_v and pooled_log_weight must be given together")
        if self.out_scale is not None and (not isinstance(self.out_scale, torch.Tensor) or self.out_scale.dim() != 3):
            raise ValueError(f"out_scale must be a float tensor [Bp, Hp, NQB], got {getattr(self.out_scale, 'shape', self.out_scale)}")
        if self.out_shift is not None and (not isinstance(self.out_shift, torch.Tensor) or self.out_shift.dim() != 4):
            raise ValueError(f"out_shift must be a float tensor [Bp, Hp, NQB, Dv], got {getattr(self.out_shift, 'shape', self.out_shift)}")

    @property
    def has_pooled(self) -> bool:
        return self.pooled_k is not None

    @property
    def has_fused(self) -> bool:
        """True if the softmax itself carries terms (``kept_log_scale`` or pooled columns)."""
        return self.kept_log_scale is not None or self.has_pooled

    @property
    def has_epilogue(self) -> bool:
        """True if ``out_scale`` or ``out_shift`` is set."""
        return self.out_scale is not None or self.out_shift is not None

    def without_epilogue(self) -> Optional["Rectification"]:
        """The fused terms only (None if there are none): what a backend executes."""
        if not self.has_fused:
            return None
        return Rectification(self.kept_log_scale, self.pooled_k, self.pooled_v, self.pooled_log_weight)

    def to(self, device) -> "Rectification":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Rectification(mv(self.kept_log_scale), mv(self.pooled_k), mv(self.pooled_v),
                             mv(self.pooled_log_weight), mv(self.out_scale), mv(self.out_shift))


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Block-sparse execution plan (see module docstring).

    Attributes:
        seq_len: ``S`` (queries and keys; self-attention).
        block_q, block_k: block sizes in tokens.
        kv_num_blocks: int32 ``[Bp, Hp, NQB]`` partial key blocks per query block.
        kv_indices: int32 ``[Bp, Hp, NQB, MP]`` their key-block indices, ascending, padded with 0.
        full_kv_num_blocks: int32 ``[Bp, Hp, NQB]`` full key blocks per query block.
        full_kv_indices: int32 ``[Bp, Hp, NQB, MF]``, ascending, padded with 0.
        rule: :class:`TokenRule` for partial blocks (None only if there are none).
        perm: LongTensor ``[Hp, S]`` token order of the plan, or None (identity).
        rectification: :class:`Rectification` or None.
        token_density: fraction of the S*S (query, key) pairs allowed (averaged over Bp*Hp); a
            float, or a 0-dim tensor for dynamic per-call plans (read it with ``float()``).
        meta: free-form description (pattern name, per-head choices, ...).
    """

    seq_len: int
    block_q: int
    block_k: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    rule: Optional[TokenRule] = None
    perm: Optional[torch.Tensor] = None
    rectification: Optional[Rectification] = None
    token_density: Union[float, torch.Tensor] = 1.0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("seq_len", "block_q", "block_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"BlockPlan {name} must be an int >= 1, got {val!r}")

    # ------------------------------------------------------------ geometry
    @property
    def num_q_blocks(self) -> int:
        return -(-self.seq_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.seq_len // self.block_k)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def plan_batch(self) -> int:
        """Bp: 1 (shared by the batch) or the batch size."""
        return self.kv_num_blocks.shape[0]

    @property
    def plan_heads(self) -> int:
        """Hp: 1 (shared by all heads) or the number of query heads."""
        return self.kv_num_blocks.shape[1]

    @functools.cached_property
    def has_partial(self) -> bool:
        """Whether any partial block is listed (computed once per plan: one host sync, none for a
        plan built with no partial slots)."""
        if self.kv_indices.shape[-1] == 0:
            return False
        return bool(self.kv_num_blocks.max().item() > 0) if self.kv_num_blocks.numel() else False

    @functools.cached_property
    def block_density(self) -> float:
        """Fraction of (query block, key block) pairs computed (full + partial), averaged
        (computed once per plan: one host sync)."""
        tot = self.kv_num_blocks.double().sum() + self.full_kv_num_blocks.double().sum()
        return float(tot / (self.kv_num_blocks.numel() * self.num_k_blocks))

    @property
    def sparsity(self) -> float:
        """``1 - token_density``."""
        return 1.0 - float(self.token_density)

    def to(self, device) -> "BlockPlan":
        """Same plan on another device."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            kv_num_blocks=mv(self.kv_num_blocks),
            kv_indices=mv(self.kv_indices),
            full_kv_num_blocks=mv(self.full_kv_num_blocks),
            full_kv_indices=mv(self.full_kv_indices),
            perm=mv(self.perm),
            rectification=None if self.rectification is None else self.rectification.to(device),
        )

    # ------------------------------------------------------------ inspection
    def block_classes(self) -> torch.Tensor:
        """Int8 ``[Bp, Hp, NQB, NKB]``: 0 skipped, 1 partial, 2 full."""
        bp, hp, nqb = self.kv_num_blocks.shape
        out = torch.zeros(bp, hp, nqb, self.num_k_blocks, dtype=torch.int8, device=self.device)
        for num, idx, val in ((self.kv_num_blocks, self.kv_indices, PARTIAL),
                              (self.full_kv_num_blocks, self.full_kv_indices, FULL)):
            if idx.shape[-1] == 0:
                continue
            valid = torch.arange(idx.shape[-1], device=self.device) < num[..., None].long()
            src = torch.where(valid, torch.full_like(idx, val, dtype=torch.int8), torch.zeros_like(idx, dtype=torch.int8))
            cur = torch.zeros_like(out)
            cur.scatter_reduce_(-1, idx.long(), src, reduce="amax")
            out = torch.maximum(out, cur)
        return out

    def token_mask(self) -> torch.Tensor:
        """Token-level mask the plan executes, in *original* token order (for tests and small S).

        Returns:
            BoolTensor ``[Bp, Hp, S, S]`` (True = query may attend key). Costs S*S memory.
        """
        S = self.seq_len
        dev = self.device
        cls = self.block_classes()  # [Bp, Hp, NQB, NKB]
        qb = torch.arange(S, device=dev) // self.block_q
        kb = torch.arange(S, device=dev) // self.block_k
        tok_cls = cls[:, :, qb][:, :, :, kb]  # [Bp, Hp, S, S] in plan order
        bp, hp = cls.shape[:2]
        pos = torch.arange(S, device=dev)
        perm = self.perm if self.perm is not None else pos[None]
        out = torch.zeros(bp, hp, S, S, dtype=torch.bool, device=dev)
        for h in range(hp):
            ph = perm[h if perm.shape[0] > 1 else 0]
            allowed = tok_cls[:, h] == FULL
            if self.rule is not None:
                r = self.rule(torch.tensor(h, device=dev), ph[:, None], ph[None, :])
                allowed = allowed | ((tok_cls[:, h] == PARTIAL) & r)
            inv = torch.empty_like(ph)
            inv[ph] = pos
            out[:, h] = allowed[:, inv][:, :, inv]
        return out

    def describe(self) -> dict:
        """Small JSON-able summary: sizes, densities and meta."""
        return dict(
            seq_len=self.seq_len,
            block_q=self.block_q,
            block_k=self.block_k,
            plan_batch=self.plan_batch,
            plan_heads=self.plan_heads,
            token_density=round(float(self.token_density), 6),
            block_density=round(self.block_density, 6),
            permuted=self.perm is not None,
            rectified=self.rectification is not None,
            epilogue=self.rectification is not None and self.rectification.has_epilogue,
            **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in self.meta.items()
               if isinstance(v, (int, float, str, bool, list, tuple))
               or (isinstance(v, torch.Tensor) and v.numel() == 1)},
        )


def indices_from_block_mask(mask: torch.Tensor, width: Optional[int] = None):
    """Convert a boolean block mask into FlexAttention-style (num, indices).

    Args:
        mask: BoolTensor ``[Bp, Hp, NQB, NKB]``.
        width: index slots per query block; default ``max(num)`` (one host sync). Pass ``NKB``
            (or a known bound) to build without synchronising (dynamic per-call plans).
    Returns:
        ``(num, idx)``: int32 ``[Bp, Hp, NQB]`` and int32 ``[Bp, Hp, NQB, width]`` (ascending
        block indices, padded with 0).
    """
    num = mask.sum(-1, dtype=torch.int32)
    if width is None:
        width = int(num.max().item()) if num.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=mask.device) < num[..., None]
    idx = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32)
    return num, idx


def plan_from_block_mask(block_classes: torch.Tensor, *, seq_len: int, block_q: int, block_k: int,
                         rule: Optional[TokenRule], perm: Optional[torch.Tensor] = None,
                         token_density, rectification: Optional[Rectification] = None,
                         meta: Optional[dict] = None, full_only: bool = False) -> BlockPlan:
    """Build a :class:`BlockPlan` from classified blocks.

    Args:
        block_classes: int ``[Bp, Hp, NQB, NKB]`` with 0 = skip, 1 = partial, 2 = full.
        token_density: float, or a 0-dim tensor (dynamic plans: no host sync).
        full_only: the caller guarantees no partial block (e.g. dynamic block selection): the
            plan is then built without any host synchronisation (index lists NKB wide).
    """
    if full_only:
        shape = block_classes.shape
        num_p = torch.zeros(shape[:-1], dtype=torch.int32, device=block_classes.device)
        idx_p = torch.zeros(*shape[:-1], 0, dtype=torch.int32, device=block_classes.device)
        num_f, idx_f = indices_from_block_mask(block_classes == FULL, width=shape[-1])
    else:
        num_p, idx_p = indices_from_block_mask(block_classes == PARTIAL)
        num_f, idx_f = indices_from_block_mask(block_classes == FULL)
        if rule is None and int(num_p.max().item() if num_p.numel() else 0) > 0:
            raise ValueError("a plan with partial blocks needs a token rule")
    return BlockPlan(seq_len=seq_len, block_q=block_q, block_k=block_k, kv_num_blocks=num_p,
                     kv_indices=idx_p, full_kv_num_blocks=num_f, full_kv_indices=idx_f, rule=rule,
                     perm=perm, rectification=rectification,
                     token_density=token_density if isinstance(token_density, torch.Tensor) else float(token_density),
                     meta=dict(meta or {}))


def plan_from_rule(rule: TokenRule, *, seq_len: int, block_q: int, block_k: int, num_heads: int = 1,
                   perm: Optional[torch.Tensor] = None, candidates: Optional[torch.Tensor] = None,
                   device=None, meta: Optional[dict] = None, max_pairs_per_chunk: int = 1 << 24) -> BlockPlan:
    """Classify every (query block, key block) of a static token rule into skip/partial/full.

    The rule is evaluated on whole rows of query blocks in chunks of at most
    ``max_pairs_per_chunk`` (query, key) pairs, so memory stays bounded; total work is
    ``Hp * S * S`` rule evaluations (cheap integer ops; done once, then cached).

    Args:
        rule: the token rule (original indices).
        num_heads: Hp, 1 if the rule ignores the head.
        perm: optional LongTensor ``[Hp or 1, S]``; blocks are cut in this order.
        candidates: optional BoolTensor ``[Hp or 1, NQB, NKB]``: a superset of the blocks that may
            hold allowed pairs; other blocks are not evaluated.
    Returns:
        BlockPlan with Bp = 1.
    """
    S = seq_len
    dev = torch.device(device) if device is not None else torch.device("cpu")
    nqb = -(-S // block_q)
    nkb = -(-S // block_k)
    pos = torch.arange(S, device=dev)
    if perm is not None:
        perm = perm.to(dev)
        if perm.dim() == 1:
            perm = perm[None]
    classes = torch.zeros(num_heads, nqb, nkb, dtype=torch.int8, device=dev)
    allowed_total = 0
    pad_k = nkb * block_k - S
    rows_per_chunk = max(1, max_pairs_per_chunk // max(1, S * block_q)) * block_q
    for h in range(num_heads):
        ph = pos if perm is None else perm[h if perm.shape[0] > 1 else 0]
        hh = torch.tensor(h, device=dev)
        for r0 in range(0, S, rows_per_chunk):
            r1 = min(S, r0 + rows_per_chunk)
            qi = ph[r0:r1]
            if candidates is not None:
                cand = candidates[h if candidates.shape[0] > 1 else 0, r0 // block_q: -(-r1 // block_q)]
                kblocks = cand.any(0).nonzero().flatten()
                if kblocks.numel() == 0:
                    continue
                kpos = (kblocks[:, None] * block_k + torch.arange(block_k, device=dev)).flatten()
                kvalid = kpos < S
                kpos_c = kpos.clamp(max=S - 1)
                m = rule(hh, qi[:, None], ph[kpos_c][None, :]) & kvalid[None, :]
                allowed_total += int(m.sum().item())
                rows = r1 - r0
                padr = -rows % block_q
                m = torch.nn.functional.pad(m, (0, 0, 0, padr))
                cnt = m.view(-1, block_q, kblocks.numel(), block_k).sum((1, 3))
                qsz = torch.clamp(S - torch.arange(r0, r0 + rows + padr, block_q, device=dev), max=block_q)[:, None]
                ksz = torch.clamp(S - kblocks * block_k, max=block_k)[None, :]
                cls = torch.where(cnt == 0, EMPTY, torch.where(cnt == qsz * ksz, FULL, PARTIAL)).to(torch.int8)
                cls = cls * cand[:, kblocks].to(torch.int8).clamp(max=1)
                classes[h, r0 // block_q: r0 // block_q + cls.shape[0], kblocks] = cls
            else:
                m = rule(hh, qi[:, None], ph[None, :])
                allowed_total += int(m.sum().item())
                rows = r1 - r0
                m = torch.nn.functional.pad(m, (0, pad_k, 0, -rows % block_q))
                cnt = m.view(-1, block_q, nkb, block_k).sum((1, 3))
                qstart = torch.arange(r0, r0 + cnt.shape[0] * block_q, block_q, device=dev)
                qsz = torch.clamp(S - qstart, max=block_q)[:, None]
                ksz = torch.clamp(S - torch.arange(nkb, device=dev) * block_k, max=block_k)[None, :]
                cls = torch.where(cnt == 0, EMPTY, torch.where(cnt == qsz * ksz, FULL, PARTIAL))
                classes[h, r0 // block_q: r0 // block_q + cls.shape[0]] = cls.to(torch.int8)
    density = allowed_total / (num_heads * S * S)
    return plan_from_block_mask(classes[None], seq_len=S, block_q=block_q, block_k=block_k, rule=rule,
                                perm=perm, token_density=density, meta=meta)


def estimate_block_density(rule: TokenRule, perm: Optional[torch.Tensor], seq_len: int, block: int,
                           samples: int = 16, device=None) -> float:
    """Fraction of key blocks touched by ``samples`` evenly spaced query blocks of a static rule
    in token order ``perm`` (LongTensor ``[S]`` or None): a cheap estimate of a plan's block
    density (``samples * block * S`` rule evaluations) used to choose token orders."""
    S = seq_len
    dev = torch.device(device) if device is not None else torch.device("cpu")
    order = torch.arange(S, device=dev) if perm is None else perm.to(dev).reshape(-1)
    nqb = nkb = -(-S // block)
    picks = torch.linspace(0, nqb - 1, min(samples, nqb)).round().long().unique().tolist()
    rows = torch.cat([torch.arange(b * block, min(S, (b + 1) * block), device=dev) for b in picks])
    m = rule(torch.tensor(0, device=dev), order[rows][:, None], order[None, :])
    m = torch.nn.functional.pad(m, (0, nkb * block - S))
    touched = m.view(m.shape[0], nkb, block).any(-1)  # [rows, nkb]
    blk = torch.repeat_interleave(torch.arange(len(picks), device=dev),
                                  torch.tensor([min(S, (b + 1) * block) - b * block for b in picks], device=dev))
    per_block = torch.zeros(len(picks), nkb, dtype=torch.bool, device=dev)
    per_block.index_put_((blk,), touched, accumulate=True)
    return float(per_block.float().mean())

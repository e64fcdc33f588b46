"""Convert a :class:`vidattn.plan.BlockPlan` to FlashAttention-4's block-sparse tensors.

FlashAttention-4 (``flash-attn-4``, CuTe DSL; ``flash_attn.cute.flash_attn_func(q, k, v,
block_sparse_tensors=...)``) takes per (batch, head, query block) two key-block lists, in the
format its ``flash_attn/cute/block_sparsity.py`` (``BlockSparseTensorsTorch``) checks:

- ``mask_block_cnt`` int32 ``[B|1, H|1, M]`` / ``mask_block_idx`` int32 ``[B|1, H|1, M, W]``:
  blocks computed with the ``mask_mod`` applied (our *partial* blocks);
- ``full_block_cnt`` / ``full_block_idx``: same shapes, blocks computed unmasked (our *full* blocks);
- ``block_size=(block_q, block_k)``: ``M = ceil(S_q / block_q)``; ``W <= ceil(S_k / block_k)``
  (only the first ``cnt`` entries of a row are read); a size-1 batch or head dimension broadcasts.

On Hopper (sm90) its forward kernel (``flash_fwd_sm90.py``) needs ``block_k == tile_n`` and
``block_q`` a multiple of ``tile_m`` (``q_subtile_factor = block_q // tile_m``), where
``(tile_m, tile_n)`` is the tile ``interface._tile_size_fwd_sm90`` picks for the head dims; q, k, v
are ``[B, S, H, D]``. Token permutations, rectification and the token rule of partial blocks (a
CuTe ``mask_mod``) have no counterpart here: :func:`fa4_unsupported_reason` names them.

This module imports neither torch.cuda nor flash-attn, so the conversion is testable on CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class FA4BlockSparse(NamedTuple):
    """FlashAttention-4 block-sparse tensors (fields named as ``BlockSparseTensorsTorch``'s).

    Attributes:
        mask_block_cnt: int32 ``[Bp, Hp, NQB]`` partial key blocks per query block.
        mask_block_idx: int32 ``[Bp, Hp, NQB, WP]`` their key-block indices (first ``cnt`` valid).
        full_block_cnt: int32 ``[Bp, Hp, NQB]`` full key blocks per query block.
        full_block_idx: int32 ``[Bp, Hp, NQB, WF]`` their key-block indices.
        block_size: ``(block_q, block_k)`` in tokens.
    """

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor
    full_block_idx: torch.Tensor
    block_size: tuple


def fa4_sm90_tile(head_dim: int, head_dim_v: Optional[int] = None, block_q: Optional[int] = None,
                  local: bool = False) -> tuple:
    """The ``(tile_m, tile_n)`` FlashAttention-4 (4.0.0b19) picks for a forward on sm90.

    Mirrors ``flash_attn/cute/interface.py::_tile_size_fwd_sm90`` for non-causal calls: head dim
    <= 64: (192, 128), or (128, 128) when ``block_q`` is not a multiple of 192; <= 96: (192, 144),
    or (128, 128) likewise; <= 128: (128, 128); <= 192: (128, 128 if head_dim_v <= 128 else 112,
    96 if local); else (128, 80, 64 if local).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be an int >= 1, got {head_dim!r}")
    dv = head_dim if head_dim_v is None else head_dim_v
    not192 = block_q is not None and block_q % 192 != 0
    if head_dim <= 64:
        return (128, 128) if not192 else (192, 128)
    if head_dim <= 96:
        return (128, 128) if not192 else (192, 144)
    if head_dim <= 128:
        return (128, 128)
    if head_dim <= 192:
        return (128, 96 if local else (128 if dv <= 128 else 112))
    return (128, 64 if local else 80)


def fa4_unsupported_reason(plan, head_dim: int, arch: int = 90) -> Optional[str]:
    """Why FlashAttention-4's block-sparse forward cannot run ``plan`` as given, or None.

    Args:
        plan: :class:`vidattn.plan.BlockPlan`.
        head_dim: D of q/k/v (int).
        arch: compute capability * 10 of the target (90 = Hopper); only 90 is modelled.
    Returns:
        None when :func:`plan_to_fa4_block_sparse` gives tensors the sm90 kernel accepts and that
        compute the same blocks; otherwise a one-line reason (for a benchmark's ``skipped`` field).
    """
    if arch // 10 != 9:
        return f"only the sm90 tile rule is modelled here (arch {arch})"
    tile_m, tile_n = fa4_sm90_tile(head_dim, block_q=plan.block_q)
    if plan.block_k != tile_n:
        return f"FA4 sm90 needs key block == tile_n={tile_n} for head_dim={head_dim}; plan has block_k={plan.block_k}"
    if plan.block_q % tile_m != 0:
        return f"FA4 sm90 needs query block a multiple of tile_m={tile_m}; plan has block_q={plan.block_q}"
    if plan.perm is not None or plan.kv_perm is not None:
        return "plan permutes tokens (perm/kv_perm): FA4 takes no token order"
    if plan.rectification is not None:
        return "plan has a rectification (pooled/fused extra terms): FA4 has no counterpart"
    if plan.has_partial:
        return "plan has partial blocks: FA4 would need the token rule as a CuTe mask_mod (none written)"
    return None


def _pad_width(idx: torch.Tensor) -> torch.Tensor:
    """Int32 contiguous copy with at least one index slot (a zero-width tensor has no CuTe layout)."""
    idx = idx.to(torch.int32)
    if idx.shape[-1] == 0:
        idx = torch.zeros(*idx.shape[:-1], 1, dtype=torch.int32, device=idx.device)
    return idx.contiguous()


def plan_to_fa4_block_sparse(plan) -> FA4BlockSparse:
    """FlashAttention-4 block-sparse tensors for ``plan`` (partial blocks -> mask lists, full -> full).

    Args:
        plan: :class:`vidattn.plan.BlockPlan` with ``kv_num_blocks`` int32 ``[Bp, Hp, NQB]`` etc.
    Returns:
        :class:`FA4BlockSparse` on the plan's device: counts int32 ``[Bp, Hp, NQB]``, indices int32
        ``[Bp, Hp, NQB, max(1, W)]``, ``block_size=(plan.block_q, plan.block_k)``. Bp/Hp stay 1
        where the plan broadcasts (FA4 expands size-1 batch/head dims itself).
    Raises:
        ValueError: when the plan's count/index tensors do not have the documented shapes.
    """
    nqb = plan.num_q_blocks
    pairs = (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"))
    out = []
    for cname, iname in pairs:
        cnt, idx = getattr(plan, cname), getattr(plan, iname)
        if cnt.ndim != 3 or cnt.shape[2] != nqb:
            raise ValueError(f"plan.{cname} must be [Bp, Hp, {nqb}], got {tuple(cnt.shape)}")
        if idx.ndim != 4 or tuple(idx.shape[:3]) != tuple(cnt.shape):
            raise ValueError(f"plan.{iname} must be [{', '.join(map(str, cnt.shape))}, W], got {tuple(idx.shape)}")
        if idx.shape[3] > plan.num_k_blocks:
            raise ValueError(f"plan.{iname} has {idx.shape[3]} slots, more than the {plan.num_k_blocks} key blocks")
        out += [cnt.to(torch.int32).contiguous(), _pad_width(idx)]
    return FA4BlockSparse(mask_block_cnt=out[0], mask_block_idx=out[1], full_block_cnt=out[2],
                          full_block_idx=out[3], block_size=(plan.block_q, plan.block_k))


def fa4_block_classes(t: FA4BlockSparse, num_k_blocks: int) -> torch.Tensor:
    """Dense block classes read back from FA4 tensors (what FA4 computes), for checks.

    Args:
        t: :class:`FA4BlockSparse` (or anything with its four tensor fields).
        num_k_blocks: NKB.
    Returns:
        int8 ``[Bp, Hp, NQB, NKB]``: 0 skipped, 1 mask (partial) block, 2 full block; a block in
        both lists reads 3 (FA4 would compute it twice).
    """
    bp, hp, nqb = t.full_block_cnt.shape
    out = torch.zeros(bp, hp, nqb, num_k_blocks, dtype=torch.int8, device=t.full_block_cnt.device)
    for cnt, idx, val in ((t.mask_block_cnt, t.mask_block_idx, 1), (t.full_block_cnt, t.full_block_idx, 2)):
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None].long()
        if bool((idx[valid] >= num_k_blocks).any()) or bool((idx[valid] < 0).any()):
            raise ValueError("an index outside [0, num_k_blocks) is listed")
        hit = torch.zeros(bp, hp, nqb, num_k_blocks + 1, dtype=torch.int8, device=idx.device)
        # invalid slots go to the spare column num_k_blocks, dropped below
        col = torch.where(valid, idx.long(), torch.full_like(idx, num_k_blocks, dtype=torch.long))
        hit.scatter_(-1, col, 1)
        out += hit[..., :num_k_blocks] * val
    return out

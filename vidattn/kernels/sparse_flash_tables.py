"""Per-plan launch tables of the Triton block-sparse kernel, computed once per plan and cached.

Everything here depends on the plan alone (never on Q/K/V values): int32 block lists (full lists
sorted so a ragged last block comes last), program schedules, the int32 token permutation, and the
partial-block rule path with its tables: the in-kernel neighborhood lowering (from the rule's
:class:`vidattn.rules.NeighborhoodForm`) or precomputed per-block uint8 masks (any rule, evaluated
once with the rule in torch, ``P x block_q x block_k`` bytes, never ``S x S``).
"""

from __future__ import annotations

import os
import weakref
from enum import IntEnum
from typing import Optional

import torch
import triton

from vidattn.errors import TritonUnsupported
from vidattn.layout import TokenLayout
from vidattn.plan import BlockPlan
from vidattn.rules import NeighborhoodForm

from .sparse_flash_kernel import RuleMode

__all__ = ["RuleMode", "ProgramOrder", "MASK_BUDGET_BYTES", "neighborhood_tables", "partial_mask_bytes",
           "partial_block_masks", "sorted_full_indices", "program_schedule", "plan_perm_int32", "plan_launch_tables"]


class ProgramOrder(IntEnum):
    """Order in which the kernel's programs run (``VIDATTN_TRITON_SCHED``)."""

    NATURAL = 0  # the 2-D grid (query tile, batch x head)
    HEAVIEST_FIRST = 1  # a 1-D grid by descending key-tile count
    HEADS_ADJACENT = 2  # a 1-D grid, all heads of a query tile side by side


_tables: "weakref.WeakKeyDictionary[BlockPlan, dict]" = weakref.WeakKeyDictionary()


def _plan_cache(plan: BlockPlan) -> dict:
    c = _tables.get(plan)
    if c is None:
        c = {}
        _tables[plan] = c
    return c


def neighborhood_tables(plan: BlockPlan) -> torch.Tensor:
    """int32 ``[Hp, 7, S]``: for each plan position, (in_grid, group0, pos0, group1, pos1, group2,
    pos2) of its original token (dilation group ``x % d`` and in-group position ``x // d`` per axis;
    unused axes are 0)."""
    cache = _plan_cache(plan)
    if "na" not in cache:
        rule = plan.rule.kernel_form()
        if not isinstance(rule, NeighborhoodForm):
            raise TypeError(f"neighborhood_tables needs a rule with a NeighborhoodForm, got {type(plan.rule).__name__}")
        layout = TokenLayout(rule.grid, rule.prefix, rule.suffix)
        S = plan.seq_len
        dev = plan.device
        perm = plan.perm if plan.perm is not None else torch.arange(S, device=dev)[None]
        in_grid, coords = layout.token_coords(perm.to(dev))
        rows = [in_grid.to(torch.int32)]
        for a in range(3):
            if a < len(coords):
                d = rule.dilation[a]
                rows += [(coords[a] % d).to(torch.int32), (coords[a] // d).to(torch.int32)]
            else:
                rows += [torch.zeros_like(rows[0]), torch.zeros_like(rows[0])]
        cache["na"] = torch.stack(rows, 1).contiguous()
    return cache["na"]


MASK_BUDGET_BYTES = int(os.environ.get("VIDATTN_MASK_BUDGET_BYTES", str(3 << 30)))


def partial_mask_bytes(plan: BlockPlan) -> int:
    """Bytes :func:`partial_block_masks` needs for ``plan`` (one byte per pair in partial blocks)."""
    return int(plan.kv_num_blocks.sum()) * plan.block_q * plan.block_k


def partial_block_masks(plan: BlockPlan):
    """The rule inside every listed partial block, computed once per plan with the rule in torch
    (key columns past the sequence end are 0).

    Returns:
        ``(masks, slot_start)``: uint8 ``[P, block_q, block_k]`` (P = all listed partial blocks,
        ordered by (batch, head, query block, slot)) and int64 ``[Bp, Hp, NQB]``, the index in
        ``masks`` of each query block's first partial block.
    """
    cache = _plan_cache(plan)
    if "masks" not in cache:
        S, bq, bk = plan.seq_len, plan.block_q, plan.block_k
        dev = plan.device
        num = plan.kv_num_blocks.long()
        slot_start = (torch.cumsum(num.flatten(), 0) - num.flatten()).view(num.shape)
        mp = plan.kv_indices.shape[-1]
        valid = torch.arange(mp, device=dev) < num[..., None]
        b_i, h_i, q_i, j_i = valid.nonzero(as_tuple=True)  # row-major == slot order
        k_i = plan.kv_indices.long()[b_i, h_i, q_i, j_i]
        P = b_i.numel()
        masks = torch.zeros(max(P, 1), bq, bk, dtype=torch.uint8, device=dev)
        perm = plan.perm.to(dev) if plan.perm is not None else torch.arange(S, device=dev)[None]
        kperm = plan.key_perm.to(dev) if plan.key_perm is not None else perm  # keys may have their own order
        ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
        chunk = max(1, (1 << 24) // (bq * bk))
        for c0 in range(0, P, chunk):
            sl = slice(c0, min(P, c0 + chunk))
            hh = h_i[sl]
            ph = perm[hh if perm.shape[0] > 1 else torch.zeros_like(hh)]  # [c, S]
            qpos = (q_i[sl, None] * bq + ar_q).clamp(max=S - 1)
            kpos = (k_i[sl, None] * bk + ar_k).clamp(max=S - 1)
            qo = torch.gather(ph, 1, qpos)
            pk = kperm[hh if kperm.shape[0] > 1 else torch.zeros_like(hh)]
            ko = torch.gather(pk, 1, kpos)
            k_real = (k_i[sl, None] * bk + ar_k) < S  # columns past the sequence: 0, so the kernel needs no tail mask
            masks[sl] = (plan.rule(hh[:, None, None], qo[:, :, None], ko[:, None, :]) & k_real[:, None, :]).to(torch.uint8)
        cache["masks"] = (masks, slot_start.contiguous())
    return cache["masks"]



def sorted_full_indices(plan: BlockPlan) -> torch.Tensor:
    """int32 ``[Bp, Hp, NQB, maxF]``: the plan's full key-block lists sorted ascending (listed
    entries first, padding after), so a ragged last key block is always the last listed one.
    Computed once per plan."""
    cache = _plan_cache(plan)
    if "full_sorted" not in cache:
        idx = plan.full_kv_indices.long()
        num = plan.full_kv_num_blocks.long()
        valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
        big = torch.iinfo(torch.int32).max
        srt = torch.where(valid, idx, big).sort(dim=-1).values
        cache["full_sorted"] = torch.where(valid, srt, 0).to(torch.int32).contiguous()
    return cache["full_sorted"]


def program_schedule(plan: BlockPlan, B: int, H: int, block_m: int,
                     mode: "ProgramOrder" = None) -> torch.Tensor:
    """int32 ``[B * H * NQT]``: program order (items ``bh * NQT + query tile``), cached per plan.
    ``mode`` :attr:`ProgramOrder.HEAVIEST_FIRST` (default): by descending key-tile count;
    :attr:`ProgramOrder.HEADS_ADJACENT`: query-tile major, so all heads of a query tile run side
    by side (they share its per-block masks in L2)."""
    mode = ProgramOrder.HEAVIEST_FIRST if mode is None else ProgramOrder(mode)
    cache = _plan_cache(plan)
    key = ("sched", B, H, block_m, mode)
    if key not in cache:
        nqt = triton.cdiv(plan.seq_len, block_m)
        if mode == ProgramOrder.HEADS_ADJACENT:
            order = torch.arange(B * H * nqt, device=plan.device).view(B * H, nqt).t().flatten()
        else:
            sub = plan.block_q // block_m
            work = (plan.full_kv_num_blocks + plan.kv_num_blocks).expand(B, H, -1)  # [B, H, NQB]
            work = work.repeat_interleave(sub, dim=2)[..., :nqt]
            order = torch.argsort(work.flatten(), descending=True, stable=True)
        cache[key] = order.to(torch.int32).contiguous()
    return cache[key]


def plan_perm_int32(plan: BlockPlan) -> Optional[torch.Tensor]:
    """int32 ``[Hp, S]`` copy of the plan's token permutation (plan position -> original token),
    or None for the identity; cached per plan."""
    if plan.perm is None:
        return None
    cache = _plan_cache(plan)
    if "perm32" not in cache:
        cache["perm32"] = plan.perm.to(device=plan.device, dtype=torch.int32).contiguous()
    return cache["perm32"]


def plan_launch_tables(plan: BlockPlan) -> dict:
    """Everything the launcher derives from a plan alone, computed once per plan (and budget) so
    a cached plan costs no host synchronisation or tensor conversion per call (CUDA-graph safe).

    Returns a dict:
        ``fnum, fidx, pnum, pidx``: int32 block counts ``[Bp, Hp, NQB]`` and lists
        ``[Bp, Hp, NQB, max(1, M)]`` (full lists sorted ascending);
        ``rule_mode``: :class:`RuleMode` of the partial blocks;
        ``na``: int32 neighborhood tables ``[Hp, 7, S]`` (RuleMode.NEIGHBORHOOD) or a dummy;
        ``bits``, ``slot``: per-block uint8 masks and their first-slot index (RuleMode.BLOCK_MASKS);
        ``na_args``: 12 ints (size, kernel, dilation, stride per axis); ``causal``: 3 bools;
        ``dense_nongrid``: bool; ``fdummy``: a float32 placeholder for absent rectification inputs.

    Raises:
        TritonUnsupported: the partial-block masks exceed ``MASK_BUDGET_BYTES`` and the rule has no
            in-kernel form.
    """
    cache = _plan_cache(plan)
    key = ("launch", MASK_BUDGET_BYTES)
    if key in cache:
        return cache[key]
    dev = plan.device
    fidx = sorted_full_indices(plan)
    pidx = plan.kv_indices.to(torch.int32)
    if fidx.shape[-1] == 0:
        fidx = torch.zeros(*fidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    if pidx.shape[-1] == 0:
        pidx = torch.zeros(*pidx.shape[:-1], 1, dtype=torch.int32, device=dev)
    t = dict(fnum=plan.full_kv_num_blocks.to(torch.int32).contiguous(), fidx=fidx.contiguous(),
             pnum=plan.kv_num_blocks.to(torch.int32).contiguous(), pidx=pidx.contiguous(), rule_mode=RuleMode.NONE,
             na=torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev),
             slot=torch.zeros(1, 1, 1, dtype=torch.int64, device=dev),
             fdummy=torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev),  # absent rectification inputs
             na_args=[1, 1, 1, 1] * 3, causal=[False] * 3, dense_nongrid=True)
    t["bits"] = t["na"]
    if plan.has_partial and plan.rule is not None:
        need = partial_mask_bytes(plan)
        fits = need <= MASK_BUDGET_BYTES
        form = plan.rule.kernel_form()
        if isinstance(form, NeighborhoodForm) and not fits:
            t["rule_mode"] = RuleMode.NEIGHBORHOOD
            t["na"] = neighborhood_tables(plan)
            for a in range(len(form.grid)):
                t["na_args"][4 * a: 4 * a + 4] = [form.grid[a], form.kernel_size[a], form.dilation[a], form.stride[a]]
                t["causal"][a] = bool(form.is_causal[a])
            t["dense_nongrid"] = bool(form.dense_nongrid)
        elif fits:
            # precomputed per-block masks: one byte load per pair, the fastest partial-block path
            t["rule_mode"] = RuleMode.BLOCK_MASKS
            t["bits"], t["slot"] = partial_block_masks(plan)
        else:
            raise TritonUnsupported(f"partial-block masks need {need / 2**30:.1f} GiB "
                                    f"(> VIDATTN_MASK_BUDGET_BYTES) and {type(plan.rule).__name__} has no in-kernel form")
    cache[key] = t
    return t


"""Device code of the Hopper (sm_90) block-sparse flash attention forward, written in Gluon.

The portable kernel (:mod:`.sparse_flash_kernel`) leaves software pipelining and the split of
work between warps to Triton. This one states them, the way FlashAttention-3 does on Hopper:

* **warp specialisation**: one producer warp issues the TMA bulk copies of the listed key blocks'
  K and V tiles into a ``STAGES``-deep shared-memory ring (``k_ready`` / ``v_ready`` / ``empty``
  mbarriers); two consumer warpgroups each own 64 of the CTA's 128 query rows and run the online
  softmax with warpgroup MMAs (``wgmma``) on the shared K/V tiles. The producer gives its
  registers to the consumers (``setmaxnreg``).
* **intra-warpgroup overlap**: each consumer issues ``S = Q K^T`` of key tile ``j + 1`` before the
  ``O += P V`` of tile ``j`` and runs the softmax of tile ``j + 1`` while that P.V is in flight; P
  stays in registers as the A operand of the P.V wgmma.

Scope: bf16 / fp16, head dim 64 or 128, plan blocks of 64 or 128 query x ``BLOCK_N`` (64 or 128)
key tokens (``SPLIT``: with 64-token query blocks each consumer warpgroup follows its own block's
key list through its own ring), full blocks and partial blocks (``HAS_PARTIAL``: the precomputed
uint8 token mask of each listed partial block is read under the S MMA), no rectification. The
launcher (:mod:`.sparse_flash_gluon_launch`) checks this before it runs and otherwise uses the
portable kernel. Options: ``PINGPONG`` (the consumer warpgroups take turns issuing their MMAs) and
a persistent grid (the load warp runs ahead into the next work item).

Q is read and O / LSE written at the original token positions through the plan's token
permutation (``Q_PERM``); K/V arrive in plan order, as 2-D tensor descriptors whose tile of key
block ``kb`` of (batch b, kv head hk) is the box at ``(b * ROW_B + hk * ROW_H + kb * BLOCK_N,
hk * COL_H)`` (:func:`.sparse_flash_io.kv_descriptor`). A ragged last key block (``RAGGED``)
has its columns past the sequence masked.

This module holds device code only: no plan, pattern or dispatcher import.
"""


from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from triton.language.core import base_value

try:  # a class of constexpr fields travels into warp-specialised partitions (plain constexprs do not)
    from triton.language.core import _aggregate as aggregate
except ImportError:  # pragma: no cover - other triton versions
    from triton.language.core import aggregate

__all__ = ["_gluon_sparse_flash_fwd"]


@aggregate
class _Modes:
    """The kernel's compile-time modes, as one value the partitions receive."""

    RAGGED: gl.constexpr
    Q_PERM: gl.constexpr
    RETURN_LSE: gl.constexpr
    STAGES: gl.constexpr
    BLOCK_N: gl.constexpr
    BLOCK_D: gl.constexpr
    SPLIT: gl.constexpr
    PINGPONG: gl.constexpr
    HAS_PARTIAL: gl.constexpr
    WG: gl.constexpr  # the consumer warpgroup these modes go to (0 or 1; the producer ignores it)

    @gluon.constexpr_function
    def __init__(self, RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, WG):
        self.RAGGED = gl.constexpr(RAGGED)
        self.Q_PERM = gl.constexpr(Q_PERM)
        self.RETURN_LSE = gl.constexpr(RETURN_LSE)
        self.STAGES = gl.constexpr(STAGES)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.BLOCK_D = gl.constexpr(BLOCK_D)
        self.SPLIT = gl.constexpr(SPLIT)
        self.PINGPONG = gl.constexpr(PINGPONG)
        self.HAS_PARTIAL = gl.constexpr(HAS_PARTIAL)
        self.WG = gl.constexpr(WG)


@gluon.jit
def _softmax_tile(qk, m_i, l_i, tail, col0, S, partial, bits, qk_scale, RAGGED: gl.constexpr,
                  HAS_PARTIAL: gl.constexpr, BLOCK_N: gl.constexpr, dtype: gl.constexpr, p_layout: gl.constexpr,
                  row_o: gl.constexpr):
    """Online-softmax step (base 2) of one key tile: ``qk`` fp32 ``[64, BLOCK_N]`` (wgmma layout),
    ``m_i`` / ``l_i`` fp32 ``[64]``; ``tail``: this is the ragged last key block (columns from
    ``col0``; columns past ``S`` masked); ``partial``: a partial block, whose uint8 token mask
    ``bits`` ``[64, BLOCK_N]`` (0 = masked, also past the sequence end) applies. Returns P (Q's
    dtype, the P.V A-operand layout), the new row max and sum, and the rescale factor of the output
    rows (P.V accumulator row layout)."""
    if RAGGED:
        if tail:
            cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
            qk = gl.where(cols[None, :] < S, qk, float("-inf"))
    if HAS_PARTIAL:
        if partial:
            qk = gl.where(bits != 0, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op, m_new, l_i, gl.convert_layout(alpha, row_o)


@gluon.jit
def _tile_coords(tile, NQT, H, SPLIT: gl.constexpr, WG: gl.constexpr):
    """Work item ``tile`` -> (query tile, batch x head, batch, head, plan query block)."""
    qt = tile % NQT
    bh = tile // NQT
    if SPLIT:
        qb = qt * 2 + WG
    else:
        qb = qt
    return qt, bh, bh // H, bh % H, qb


@gluon.constexpr_function
def _as_value(x):
    """An int argument the JIT specialised to a Python int becomes a constexpr field value."""
    return x if isinstance(x, base_value) else gl.constexpr(x)


@aggregate
class _Partials:
    """The partial-block tables (``HAS_PARTIAL``): counts int32 ``[Bp, Hp, NQB]``, key-block lists
    int32 ``[Bp, Hp, NQB, M]``, uint8 masks ``[P, block_q, block_k]`` and each query block's first
    mask slot int64 ``[Bp, Hp, NQB]``, with their (batch, head, query block) strides."""

    num: gl.tensor
    idx: gl.tensor  # (the int strides below: a tensor, or a constexpr where the JIT specialised them)
    bits: gl.tensor
    slot: gl.tensor
    pn_b: base_value
    pn_h: base_value
    pi_b: base_value
    pi_h: base_value
    pi_q: base_value
    slot_b: base_value
    slot_h: base_value

    @gluon.constexpr_function
    def __init__(self, num, idx, bits, slot, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h):
        self.num = num
        self.idx = idx
        self.bits = bits
        self.slot = slot
        self.pn_b = _as_value(pn_b)
        self.pn_h = _as_value(pn_h)
        self.pi_b = _as_value(pi_b)
        self.pi_h = _as_value(pi_h)
        self.pi_q = _as_value(pi_q)
        self.slot_b = _as_value(slot_b)
        self.slot_h = _as_value(slot_h)


@gluon.jit
def _partial_count(parts, b, h, qb, NQB, HAS_PARTIAL: gl.constexpr):
    """(number of partial blocks, first mask slot) of plan query block ``qb``; (0, 0) without."""
    if HAS_PARTIAL:
        ok = qb < NQB
        npb = gl.load(parts.num + b * parts.pn_b + h * parts.pn_h + qb, mask=ok, other=0)
        slot0 = gl.load(parts.slot + b * parts.slot_b + h * parts.slot_h + qb, mask=ok, other=0)
    else:
        npb = 0
        slot0 = 0
    return npb, slot0


@gluon.jit
def _mask_tile(parts, slot0, partial, i, mask_rows, mask_cols, HAS_PARTIAL: gl.constexpr,
               BLOCK_BYTES: gl.constexpr):
    """uint8 ``[64, BLOCK_N]`` mask of partial block ``i`` of the query block (``BLOCK_BYTES`` per
    block; loaded only when ``partial``; issued before the wait on S so its latency hides under
    the MMA)."""
    if HAS_PARTIAL:
        base = parts.bits + (slot0 + i).to(gl.int64) * BLOCK_BYTES
        ok = (mask_rows >= 0)[:, None] & (mask_cols >= 0)[None, :] & partial
        bits = gl.load(base + mask_rows[:, None] + mask_cols[None, :], mask=ok, other=0)
    else:
        bits = 0
    return bits


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, k_ready, v_ready, empty, turn, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM, qperm_h,
              S, H, NQT, NUM_TILES, NQB, NKB, qk_scale, stride_qb, stride_qh, stride_qs, stride_ob, stride_oh,
              stride_os, fn_b, fn_h, fi_b, fi_h, fi_q, parts, modes):
    """One consumer warpgroup (``modes.WG``; Q tile ``q_smem[WG]``). For each work item of this
    program (persistent: items ``pid``,
    ``pid + grid``, ...): query rows ``qt * 128 + WG * 64 + [0, 64)`` of (batch, head)."""
    RAGGED: gl.constexpr = modes.RAGGED
    Q_PERM: gl.constexpr = modes.Q_PERM
    RETURN_LSE: gl.constexpr = modes.RETURN_LSE
    STAGES: gl.constexpr = modes.STAGES
    BLOCK_N: gl.constexpr = modes.BLOCK_N
    BLOCK_D: gl.constexpr = modes.BLOCK_D
    SPLIT: gl.constexpr = modes.SPLIT
    PINGPONG: gl.constexpr = modes.PINGPONG
    HAS_PARTIAL: gl.constexpr = modes.HAS_PARTIAL
    WG: gl.constexpr = modes.WG
    q_smem = q_smem.index(WG)
    BM: gl.constexpr = 64
    dtype: gl.constexpr = Q.dtype.element_ty
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_N, 16])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    # global Q loads / O stores: 16-byte vectors along D
    io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [4, 1], [1, 0])
    lrow: gl.constexpr = gl.SliceLayout(1, io)
    offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, io))
    zero_s = gl.zeros([BM, BLOCK_N], gl.float32, layout=mma_s)
    # HAS_PARTIAL: offsets of this warpgroup's rows in a partial block's uint8 mask
    PLAN_BQ: gl.constexpr = 64 if SPLIT else 128
    # (row and column vectors only: an [M, N] offset tensor would hold 64 registers per thread)
    mask_rows = ((WG * BM) % PLAN_BQ + gl.arange(0, BM, layout=row_s)) * BLOCK_N
    mask_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_s))
    ring = WG * STAGES if SPLIT else 0  # SPLIT: this warpgroup's own ring
    it = 0  # uses of the ring so far (slot and parity of the next tile)
    sg = 0  # PINGPONG: MMA issue turns taken so far
    for tile in range(gl.program_id(0), NUM_TILES, gl.num_programs(0)):
        qt, bh, b, h, qb = _tile_coords(tile, NQT, H, SPLIT, WG)
        # ---- Q rows of this warpgroup (original token positions through the permutation)
        rows = qt * 128 + WG * BM + gl.arange(0, BM, layout=lrow)
        row_ok = rows < S
        if Q_PERM:
            qtok = gl.load(QPERM + h * qperm_h + rows, mask=row_ok, other=0)
        else:
            qtok = rows
        q_ptrs = Q + b.to(gl.int64) * stride_qb + h * stride_qh + qtok[:, None] * stride_qs + offs_d[None, :]
        q = gl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        q_smem.store(q)  # the last tile's MMAs have completed (waited below)
        fence_async_shared()

        nfb = gl.load(FULL_NUM + b * fn_b + h * fn_h + qb, mask=qb < NQB, other=0)
        f_idx = FULL_IDX + b * fi_b + h * fi_h + qb * fi_q
        # the list is sorted: a ragged last key block can only be its last entry
        # (masked: with SPLIT the last program's second query block may lie past the plan)
        last_col0 = gl.load(f_idx + gl.maximum(nfb - 1, 0), mask=nfb > 0, other=0) * BLOCK_N
        last_ragged = last_col0 + BLOCK_N > S
        # HAS_PARTIAL: the partial blocks follow the full ones in the same ring
        npb, slot0 = _partial_count(parts, b, h, qb, NQB, HAS_PARTIAL)
        ntot = nfb + npb
        m_i = gl.full([BM], -1.0e30, gl.float32, layout=row_s)
        l_i = gl.zeros([BM], gl.float32, layout=row_s)
        acc = gl.zeros([BM, BLOCK_D], gl.float32, layout=mma_o)
        if ntot > 0:
            # ---- tile 0: S = Q K^T, softmax
            s = ring + it % STAGES
            mbarrier.wait(k_ready.index(s), (it // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(WG), sg & 1)
            qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG), count=1)
            bits = _mask_tile(parts, slot0, nfb == 0, 0 - nfb, mask_rows, mask_cols, HAS_PARTIAL, PLAN_BQ * BLOCK_N)
            qk = warpgroup_mma_wait(0, deps=(qk, ))
            p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, last_ragged & (nfb == 1), last_col0, S, nfb == 0, bits,
                                               qk_scale, RAGGED, HAS_PARTIAL, BLOCK_N, dtype, p_layout, row_o)
            # ---- steady state: S of tile j in flight with O += P V of tile j - 1
            for j in range(1, ntot):
                s = ring + (it + j) % STAGES
                sp = ring + (it + j - 1) % STAGES
                mbarrier.wait(k_ready.index(s), ((it + j) // STAGES) & 1)
                mbarrier.wait(v_ready.index(sp), ((it + j - 1) // STAGES) & 1)
                if PINGPONG:  # the warpgroups take turns issuing: one's softmax runs under the other's MMAs
                    mbarrier.wait(turn.index(WG), (sg + j) & 1)
                qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                acc = acc * alpha[:, None]
                acc = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WG), count=1)
                bits = _mask_tile(parts, slot0, j >= nfb, j - nfb, mask_rows, mask_cols, HAS_PARTIAL, PLAN_BQ * BLOCK_N)
                qk = warpgroup_mma_wait(1, deps=(qk, ))
                p_next, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, last_ragged & (j == nfb - 1), last_col0, S,
                                                        j >= nfb, bits, qk_scale, RAGGED, HAS_PARTIAL, BLOCK_N, dtype,
                                                        p_layout, row_o)
                acc, p = warpgroup_mma_wait(0, deps=(acc, p))
                mbarrier.arrive(empty.index(sp), count=1)
                p = p_next
            # ---- last tile's P.V
            sp = ring + (it + ntot - 1) % STAGES
            mbarrier.wait(v_ready.index(sp), ((it + ntot - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (sg + ntot) & 1)
            acc = acc * alpha[:, None]
            acc = warpgroup_mma(p, v_smem.index(sp), acc, is_async=True)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG), count=1)
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))
            mbarrier.arrive(empty.index(sp), count=1)
            it += ntot
            sg += ntot + 1

        # ---- epilogue: normalise, store O (and LSE) at the original token positions
        l_o = gl.convert_layout(l_i, row_o)
        denom = gl.where(l_o > 0, l_o, 1.0)
        out = acc / denom[:, None]
        out = gl.where((l_o > 0)[:, None], out, 0.0)
        out = gl.convert_layout(out.to(dtype), io)
        o_ptrs = O + b.to(gl.int64) * stride_ob + h * stride_oh + qtok[:, None] * stride_os + offs_d[None, :]
        gl.store(o_ptrs, out, mask=row_ok[:, None])
        if RETURN_LSE:
            l_io = gl.convert_layout(l_i, lrow)
            m_io = gl.convert_layout(m_i, lrow)
            lse = gl.where(l_io > 0, (m_io + gl.log2(gl.where(l_io > 0, l_io, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            gl.store(LSE + bh.to(gl.int64) * S + qtok, lse, mask=row_ok)


@gluon.jit
def _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, slot, lap, row, kv_col):
    """Wait for ring slot ``slot`` to be free (its ``lap``-th use), then TMA K and V rows
    ``row .. row + BLOCK_N`` (column ``kv_col``) into it."""
    # a fresh barrier passes a wait on parity 1: the first lap finds every slot free
    mbarrier.wait(empty.index(slot), (lap & 1) ^ 1)
    mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_k, [row, kv_col], k_ready.index(slot), k_smem.index(slot))
    mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_v, [row, kv_col], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _list_entry(f_idx, p_idx, j, nfb, HAS_PARTIAL: gl.constexpr):
    """Key block ``j`` of a query block's list: its full blocks, then (HAS_PARTIAL) its partial ones."""
    if HAS_PARTIAL:
        kb = gl.where(j < nfb, gl.load(f_idx + j, mask=j < nfb, other=0),
                      gl.load(p_idx + (j - nfb), mask=j >= nfb, other=0))
    else:
        kb = gl.load(f_idx + j)
    return kb


@gluon.jit
def _producer(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, FULL_NUM, FULL_IDX, H, HK_GROUP,
              NQT, NUM_TILES, NQB, ROW_B, ROW_H, COL_H, fn_b, fn_h, fi_b, fi_h, fi_q, parts, modes):
    """The load warp: for the same work items as the consumers, TMA copies of the listed key
    blocks' K and V tiles (full blocks, then partial ones) into the ring (with ``SPLIT``, into
    each warpgroup's ring from its own plan block's list, alternating). With a persistent grid it
    runs ahead into the next item while the consumers finish the current one."""
    STAGES: gl.constexpr = modes.STAGES
    BLOCK_N: gl.constexpr = modes.BLOCK_N
    SPLIT: gl.constexpr = modes.SPLIT
    HAS_PARTIAL: gl.constexpr = modes.HAS_PARTIAL
    it0 = 0  # ring uses so far (warpgroup 0's ring with SPLIT)
    it1 = 0  # SPLIT: warpgroup 1's ring
    for tile in range(gl.program_id(0), NUM_TILES, gl.num_programs(0)):
        qt, bh, b, h, qb = _tile_coords(tile, NQT, H, SPLIT, 0)
        hk = h // HK_GROUP
        kv_row0 = b * ROW_B + hk * ROW_H
        kv_col = hk * COL_H
        n0 = gl.load(FULL_NUM + b * fn_b + h * fn_h + qb)
        f0 = FULL_IDX + b * fi_b + h * fi_h + qb * fi_q
        p0 = parts.idx + b * parts.pi_b + h * parts.pi_h + qb * parts.pi_q
        t0 = n0 + _partial_count(parts, b, h, qb, NQB, HAS_PARTIAL)[0]
        if SPLIT:
            qb1 = qb + 1
            n1 = gl.load(FULL_NUM + b * fn_b + h * fn_h + qb1, mask=qb1 < NQB, other=0)
            t1 = n1 + _partial_count(parts, b, h, qb1, NQB, HAS_PARTIAL)[0]
            for j in range(gl.maximum(t0, t1)):
                if j < t0:
                    kb = _list_entry(f0, p0, j, n0, HAS_PARTIAL)
                    _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, (it0 + j) % STAGES,
                               (it0 + j) // STAGES, kv_row0 + kb * BLOCK_N, kv_col)
                if j < t1:
                    kb = _list_entry(f0 + fi_q, p0 + parts.pi_q, j, n1, HAS_PARTIAL)
                    _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, STAGES + (it1 + j) % STAGES,
                               (it1 + j) // STAGES, kv_row0 + kb * BLOCK_N, kv_col)
            it1 += t1
        else:
            for j in range(t0):
                kb = _list_entry(f0, p0, j, n0, HAS_PARTIAL)
                _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, (it0 + j) % STAGES,
                           (it0 + j) // STAGES, kv_row0 + kb * BLOCK_N, kv_col)
        it0 += t0


@gluon.jit
def _gluon_sparse_flash_fwd(
    desc_k, desc_v, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM, qperm_h, PART_NUM, PART_IDX, BITS, SLOT,
    S, H, HK_GROUP, ROW_B, ROW_H, COL_H, NQT, NUM_TILES, NQB, NKB, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
    fn_b, fn_h, fi_b, fi_h, fi_q, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h,
    RAGGED: gl.constexpr, Q_PERM: gl.constexpr, RETURN_LSE: gl.constexpr, STAGES: gl.constexpr,
    SPLIT: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
    HAS_PARTIAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    """A 1-D persistent grid over ``NUM_TILES = NQT * B * H`` work items (item = query tile of 128
    rows, batch x head; query tile fastest); 4 warps (+ 4 consumer and 1 producer warps). Q, O:
    ``[B, S, H, D]`` bf16/fp16 at (batch, head, token) strides; LSE fp32 ``[B, H, S]`` (natural
    log); FULL_NUM int32 ``[Bp, Hp, NQB]`` and FULL_IDX int32 ``[Bp, Hp, NQB, M]`` (sorted) at the
    given strides (0 on broadcast dims); QPERM int32 ``[Hp, S]`` plan position -> original token;
    HAS_PARTIAL: PART_NUM / PART_IDX (the same shapes), BITS uint8 ``[P, block_q, block_k]`` and
    SLOT int64 ``[Bp, Hp, NQB]`` (:func:`.sparse_flash_tables.partial_block_masks`)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_D], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_D], q_layout)
    SLOTS: gl.constexpr = 2 * STAGES if SPLIT else STAGES  # SPLIT: one ring per consumer warpgroup
    k_smem = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, BLOCK_D], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, BLOCK_D], desc_v.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    modes = _Modes(RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, 0)
    modes1 = _Modes(RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, 1)
    parts = _Partials(PART_NUM, PART_IDX, BITS, SLOT, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h)
    # PINGPONG: issue turns of the two consumer warpgroups (warpgroup 0 holds the first)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    if PINGPONG:
        mbarrier.arrive(turn.index(0), count=1)
    for i in gl.static_range(SLOTS):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1 if SPLIT else 2)  # the warpgroups that read a slot
    consumer_args = (q_smem, k_smem, v_smem, k_ready, v_ready, empty, turn, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM,
                     qperm_h, S, H, NQT, NUM_TILES, NQB, NKB, qk_scale, stride_qb, stride_qh, stride_qs, stride_ob,
                     stride_oh, stride_os, fn_b, fn_h, fi_b, fi_h, fi_q, parts)
    producer_args = (k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, FULL_NUM, FULL_IDX, H, HK_GROUP,
                     NQT, NUM_TILES, NQB, ROW_B, ROW_H, COL_H, fn_b, fn_h, fi_b, fi_h, fi_q, parts, modes)
    # the kernel's own warps are consumer warpgroup 0; the workers are warpgroup 1 and the load warp
    gl.warp_specialize([(_consumer, consumer_args + (modes, )), (_consumer, consumer_args + (modes1, )),
                        (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

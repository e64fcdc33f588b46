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
  stays in registers as the A operand of the P.V wgmma. In the SASS of the default build
  (``PINGPONG`` off; ptxas 12.8, triton 3.6) the P.V's wait follows the softmax's exponentials, so
  the overlap happens; with ``PINGPONG`` on, ptxas moves that wait ahead of the softmax.

Scope: bf16 / fp16 inputs, head dim 64 or 128, plan blocks of 64 or 128 query x ``BLOCK_N`` (64 or 128)
key tokens (``SPLIT``: with 64-token query blocks each consumer warpgroup follows its own block's
key list through its own ring), full blocks and partial blocks (``HAS_PARTIAL``: the precomputed
uint8 token mask of each listed partial block is read under the S MMA), no rectification. 8-bit
operands (the quantisation prologue is :mod:`.quant_fp8`): ``QK8``: Q and K arrive as int8
(``QK_INT8``, an s8 x s8 -> s32 wgmma) or e4m3 with fp32 scales per Q token / plan key block,
folded into each tile's logit scale (a row vector); with ``Q_QUANT`` Q arrives in 16 bits and
each consumer warpgroup quantises its rows itself (:func:`_quantize_q_rows`, the prologue's
arithmetic); ``PV8``: V arrives transposed and quantised
per channel (e4m3 ``[B, Hk, D, S_pad]``, tokens contiguous, the K-major B operand FP8 wgmma
needs; within each 32-token group in the order of :data:`.quant_fp8.P8_KEY_DIMS`, the register
order of P, whose keys are permuted the same way), P enters P.V as e4m3 ``p * 448`` (cast next
to the P.V MMA, four logits per register, :func:`_e4m3_packed`; the loop carries P in fp32) and each
tile's P.V is accumulated in fp32 registers with ``PV_SPLIT_ACC`` (the MMA's own accumulation of
8-bit products is not full fp32; this costs registers) or in the MMA's accumulator across tiles;
the epilogue applies the V channel scales. The
launcher (:mod:`.sparse_flash_gluon_launch`) checks this before it runs and otherwise uses the
portable kernel. Options: ``PINGPONG`` (the consumer warpgroups take turns issuing their MMAs),
``ROWSUM_MMA`` (16-bit P.V: the softmax's row sums by a P x ones wgmma of N = 8 issued with each
P.V, :func:`_pv_issue`) and a persistent grid (the load warp runs ahead into the next work item;
with ``Q_PREFETCH`` each consumer warpgroup also loads the next item's Q rows under the current
item's last P.V and epilogue, :func:`_q_rows_load`).

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

from .quant_fp8 import P8_KEY_DIMS  # the key order of the e4m3 P.V operand (and of V^T's tokens)

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
    QK8: gl.constexpr  # Q and K 8-bit (int8 or e4m3): scales per Q token, per K block
    QK_INT8: gl.constexpr  # (QK8) int8, an integer MMA
    PV8: gl.constexpr  # V^T e4m3 with channel scales, P e4m3
    PV_SPLIT_ACC: gl.constexpr  # (PV8) each tile's P.V into fresh registers, added in fp32
    I2F_BITS: gl.constexpr  # (QK_INT8) int32 logits to fp32 by bit arithmetic
    Q_QUANT: gl.constexpr  # (QK8) Q arrives in 16 bits and is quantised per token here
    EXP_POLY: gl.constexpr  # half the softmax exponentials on the FMA pipe (polynomial), half on MUFU
    TAU: gl.constexpr  # lazy rescale: a row keeps its max until a tile raises it by more than TAU (< 0: off)
    ROWSUM_MMA: gl.constexpr  # the softmax row sums by a P x ones wgmma (N = 8) instead of adds in registers
    Q_PREFETCH: gl.constexpr  # (persistent grid) each next work item's Q rows are loaded under this one's tail
    WG: gl.constexpr  # the consumer warpgroup these modes go to (0 or 1; the producer ignores it)

    @gluon.constexpr_function
    def __init__(self, RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, QK8,
                 QK_INT8, PV8, PV_SPLIT_ACC, I2F_BITS, Q_QUANT, EXP_POLY, TAU, ROWSUM_MMA, Q_PREFETCH, WG):
        self.RAGGED = gl.constexpr(RAGGED)
        self.Q_PERM = gl.constexpr(Q_PERM)
        self.RETURN_LSE = gl.constexpr(RETURN_LSE)
        self.STAGES = gl.constexpr(STAGES)
        self.BLOCK_N = gl.constexpr(BLOCK_N)
        self.BLOCK_D = gl.constexpr(BLOCK_D)
        self.SPLIT = gl.constexpr(SPLIT)
        self.PINGPONG = gl.constexpr(PINGPONG)
        self.HAS_PARTIAL = gl.constexpr(HAS_PARTIAL)
        self.QK8 = gl.constexpr(QK8)
        self.QK_INT8 = gl.constexpr(QK_INT8)
        self.PV8 = gl.constexpr(PV8)
        self.PV_SPLIT_ACC = gl.constexpr(PV_SPLIT_ACC)
        self.I2F_BITS = gl.constexpr(I2F_BITS)
        self.Q_QUANT = gl.constexpr(Q_QUANT)
        self.EXP_POLY = gl.constexpr(EXP_POLY)
        self.TAU = gl.constexpr(TAU)
        self.ROWSUM_MMA = gl.constexpr(ROWSUM_MMA)
        self.Q_PREFETCH = gl.constexpr(Q_PREFETCH)
        self.WG = gl.constexpr(WG)


@gluon.jit
def _exp2_fma(x):
    """``2 ** x`` of fp32 ``x <= 9`` (clamped below at -126) on the FMA pipe instead of the MUFU:
    ``x`` rounded to the nearest integer ``j`` by the fp32 magic-number addition, ``2 ** (x - j)``
    by a degree-3 polynomial on [-0.5, 0.5] (minimax in relative error, 7.5e-5; far below the
    e4m3 P's 2 ** -4 step), ``j`` added to the exponent bits (the shift drops the magic number's
    own bits)."""
    x = gl.maximum(x, -126.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = gl.fma(gl.fma(gl.fma(f, 0.05517132207751274, 0.24261054396629333), f, 0.6932609677314758), f,
               0.9999281167984009)
    return (p.to(gl.int32, bitcast=True) + (t.to(gl.int32, bitcast=True) << 23)).to(gl.float32, bitcast=True)


@gluon.jit
def _exp2_tile(x, BLOCK_N: gl.constexpr, EXP_POLY: gl.constexpr):
    """``2 ** x`` of an fp32 ``[64, BLOCK_N]`` tile; with ``EXP_POLY`` the odd columns through
    :func:`_exp2_fma` (each thread of the wgmma accumulator layout holds column pairs, so the
    split and join stay in registers), the even ones through the MUFU ``ex2``."""
    if EXP_POLY:
        a, b = gl.split(x.reshape([64, BLOCK_N // 2, 2]))
        p = gl.join(gl.exp2(a), _exp2_fma(b)).reshape([64, BLOCK_N])
        p = gl.convert_layout(p, x.type.layout)  # the same layout, as a linear one: no data movement
    else:
        p = gl.exp2(x)
    return p


@gluon.jit
def _softmax_tile(qk, m_i, l_i, tail, col0, S, partial, bits, qk_scale, RAGGED: gl.constexpr,
                  HAS_PARTIAL: gl.constexpr, BLOCK_N: gl.constexpr, dtype: gl.constexpr, p_layout: gl.constexpr,
                  row_o: gl.constexpr, P_LOG2: gl.constexpr, I2F_BITS: gl.constexpr, ROW_SCALES: gl.constexpr,
                  EXP_POLY: gl.constexpr, TAU: gl.constexpr, ROWSUM: gl.constexpr):
    """Online-softmax step (base 2) of one key tile: ``qk`` fp32 (or int32: int8 Q.K^T) ``[64,
    BLOCK_N]`` (wgmma layout), ``m_i`` / ``l_i`` fp32 ``[64]``; ``qk_scale`` this tile's logit
    scale (``ROW_SCALES``: one per row ``[64]``, 8-bit Q having one scale per token); ``tail``: this is the ragged last key block (columns from ``col0``; columns past ``S``
    masked); ``partial``: a partial block, whose uint8 token mask ``bits`` ``[64, BLOCK_N]`` (0 =
    masked, also past the sequence end) applies. Returns P times ``2 ** P_LOG2`` (16-bit ``dtype``
    in the P.V A-operand layout; with ``P_LOG2`` fp32 in the S layout, cast by :func:`_pv_issue`),
    the new row max, the row sum of P as returned (times ``2 ** P_LOG2``),
    and the rescale factor of the output rows (P.V accumulator row layout). ``P_LOG2``: the
    8-bit P's scale enters the exponent (``2 ** (x + P_LOG2)``, no multiply). ``I2F_BITS``: int32
    logits become fp32 through integer-add / float-subtract arithmetic (exact for ``|x| < 2**22``)
    instead of the conversion instruction. ``EXP_POLY``: :func:`_exp2_tile`. ``TAU`` >= 0 (lazy
    rescale): a row keeps its running max until a tile's max exceeds it by more than ``TAU`` (base-2
    units; P then stays below ``2 ** (TAU + P_LOG2)``); the fifth value returned is then whether any
    row of the warpgroup changed its max (a scalar; the accumulator needs ``alpha`` only then, else
    every ``alpha`` is exactly 1). With ``TAU`` < 0 every row takes its new max and that value is 1.
    ``ROWSUM``: ``l_i`` is returned as given (the row sums come from the MMA, :func:`_pv_issue`)."""
    if I2F_BITS:
        qk = (qk + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0
    else:
        qk = qk.to(gl.float32)
    if RAGGED:
        if tail:
            cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
            qk = gl.where(cols[None, :] < S, qk, float("-inf"))
    if HAS_PARTIAL:
        if partial:
            qk = gl.where(bits != 0, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)  # (scales > 0: the max of the scaled row)
    if TAU >= 0.0:
        m_new = gl.where(m_new - m_i > TAU, m_new, m_i)
        changed = gl.max((m_new != m_i).to(gl.int32), 0)
    else:
        changed = 1
    m_sub = m_new - P_LOG2
    if ROW_SCALES:
        p = _exp2_tile(qk * qk_scale[:, None] - m_sub[:, None], BLOCK_N, EXP_POLY)
    else:
        p = _exp2_tile(qk * qk_scale - m_sub[:, None], BLOCK_N, EXP_POLY)
    alpha = gl.exp2(m_i - m_new)
    if not ROWSUM:
        l_i = l_i * alpha + gl.sum(p, 1)
    if P_LOG2 != 0.0:
        p_op = p  # fp32: cast to e4m3 next to its MMA (_pv_issue)
    else:
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    return p_op, m_new, l_i, gl.convert_layout(alpha, row_o), changed


@gluon.jit
def _e4m3_packed(x):
    """Saturating round-to-nearest fp32 -> e4m3 cast of ``x`` (values in [0, 448]) as two
    ``cvt.rn.satfinite.e4m3x2.f32`` per four consecutive register elements, written straight into
    one 32-bit register (element 0 in the low byte): the generic cast splits each converted pair
    into bytes and the P.V operand then re-packs them (PRMT / LOP3 / SHF, a third of the key-loop
    instructions)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)


@gluon.jit
def _quantize_q_rows(x, INT8: gl.constexpr):
    """Per-row 8-bit quantisation of an fp32 Q tile ``[rows, D]``, the prologue's
    (:func:`.quant_fp8.quantize_q_tokens`) arithmetic: scale ``max(amax / qmax, 1e-12)`` (IEEE
    division; qmax 448 for e4m3, 127 for int8), values times the IEEE reciprocal of the scale,
    clamped, cast (int8: rounded to nearest, ties to even). Returns ``(x8, scale [rows])``."""
    QMAX: gl.constexpr = 127.0 if INT8 else 448.0
    scale = gl.maximum(gl.div_rn(gl.max(gl.abs(x), 1), QMAX), 1e-12)
    xs = x * gl.div_rn(1.0, scale)[:, None]
    xs = gl.minimum(gl.maximum(xs, -QMAX), QMAX)
    if INT8:
        x8 = ((xs + 12582912.0) - 12582912.0).to(gl.int8)
    else:
        x8 = xs.to(gl.float8e4nv)
    return x8, scale


@gluon.jit
def _hold(x):
    """Keep the registers of the 8-bit register operand ``x`` of an asynchronous wgmma live up to
    here (called right after its ``warpgroup_mma_wait``): the wait's ``deps`` do not take 8-bit
    tensors, and without a later use the compiler may reuse those registers while the MMA still
    reads them. An empty asm statement with side effects that reads them, four values per 32-bit
    register."""
    gl.inline_asm_elementwise("// hold $1", "=r,r", [x], dtype=gl.int8, is_pure=False, pack=4)


@gluon.jit
def _pv_issue(p, v_tile, acc, alpha, zero_o, ones_b, acc_l, PV8: gl.constexpr, SPLIT_ACC: gl.constexpr,
              p_layout: gl.constexpr, LAZY: gl.constexpr, ROWSUM: gl.constexpr, p_layout_l: gl.constexpr,
              row_l: gl.constexpr):
    """Issue (asynchronously) the P.V wgmma of one key tile and return what is in flight: with
    ``SPLIT_ACC`` the tile's product alone, into fresh registers ``zero_o`` (the accumulator is
    rescaled and added to in :func:`_pv_finish`), else the accumulator ``acc`` rescaled by
    ``alpha`` plus the product (``LAZY``: ``acc`` is already rescaled, :func:`_rescale`). ``p``: the A operand in registers (with ``PV8`` fp32 ``p x 448`` in
    the S layout, cast to e4m3 in ``p_layout`` here); ``v_tile``: the slot's V tile ``[BLOCK_N,
    D]``, or with ``PV8`` its V^T tile ``[D, BLOCK_N]`` (read K-major). ``ROWSUM``: first the row
    sums, ``acc_l * alpha + P . ones`` (``acc_l`` fp32 ``[64, 8]``, every column the same sum;
    ``ones_b`` the ``[8, BLOCK_N]`` tile of ones in shared memory, read K-major; the same P operand,
    so the sums are of P exactly as it enters the P.V) as a wgmma of N = 8: four (8-bit P) or
    ``BLOCK_N / 16`` MMA instructions instead of ~70 adds and shuffles per thread. Issued before the
    P.V, so that the wait for S of the next tile (one group left in flight) also covers it.
    Returns ``(P.V in flight, the operand, row sums in flight, their operand)``; :func:`_pv_finish`
    and :func:`_rowsum_finish` keep the operands live past the MMAs' waits."""
    if PV8:
        b_op = v_tile.permute((1, 0))
        # fp32 P x 448: keys in the S accumulator's register order (.quant_fp8.P8_KEY_DIMS), four
        # per 32-bit register of the operand; cast here, not at the end of the softmax, so that no
        # byte-per-register copy of P lives across the loop
        BN: gl.constexpr = p.shape[1]
        pp = p.reshape([64, BN // 32, 2, 2, 2, 2, 2]).permute(P8_KEY_DIMS.value).reshape([64, BN])
        p = gl.convert_layout(_e4m3_packed(pp), p_layout)
    else:
        b_op = v_tile
    if ROWSUM:  # (the A layouts of the N = 8 and the N = D MMA hold the same registers: no data movement)
        p_l = gl.convert_layout(p, p_layout_l)
        l_fly = warpgroup_mma(p_l, ones_b.permute((1, 0)), acc_l * gl.convert_layout(alpha, row_l)[:, None],
                              is_async=True)
    else:
        p_l = p
        l_fly = acc_l
    if SPLIT_ACC:
        inflight = warpgroup_mma(p, b_op, zero_o, use_acc=False, is_async=True)
    elif LAZY:
        inflight = warpgroup_mma(p, b_op, acc, is_async=True)
    else:
        inflight = warpgroup_mma(p, b_op, acc * alpha[:, None], is_async=True)
    return inflight, p, l_fly, p_l


@gluon.jit
def _rowsum_finish(l_fly, p_l, PV8: gl.constexpr):
    """Wait for the row-sum MMA of :func:`_pv_issue` (issued before its P.V: one group may stay in
    flight) and return the row sums ``acc_l`` fp32 ``[64, 8]``. A 16-bit operand ``p_l`` is held
    live past the wait through the wait's ``deps``; an 8-bit one (``PV8``) is not (``deps`` do
    not take 8-bit tensors; the P.V's own operand, the same registers, is held by
    :func:`_pv_finish`). The launcher never enables ``ROWSUM_MMA`` with an e4m3 P
    (:func:`.sparse_flash_gluon_launch.rowsum_by_mma`)."""
    if PV8:
        acc_l = warpgroup_mma_wait(1, deps=(l_fly, ))
    else:
        acc_l, p_l = warpgroup_mma_wait(1, deps=(l_fly, p_l))
    return acc_l


@gluon.jit
def _rescale(acc, alpha, changed, LAZY: gl.constexpr):
    """Lazy rescale (``LAZY``): ``acc * alpha`` only when some row of the warpgroup changed its
    max (``changed``, from :func:`_softmax_tile`), else ``acc`` unchanged (every ``alpha`` is 1).
    Called where no wgmma is in flight, so the branch does not cross an MMA's issue and wait."""
    if LAZY:
        if changed != 0:
            acc = acc * alpha[:, None]
    return acc


@gluon.jit
def _pv_finish(acc, inflight, p, alpha, PV8: gl.constexpr, SPLIT_ACC: gl.constexpr):
    """Wait for the P.V of :func:`_pv_issue` and return ``(acc, p)``: with ``SPLIT_ACC`` the
    accumulator rescaled by ``alpha`` (the factor of the tile the product belongs to) plus the
    product, else the waited accumulator. An 8-bit ``p`` is held live past the wait (:func:`_hold`)."""
    if SPLIT_ACC:
        pv = warpgroup_mma_wait(0, deps=(inflight, ))
        _hold(p)
        acc = acc * alpha[:, None] + pv
    elif PV8:
        acc = warpgroup_mma_wait(0, deps=(inflight, ))
        _hold(p)
    else:
        acc, p = warpgroup_mma_wait(0, deps=(inflight, p))
    return acc, p


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


@aggregate
class _Scales:
    """Dequantisation scales of 8-bit operands (``QK8`` / ``PV8``): fp32 Q ``[B, H, S]``, K
    ``[B, Hs, NKB]`` and V ``[B, Hs, D]`` (``Hs`` = H / ``HS_GROUP`` kv heads) with their (batch,
    head) strides; unused pointers are any fp32 tensor."""

    qsc: gl.tensor
    ksc: gl.tensor
    vsc: gl.tensor
    qs_b: base_value
    qs_h: base_value
    ks_b: base_value
    ks_h: base_value
    vs_b: base_value
    vs_h: base_value
    HS_GROUP: base_value

    @gluon.constexpr_function
    def __init__(self, qsc, ksc, vsc, qs_b, qs_h, ks_b, ks_h, vs_b, vs_h, HS_GROUP):
        self.qsc = qsc
        self.ksc = ksc
        self.vsc = vsc
        self.qs_b = _as_value(qs_b)
        self.qs_h = _as_value(qs_h)
        self.ks_b = _as_value(ks_b)
        self.ks_h = _as_value(ks_h)
        self.vs_b = _as_value(vs_b)
        self.vs_h = _as_value(vs_h)
        self.HS_GROUP = _as_value(HS_GROUP)


@gluon.jit
def _tile_scale(scales, f_idx, p_idx, j, nfb, ks_row, q_scale, HAS_PARTIAL: gl.constexpr, QK8: gl.constexpr):
    """The logit scale of key tile ``j`` of a query block's list: ``q_scale`` (softmax scale x
    log2(e); with ``QK8`` a row vector, x each row's Q scale), x the key block's K scale with ``QK8``."""
    if QK8:
        kb = _list_entry(f_idx, p_idx, j, nfb, HAS_PARTIAL)
        ts = q_scale * gl.load(scales.ksc + ks_row + kb)
    else:
        ts = q_scale
    return ts


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
def _q_rows_load(Q, QPERM, qperm_h, tile, NUM_TILES, S, H, NQT, stride_qb, stride_qh, stride_qs, io_q, offs_dq, modes):
    """Global load of consumer warpgroup ``modes.WG``'s 64 Q rows of work item ``tile`` (rows
    ``qt * 128 + WG * 64 + [0, 64)`` through the permutation; none past ``NUM_TILES`` or ``S``):
    ``[64, D]`` in Q's dtype (16 bits with ``Q_QUANT``) in layout ``io_q``, and the rows' original
    token positions (int32 ``[64]``)."""
    WG: gl.constexpr = modes.WG
    qt, bh, b, h, qb = _tile_coords(tile, NQT, H, modes.SPLIT, WG)
    rows_q = qt * 128 + WG * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, io_q))
    ok = (rows_q < S) & (tile < NUM_TILES)
    if modes.Q_PERM:
        qtok_q = gl.load(QPERM + h * qperm_h + rows_q, mask=ok, other=0)
    else:
        qtok_q = rows_q
    q_ptrs = Q + b.to(gl.int64) * stride_qb + h * stride_qh + qtok_q[:, None] * stride_qs + offs_dq[None, :]
    q = gl.load(q_ptrs, mask=ok[:, None], other=0 if modes.QK_INT8 and not modes.Q_QUANT else 0.0)
    return q, qtok_q


@gluon.jit
def _consumer(q_smem, ones_smem, k_smem, v_smem, k_ready, v_ready, empty, turn, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM, qperm_h,
              S, H, NQT, NUM_TILES, NQB, NKB, qk_scale, stride_qb, stride_qh, stride_qs, stride_ob, stride_oh,
              stride_os, fn_b, fn_h, fi_b, fi_h, fi_q, parts, scales, modes):
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
    QK8: gl.constexpr = modes.QK8
    QK_INT8: gl.constexpr = modes.QK_INT8
    PV8: gl.constexpr = modes.PV8
    SPLIT_ACC: gl.constexpr = modes.PV8 and modes.PV_SPLIT_ACC
    I2F_BITS: gl.constexpr = modes.QK_INT8 and modes.I2F_BITS
    Q_QUANT: gl.constexpr = modes.Q_QUANT
    EXP_POLY: gl.constexpr = modes.EXP_POLY
    WG: gl.constexpr = modes.WG
    TAU: gl.constexpr = -1.0 if SPLIT_ACC else modes.TAU
    LAZY: gl.constexpr = TAU >= 0.0
    ROWSUM: gl.constexpr = modes.ROWSUM_MMA
    Q_PREFETCH: gl.constexpr = modes.Q_PREFETCH
    q_smem = q_smem.index(WG)
    BM: gl.constexpr = 64
    odtype: gl.constexpr = O.dtype.element_ty
    # P.V operands: e4m3 (PV8) or the output's 16-bit dtype; the MMA K step is 32 for 8-bit operands
    pdtype: gl.constexpr = gl.float8e4nv if PV8 else odtype
    K_S: gl.constexpr = 32 if QK8 else 16
    K_O: gl.constexpr = 32 if PV8 else 16
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_N, K_S])
    mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_D, K_O])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=4 if PV8 else 2)
    # ROWSUM: the row sums' accumulator (N = 8; P is the same A operand as the P.V's)
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, K_O])
    p_layout_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_l, k_width=4 if PV8 else 2)
    row_l: gl.constexpr = gl.SliceLayout(1, mma_l)
    row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
    row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
    # global Q loads / O stores: 16-byte vectors along D (Q_QUANT: 16-bit Q, quantised here)
    QV: gl.constexpr = 8 if Q_QUANT else (16 if QK8 else 8)
    io_q: gl.constexpr = gl.BlockedLayout([1, QV], [32 // (BLOCK_D // QV), BLOCK_D // QV], [4, 1], [1, 0])
    io: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BLOCK_D // 8), BLOCK_D // 8], [4, 1], [1, 0])
    lrow: gl.constexpr = gl.SliceLayout(1, io)
    offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, io))
    offs_dq = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, io_q))
    zero_s = gl.zeros([BM, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, layout=mma_s)
    zero_o = gl.zeros([BM, BLOCK_D], gl.float32, layout=mma_o)
    # log2(.quant_fp8.P_SCALE): P enters P.V as p * 448; lazy rescale: p * 448 / 2 ** TAU (p < 2 ** TAU)
    P_LOG2: gl.constexpr = (8.807354922057604 - (TAU if TAU >= 0.0 else 0.0)) if PV8 else 0.0
    # HAS_PARTIAL: offsets of this warpgroup's rows in a partial block's uint8 mask
    PLAN_BQ: gl.constexpr = 64 if SPLIT else 128
    # (row and column vectors only: an [M, N] offset tensor would hold 64 registers per thread)
    mask_rows = ((WG * BM) % PLAN_BQ + gl.arange(0, BM, layout=row_s)) * BLOCK_N
    mask_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_s))
    ones_b = ones_smem.index(WG)
    if ROWSUM:  # this warpgroup's B operand of ones, [8, BLOCK_N] (read K-major)
        io_ones: gl.constexpr = gl.BlockedLayout([1, BLOCK_N // 16], [2, 16], [4, 1], [1, 0])
        ones_b.store(gl.full([8, BLOCK_N], 1.0, gl.float32, layout=io_ones).to(pdtype))
        fence_async_shared()
    ring = WG * STAGES if SPLIT else 0  # SPLIT: this warpgroup's own ring
    it = 0  # uses of the ring so far (slot and parity of the next tile)
    sg = 0  # PINGPONG: MMA issue turns taken so far
    npg = gl.num_programs(0)
    if Q_PREFETCH:  # the first item's Q rows; each later item's are loaded under the previous one's tail
        q_next, _ = _q_rows_load(Q, QPERM, qperm_h, gl.program_id(0), NUM_TILES, S, H, NQT, stride_qb, stride_qh,
                                 stride_qs, io_q, offs_dq, modes)
    for tile in range(gl.program_id(0), NUM_TILES, npg):
        qt, bh, b, h, qb = _tile_coords(tile, NQT, H, SPLIT, WG)
        # ---- Q rows of this warpgroup (original token positions through the permutation)
        rows = qt * 128 + WG * BM + gl.arange(0, BM, layout=lrow)
        row_ok = rows < S
        if Q_PREFETCH:  # (the epilogue's token positions: a load whose latency the key loop hides)
            q_raw = q_next
            if Q_PERM:
                qtok = gl.load(QPERM + h * qperm_h + rows, mask=row_ok, other=0)
            else:
                qtok = rows
        else:
            q_raw, qtok_q = _q_rows_load(Q, QPERM, qperm_h, tile, NUM_TILES, S, H, NQT, stride_qb, stride_qh,
                                         stride_qs, io_q, offs_dq, modes)
            qtok = gl.convert_layout(qtok_q, lrow)
        if Q_QUANT:  # one scale per row (token), as the prologue's
            q, q_row_scale = _quantize_q_rows(q_raw.to(gl.float32), QK_INT8)
        else:
            q = q_raw
        q_smem.store(q)  # the last tile's MMAs have completed (waited below)
        fence_async_shared()

        nfb = gl.load(FULL_NUM + b * fn_b + h * fn_h + qb, mask=qb < NQB, other=0)
        f_idx = FULL_IDX + b * fi_b + h * fi_h + qb * fi_q
        p_idx = parts.idx + b * parts.pi_b + h * parts.pi_h + qb * parts.pi_q
        # the list is sorted: a ragged last key block can only be its last entry
        # (masked: with SPLIT the last program's second query block may lie past the plan)
        last_col0 = gl.load(f_idx + gl.maximum(nfb - 1, 0), mask=nfb > 0, other=0) * BLOCK_N
        last_ragged = last_col0 + BLOCK_N > S
        # HAS_PARTIAL: the partial blocks follow the full ones in the same ring
        npb, slot0 = _partial_count(parts, b, h, qb, NQB, HAS_PARTIAL)
        ntot = nfb + npb
        # QK8: each row's Q scale joins the logit scale (a row vector); K scales per key block (_tile_scale)
        hs = h // scales.HS_GROUP
        ks_row = b * scales.ks_b + hs * scales.ks_h
        if Q_QUANT:
            q_scale = qk_scale * gl.convert_layout(q_row_scale, row_s)
        elif QK8:
            rows_s = qt * 128 + WG * BM + gl.arange(0, BM, layout=row_s)  # one Q scale per row (token)
            if Q_PERM:
                tok_s = gl.load(QPERM + h * qperm_h + rows_s, mask=rows_s < S, other=0)
            else:
                tok_s = rows_s
            q_scale = qk_scale * gl.load(scales.qsc + b * scales.qs_b + h * scales.qs_h + tok_s, mask=rows_s < S,
                                         other=1.0)
        else:
            q_scale = qk_scale
        m_i = gl.full([BM], -1.0e30, gl.float32, layout=row_s)
        l_i = gl.zeros([BM], gl.float32, layout=row_s)
        acc = gl.zeros([BM, BLOCK_D], gl.float32, layout=mma_o)
        acc_l = gl.zeros([BM, 8], gl.float32, layout=mma_l)
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
            ts = _tile_scale(scales, f_idx, p_idx, 0, nfb, ks_row, q_scale, HAS_PARTIAL, QK8)
            qk = warpgroup_mma_wait(0, deps=(qk, ))
            p, m_i, l_i, alpha, changed = _softmax_tile(qk, m_i, l_i, last_ragged & (nfb == 1), last_col0, S,
                                                        nfb == 0, bits, ts, RAGGED, HAS_PARTIAL, BLOCK_N, pdtype,
                                                        p_layout, row_o, P_LOG2, I2F_BITS, QK8, EXP_POLY, TAU, ROWSUM)
            # ---- steady state: S of tile j in flight with O += P V of tile j - 1
            for j in range(1, ntot):
                acc = _rescale(acc, alpha, changed, LAZY)  # (nothing in flight here)
                s = ring + (it + j) % STAGES
                sp = ring + (it + j - 1) % STAGES
                mbarrier.wait(k_ready.index(s), ((it + j) // STAGES) & 1)
                mbarrier.wait(v_ready.index(sp), ((it + j - 1) // STAGES) & 1)
                if PINGPONG:  # the warpgroups take turns issuing: one's softmax runs under the other's MMAs
                    mbarrier.wait(turn.index(WG), (sg + j) & 1)
                qk = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)
                pv, p_op, l_fly, p_l = _pv_issue(p, v_smem.index(sp), acc, alpha, zero_o, ones_b, acc_l, PV8,
                                                 SPLIT_ACC, p_layout, LAZY, ROWSUM, p_layout_l, row_l)
                if PINGPONG:
                    mbarrier.arrive(turn.index(1 - WG), count=1)
                bits = _mask_tile(parts, slot0, j >= nfb, j - nfb, mask_rows, mask_cols, HAS_PARTIAL, PLAN_BQ * BLOCK_N)
                ts = _tile_scale(scales, f_idx, p_idx, j, nfb, ks_row, q_scale, HAS_PARTIAL, QK8)
                if ROWSUM:  # S and the row sums (issued before the P.V) done, the P.V in flight
                    qk, acc_l = warpgroup_mma_wait(1, deps=(qk, l_fly))
                else:
                    qk = warpgroup_mma_wait(1, deps=(qk, ))
                alpha_pv = alpha
                p_next, m_i, l_i, alpha, changed = _softmax_tile(qk, m_i, l_i, last_ragged & (j == nfb - 1), last_col0,
                                                                 S, j >= nfb, bits, ts, RAGGED, HAS_PARTIAL, BLOCK_N,
                                                                 pdtype, p_layout, row_o, P_LOG2, I2F_BITS, QK8,
                                                                 EXP_POLY, TAU, ROWSUM)
                acc, p_op = _pv_finish(acc, pv, p_op, alpha_pv, PV8, SPLIT_ACC)
                mbarrier.arrive(empty.index(sp), count=1)
                p = p_next
            # ---- last tile's P.V
            acc = _rescale(acc, alpha, changed, LAZY)
            sp = ring + (it + ntot - 1) % STAGES
            mbarrier.wait(v_ready.index(sp), ((it + ntot - 1) // STAGES) & 1)
            if PINGPONG:
                mbarrier.wait(turn.index(WG), (sg + ntot) & 1)
            pv, p_op, l_fly, p_l = _pv_issue(p, v_smem.index(sp), acc, alpha, zero_o, ones_b, acc_l, PV8, SPLIT_ACC,
                                             p_layout, LAZY, ROWSUM, p_layout_l, row_l)
            if PINGPONG:
                mbarrier.arrive(turn.index(1 - WG), count=1)
            if Q_PREFETCH:  # the next item's Q rows, under this P.V and the epilogue (q_smem is free: S done)
                q_next, _ = _q_rows_load(Q, QPERM, qperm_h, tile + npg, NUM_TILES, S, H, NQT, stride_qb,
                                         stride_qh, stride_qs, io_q, offs_dq, modes)
            if ROWSUM:
                acc_l = _rowsum_finish(l_fly, p_l, PV8)
            acc, p_op = _pv_finish(acc, pv, p_op, alpha, PV8, SPLIT_ACC)
            mbarrier.arrive(empty.index(sp), count=1)
            it += ntot
            sg += ntot + 1
        elif Q_PREFETCH:
            q_next, _ = _q_rows_load(Q, QPERM, qperm_h, tile + npg, NUM_TILES, S, H, NQT, stride_qb, stride_qh,
                                     stride_qs, io_q, offs_dq, modes)

        # ---- epilogue: normalise (l_i sums P as it entered P.V, x 448 with PV8; PV8: the V channel
        # scales), store O (and LSE) at the original token positions
        if ROWSUM:  # (every column of acc_l holds the same sum)
            l_i = gl.convert_layout(gl.max(acc_l, 1), row_s)
        l_o = gl.convert_layout(l_i, row_o)
        denom = gl.where(l_o > 0, l_o, 1.0)
        if PV8:
            ch = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, mma_o))
            vsc = gl.load(scales.vsc + b * scales.vs_b + hs * scales.vs_h + ch)
            out = acc * vsc[None, :] / denom[:, None]
        else:
            out = acc / denom[:, None]
        out = gl.where((l_o > 0)[:, None], out, 0.0)
        out = gl.convert_layout(out.to(odtype), io)
        o_ptrs = O + b.to(gl.int64) * stride_ob + h * stride_oh + qtok[:, None] * stride_os + offs_d[None, :]
        gl.store(o_ptrs, out, mask=row_ok[:, None])
        if RETURN_LSE:
            l_io = gl.convert_layout(l_i, lrow)
            m_io = gl.convert_layout(m_i, lrow)
            lse = gl.where(l_io > 0, (m_io + gl.log2(gl.where(l_io > 0, l_io, 1.0)) - P_LOG2) * 0.6931471805599453,
                           float("-inf"))
            gl.store(LSE + bh.to(gl.int64) * S + qtok, lse, mask=row_ok)


@gluon.jit
def _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, slot, lap, k_row0, k_col, v_row0, v_col0, kb,
               BLOCK_N: gl.constexpr, PV8: gl.constexpr):
    """Wait for ring slot ``slot`` to be free (its ``lap``-th use), then TMA the K and V tiles of
    key block ``kb`` into it: K rows ``k_row0 + kb * BLOCK_N + [0, BLOCK_N)`` at column ``k_col``,
    V likewise from ``(v_row0, v_col0)``; with ``PV8`` the V^T tile is channel rows ``v_row0 +
    [0, D)`` x the block's token columns."""
    # a fresh barrier passes a wait on parity 1: the first lap finds every slot free
    mbarrier.wait(empty.index(slot), (lap & 1) ^ 1)
    mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_k, [k_row0 + kb * BLOCK_N, k_col], k_ready.index(slot), k_smem.index(slot))
    mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
    if PV8:
        tma.async_copy_global_to_shared(desc_v, [v_row0, kb * BLOCK_N], v_ready.index(slot), v_smem.index(slot))
    else:
        tma.async_copy_global_to_shared(desc_v, [v_row0 + kb * BLOCK_N, v_col0], v_ready.index(slot),
                                        v_smem.index(slot))


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
              NQT, NUM_TILES, NQB, ROW_B, ROW_H, COL_H, VROW_B, VROW_H, VCOL_H, fn_b, fn_h, fi_b, fi_h, fi_q, parts,
              modes):
    """The load warp: for the same work items as the consumers, TMA copies of the listed key
    blocks' K and V tiles (full blocks, then partial ones) into the ring (with ``SPLIT``, into
    each warpgroup's ring from its own plan block's list, alternating). With a persistent grid it
    runs ahead into the next item while the consumers finish the current one."""
    STAGES: gl.constexpr = modes.STAGES
    BLOCK_N: gl.constexpr = modes.BLOCK_N
    SPLIT: gl.constexpr = modes.SPLIT
    HAS_PARTIAL: gl.constexpr = modes.HAS_PARTIAL
    PV8: gl.constexpr = modes.PV8
    it0 = 0  # ring uses so far (warpgroup 0's ring with SPLIT)
    it1 = 0  # SPLIT: warpgroup 1's ring
    for tile in range(gl.program_id(0), NUM_TILES, gl.num_programs(0)):
        qt, bh, b, h, qb = _tile_coords(tile, NQT, H, SPLIT, 0)
        hk = h // HK_GROUP
        kv_row0 = b * ROW_B + hk * ROW_H
        kv_col = hk * COL_H
        v_row0 = b * VROW_B + hk * VROW_H  # (PV8: V^T [B, Hk, D, S_pad] as (b, hk, channel) rows)
        v_col0 = hk * VCOL_H
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
                               (it0 + j) // STAGES, kv_row0, kv_col, v_row0, v_col0, kb, BLOCK_N, PV8)
                if j < t1:
                    kb = _list_entry(f0 + fi_q, p0 + parts.pi_q, j, n1, HAS_PARTIAL)
                    _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, STAGES + (it1 + j) % STAGES,
                               (it1 + j) // STAGES, kv_row0, kv_col, v_row0, v_col0, kb, BLOCK_N, PV8)
            it1 += t1
        else:
            for j in range(t0):
                kb = _list_entry(f0, p0, j, n0, HAS_PARTIAL)
                _load_tile(k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, (it0 + j) % STAGES,
                           (it0 + j) // STAGES, kv_row0, kv_col, v_row0, v_col0, kb, BLOCK_N, PV8)
        it0 += t0


@gluon.jit
def _gluon_sparse_flash_fwd(
    desc_k, desc_v, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM, qperm_h, PART_NUM, PART_IDX, BITS, SLOT,
    QSC, KSC, VSC,
    S, H, HK_GROUP, ROW_B, ROW_H, COL_H, VROW_B, VROW_H, VCOL_H, NQT, NUM_TILES, NQB, NKB, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_ob, stride_oh, stride_os,
    fn_b, fn_h, fi_b, fi_h, fi_q, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h,
    qs_b, qs_h, ks_b, ks_h, vs_b, vs_h,
    RAGGED: gl.constexpr, Q_PERM: gl.constexpr, RETURN_LSE: gl.constexpr, STAGES: gl.constexpr,
    SPLIT: gl.constexpr, PINGPONG: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
    HAS_PARTIAL: gl.constexpr, QK8: gl.constexpr, QK_INT8: gl.constexpr, PV8: gl.constexpr,
    PV_SPLIT_ACC: gl.constexpr, I2F_BITS: gl.constexpr, Q_QUANT: gl.constexpr, EXP_POLY: gl.constexpr,
    RESCALE_TAU: gl.constexpr, ROWSUM_MMA: gl.constexpr, Q_PREFETCH: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    """A 1-D persistent grid over ``NUM_TILES = NQT * B * H`` work items (item = query tile of 128
    rows, batch x head; query tile fastest); 4 warps (+ 4 consumer and 1 producer warps). Q, O:
    ``[B, S, H, D]`` at (batch, head, token) strides, O bf16/fp16, Q the same (or int8 / e4m3 with
    ``QK8``); K / V tiles through ``desc_k`` / ``desc_v`` (K ``[BLOCK_N, D]`` boxes, Q's dtype; V
    ``[BLOCK_N, D]`` boxes in O's dtype, or with ``PV8`` e4m3 V^T ``[D, BLOCK_N]`` boxes of
    ``[B * Hk * D, S_pad]``; the tile of key block ``kb`` of (b, kv head hk) is the box at ``(b *
    ROW_B + hk * ROW_H + kb * BLOCK_N, hk * COL_H)`` of K, at the same with ``VROW_B`` /
    ``VROW_H`` / ``VCOL_H`` of V, or with ``PV8`` at ``(b * VROW_B + hk * VROW_H, kb *
    BLOCK_N)``); LSE fp32 ``[B, H, S]`` (natural log); FULL_NUM int32 ``[Bp, Hp,
    NQB]`` and FULL_IDX int32 ``[Bp, Hp, NQB, M]`` (sorted) at the given strides (0 on broadcast
    dims); QPERM int32 ``[Hp, S]`` plan position -> original token; HAS_PARTIAL: PART_NUM /
    PART_IDX (the same shapes), BITS uint8 ``[P, block_q, block_k]`` and SLOT int64 ``[Bp, Hp,
    NQB]`` (:func:`.sparse_flash_tables.partial_block_masks`); QSC / KSC / VSC fp32 dequantisation
    scales ``[B, H, S]`` / ``[B, Hk, NKB]`` / ``[B, Hk, D]`` at (batch, head) strides (QK8 / PV8)."""
    qdtype: gl.constexpr = desc_k.dtype  # Q's MMA operand type is K's (Q_QUANT: Q itself arrives in 16 bits)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_D], qdtype)
    q_smem = gl.allocate_shared_memory(qdtype, [2, 64, BLOCK_D], q_layout)
    # ROWSUM_MMA: each consumer warpgroup's [8, BLOCK_N] tile of ones in the P.V operand type (8 x 8 if off)
    pdtype: gl.constexpr = gl.float8e4nv if PV8 else O.dtype.element_ty
    ONES_N: gl.constexpr = BLOCK_N if ROWSUM_MMA else 8
    ones_smem = gl.allocate_shared_memory(pdtype, [2, 8, ONES_N], gl.NVMMASharedLayout.get_default_for([8, ONES_N],
                                                                                                      pdtype))
    SLOTS: gl.constexpr = 2 * STAGES if SPLIT else STAGES  # SPLIT: one ring per consumer warpgroup
    k_smem = gl.allocate_shared_memory(desc_k.dtype, [SLOTS, BLOCK_N, BLOCK_D], desc_k.layout)
    if PV8:  # V^T tiles: channels x tokens
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [SLOTS, BLOCK_D, BLOCK_N], desc_v.layout)
    else:
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [SLOTS, BLOCK_N, BLOCK_D], desc_v.layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    modes = _Modes(RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, QK8, QK_INT8,
                   PV8, PV_SPLIT_ACC, I2F_BITS, Q_QUANT, EXP_POLY, RESCALE_TAU, ROWSUM_MMA, Q_PREFETCH, 0)
    modes1 = _Modes(RAGGED, Q_PERM, RETURN_LSE, STAGES, BLOCK_N, BLOCK_D, SPLIT, PINGPONG, HAS_PARTIAL, QK8, QK_INT8,
                    PV8, PV_SPLIT_ACC, I2F_BITS, Q_QUANT, EXP_POLY, RESCALE_TAU, ROWSUM_MMA, Q_PREFETCH, 1)
    parts = _Partials(PART_NUM, PART_IDX, BITS, SLOT, pn_b, pn_h, pi_b, pi_h, pi_q, slot_b, slot_h)
    scales = _Scales(QSC, KSC, VSC, qs_b, qs_h, ks_b, ks_h, vs_b, vs_h, HK_GROUP)
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
    consumer_args = (q_smem, ones_smem, k_smem, v_smem, k_ready, v_ready, empty, turn, Q, O, LSE, FULL_NUM, FULL_IDX, QPERM,
                     qperm_h, S, H, NQT, NUM_TILES, NQB, NKB, qk_scale, stride_qb, stride_qh, stride_qs, stride_ob,
                     stride_oh, stride_os, fn_b, fn_h, fi_b, fi_h, fi_q, parts, scales)
    producer_args = (k_smem, v_smem, k_ready, v_ready, empty, desc_k, desc_v, FULL_NUM, FULL_IDX, H, HK_GROUP,
                     NQT, NUM_TILES, NQB, ROW_B, ROW_H, COL_H, VROW_B, VROW_H, VCOL_H, fn_b, fn_h, fi_b, fi_h, fi_q,
                     parts, modes)
    # the kernel's own warps are consumer warpgroup 0; the workers are warpgroup 1 and the load warp
    gl.warp_specialize([(_consumer, consumer_args + (modes, )), (_consumer, consumer_args + (modes1, )),
                        (_producer, producer_args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

"""8-bit quantisation prologue of the Triton block-sparse kernel's quantised precisions.

Torch ops only in the host API (the device code is the small Triton kernels below); one job:
turn bf16/fp16/fp32 ``q, k, v`` into the 8-bit operands and fp32 scales the kernel's quantised
variants read (the method of SageAttention: Q/K quantisation with K smoothing, Q per token and K per block, and
optionally an FP8 P.V with per-channel V scales). Three precisions (:data:`PRECISIONS`; each is a
Q.K^T format and whether P.V is 8-bit, :func:`precision_parts`):

=============  ==============================  =============================================
precision      Q.K^T                           P.V
=============  ==============================  =============================================
``fp8``        e4m3 x e4m3 -> fp32             e4m3 ``p * 448`` x e4m3 V (per channel)
``int8``       int8 x int8 -> int32            P cast to V's dtype x V (bf16/fp16; fp32 in fp32)
``int8_fp8``   int8 x int8 -> int32            e4m3 ``p * 448`` x e4m3 V (per channel)
=============  ==============================  =============================================

* **Q**: one scale per (batch, head, token) (``amax / 448`` for e4m3, ``amax / 127`` for int8,
  over the token's channels): the kernel multiplies each logit row by its scale anyway, so a
  per-token scale costs nothing over a per-block one and quantises rows of small norm more
  finely (int8 on Gaussian inputs, emulated in float64: 1.16% relative L2 instead of 1.35% with
  one scale per 128-token block); ``q8`` stays at the original token positions;
* **K**: smoothed (the per-(batch, kv head) mean over tokens is subtracted: every logit of a query
  row moves by the same ``q . mean``, which the softmax ignores), then one scale per (batch, kv
  head, key block of ``block_k`` tokens in plan order); head-major ``[B, Hk, S, D]``;
* **int8 rounding**: ``q8 = round(x / scale)`` to the nearest integer, ties to even (torch's
  ``round``; in the Triton kernel the fp32 ``(x + 1.5 * 2**23) - 1.5 * 2**23``, the same IEEE
  result), clamped to ``[-127, 127]``; values are multiplied by the IEEE reciprocal of their
  scale (``tl.div_rn(1, scale)`` / torch's tensor division ``1 / scale``; a plain fp32 ``/`` is
  approximate on GPUs), then an exact fp32 product, so the two implementations agree bit for bit,
  on CPU and GPU, given the same K mean;
* **V** (8-bit P.V only): one scale per (batch, kv head, channel) (``amax / 448`` over tokens),
  stored transposed ``[B, Hk, D, S_pad]`` (``S_pad``: S rounded up to 16, zero-filled) so that
  the kernel's P.V operand has the reduction (token) axis contiguous, the layout FP8 tensor-core
  MMAs need. Without it (``int8``) V is not quantised: the kernel reads the inputs' V in place;
* **P** (in-kernel, 8-bit P.V only): the softmax numerators in ``[0, 1]`` are multiplied by
  :data:`P_SCALE` before their cast to e4m3, and the accumulator is divided by it (and multiplied
  by the V channel scales) once at the end.

Two implementations: torch ops (:func:`quantize_q_tokens`, :func:`smooth_quantize_k`,
:func:`quantize_v_channels`; the reference) and Triton kernels (the default where Triton runs;
``VIDATTN_FP8_PROLOGUE=torch`` or :data:`DEFAULT_IMPL` selects): one pass over K and V for K's
token mean and V's channel amax and scales, finished in the kernel (:func:`_kv_stats_kernel`),
one launch that writes K's and V^T's 8-bit values (:func:`_quant_kv_kernel`) and one for Q
(:func:`_quant_rows_kernel`, unless the attention kernel quantises Q itself). Their launch
settings are :data:`TUNING`. The two agree bit for bit given the same K mean (the Triton one sums
fp32 chunks of tokens, torch its own order: equal to fp32 rounding); ``quantize_operands(...,
k_mean=)`` passes one. The whole prologue:
:func:`quantize_operands`.

Capability: :func:`fp8_support` (CUDA compute capability >= 8.9, or the CPU interpreter; the same
for every quantised precision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["FP8_DTYPE", "FP8_MAX", "INT8_MAX", "P_SCALE", "PRECISIONS", "QK_FORMATS", "check_precision",
           "precision_parts", "fp8_support", "quantize_q_tokens", "smooth_quantize_k", "quantize_v_channels",
           "p8_key_order", "P8_KEY_DIMS", "P8_MIN_TILE",
           "FP8Operands", "quantize_operands", "round_to_e4m3", "lse_smoothing_correction",
           "DEFAULT_IMPL", "int8_logits_by_bits", "q_in_kernel"]

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127.0  # int8 values are clamped to [-127, 127] (symmetric)
P_SCALE = 448.0  # softmax numerators p in [0, 1] are cast as p * P_SCALE
PRECISIONS = (None, "fp8", "int8", "int8_fp8")  # None: compute in the inputs' dtype (fp32 accumulate)
QK_FORMATS = ("e4m3", "int8")  # the 8-bit formats of Q and K
_PARTS = {None: (None, False), "fp8": ("e4m3", True), "int8": ("int8", False), "int8_fp8": ("int8", True)}
_QMAX = {"e4m3": FP8_MAX, "int8": INT8_MAX}
_TINY = 1e-12  # scale floor for all-zero blocks / channels

# The key order of the 8-bit P.V. A kernel's e4m3 P tile, viewed as [M, N / 32, 2, 2, 2, 2, 2]
# (the five bits of a key inside its 32-key group), is permuted by these dims before it becomes
# the P.V register operand: position a = 16 h + 4 t + i then holds key 16 h + 8 (i // 2) + 2 t +
# i % 2, the key whose logit thread t (of a quad) holds in that register of the Hopper S
# accumulator, so the operand needs no shuffle between threads. V^T stores its tokens in the same
# order (p8_key_order), so P.V is unchanged. Tokens pad to a multiple of 32 for it.
P8_KEY_DIMS = tl.constexpr((0, 1, 2, 4, 5, 3, 6))
P8_MIN_TILE = 32  # key tiles narrower than a group keep the token order
_VT_PAD = 32
DEFAULT_IMPL = "triton"  # prologue implementation: "triton" (kernels below) or "torch"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_Q_IN_KERNEL = {"0": (), "gluon": ("gluon",), "1": ("gluon", "portable")}


def q_in_kernel(kernel: str) -> bool:
    """``VIDATTN_Q_IN_KERNEL``: whether attention kernel ``kernel`` (``"gluon"`` / ``"portable"``)
    quantises Q per token itself (it reads the 16-bit Q once, as the prologue would, and nothing
    writes and re-reads ``q8`` / ``q_scale``; same arithmetic, :func:`_quantize_rows`, same values)
    or reads the prologue's ``q8``. ``"gluon"`` (default): the Gluon kernel only (the portable one
    built for sm_90 then keeps its 8-bit Q tile in registers as the MMA operand: 255 registers,
    460 bytes of spill stores, serialised wgmma, where reading ``q8`` gives 40); ``"1"``: both;
    ``"0"``: neither. Anything else raises ``ValueError``."""
    mode = os.environ.get("VIDATTN_Q_IN_KERNEL", "gluon").strip() or "gluon"
    if mode not in _Q_IN_KERNEL:
        raise ValueError(f"VIDATTN_Q_IN_KERNEL must be one of {tuple(_Q_IN_KERNEL)}, got {mode!r}")
    return kernel in _Q_IN_KERNEL[mode]


def int8_logits_by_bits() -> bool:
    """``VIDATTN_INT8_I2F``: how the kernels turn the int32 logits of an int8 Q.K^T into fp32.
    ``"cvt"`` (default): the conversion instruction (on Hopper it shares the slow 16-per-clock
    pipe with ``exp2`` and the e4m3 casts of P); ``"bits"``: exact integer-add / float-subtract
    arithmetic on the fast pipes (``x + 0x4B400000`` read as fp32, minus ``1.5 * 2**23``; exact for
    ``|x| < 2**22``, which int8 dots of head dim <= 256 satisfy). Same values either way; an A/B
    switch until the GPU measurement decides. Anything else raises ``ValueError``."""
    mode = os.environ.get("VIDATTN_INT8_I2F", "cvt").strip().lower() or "cvt"
    if mode not in ("cvt", "bits"):
        raise ValueError(f"VIDATTN_INT8_I2F must be 'cvt' or 'bits', got {mode!r}")
    return mode == "bits"


def check_precision(precision) -> Optional[str]:
    """``precision`` if it is one of :data:`PRECISIONS` (None: the inputs' dtype; ``"fp8"``,
    ``"int8"``, ``"int8_fp8"``), else ``ValueError`` naming ``precision`` and listing them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (None: the inputs' dtype), got {precision!r}")
    return precision


def precision_parts(precision) -> Tuple[Optional[str], bool]:
    """What ``precision`` quantises: ``(qk, pv8)``, ``qk`` the format of Q and K (None: not
    quantised, ``"e4m3"`` or ``"int8"``) and ``pv8`` whether P.V runs in e4m3 (transposed
    per-channel V, ``P * 448``). None -> ``(None, False)``, ``"fp8"`` -> ``("e4m3", True)``,
    ``"int8"`` -> ``("int8", False)``, ``"int8_fp8"`` -> ``("int8", True)``. ``ValueError`` for
    anything else (:func:`check_precision`)."""
    return _PARTS[check_precision(precision)]


def fp8_support(device: torch.device, precision: str = "fp8") -> Tuple[bool, str]:
    """Whether the quantised kernel path ``precision`` (any of :data:`PRECISIONS` but None) can run
    on ``device``: ``(ok, reason)``. CUDA needs compute capability >= 8.9 (Ada / Hopper /
    Blackwell: e4m3 and int8 tensor cores), the same bound for every quantised precision; a CPU
    device only under ``TRITON_INTERPRET=1`` (the interpreter emulates e4m3 and int8 dots). A
    precision with e4m3 operands also needs torch's ``float8_e4m3fn``."""
    qk, pv8 = precision_parts(precision)
    if qk is None:
        raise ValueError("precision must name a quantised precision for fp8_support, got None")
    if FP8_DTYPE is None and (qk == "e4m3" or pv8):
        return False, f"torch {torch.__version__} has no float8_e4m3fn"
    device = torch.device(device)
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        if cap < (8, 9):
            return False, f"precision={precision!r} needs CUDA compute capability >= 8.9, got {cap[0]}.{cap[1]}"
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    return False, f"precision={precision!r} needs a CUDA device of compute capability >= 8.9 (got {device.type})"


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast of fp32 ``x`` (already divided by its scale) to e4m3fn (torch's cast is not
    saturating: out-of-range values become NaN)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _to_int8(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` (already divided by its scale) rounded to the nearest integer, ties to even,
    clamped to [-127, 127], as int8."""
    return torch.round(x.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)


def _quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return _to_int8(x) if fmt == "int8" else _to_e4m3(x)


def _check_fmt(fmt) -> str:
    if fmt not in QK_FORMATS:
        raise ValueError(f"fmt must be one of {QK_FORMATS}, got {fmt!r}")
    if fmt == "e4m3" and FP8_DTYPE is None:
        raise TypeError(f"torch {torch.__version__} has no float8_e4m3fn")
    return fmt


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest e4m3fn value (saturating), as fp32: the reference the
    kernel's in-kernel P cast is tested against."""
    return _to_e4m3(x.float()).float()


def _div(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x / c`` rounded as IEEE division (torch on CUDA turns a division by a Python scalar into a
    multiplication by its reciprocal, which can differ in the last bit from the Triton prologue's
    ``tl.div_rn``)."""
    return x / torch.full_like(x, c)


def _recip(x: torch.Tensor) -> torch.Tensor:
    """IEEE ``1 / x`` (both prologues multiply by the reciprocal of a scale, computed this way:
    torch's tensor division / Triton's ``tl.div_rn(1, x)``, then an exact fp32 product)."""
    return torch.ones_like(x) / x


def _block_amax(rows: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, S]`` per-token amax -> ``[B, H, ceil(S / block)]`` per-block amax (padding 0)."""
    B, H, S = rows.shape
    nb = -(-S // block)
    pad = nb * block - S
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(B, H, nb, block).amax(-1)


def quantize_q_tokens(q: torch.Tensor, fmt: str = "e4m3"):
    """Per-token 8-bit quantisation of Q.

    Args:
        q: ``[B, S, H, D]`` float (original token order).
        fmt: ``"e4m3"`` (scale ``amax / 448``) or ``"int8"`` (scale ``amax / 127``, values
            rounded to nearest, ties to even, clamped to [-127, 127]); ``amax`` over the token's
            ``D`` channels.
    Returns:
        ``(q8, q_scale)``: e4m3fn or int8 ``[B, S, H, D]`` contiguous (original token order) and
        fp32 ``[B, H, S]`` contiguous with ``q[b, s, h] ~= q8[b, s, h] * q_scale[b, h, s]``.
    """
    _check_fmt(fmt)
    amax = q.detach().abs().amax(-1).float().transpose(1, 2)  # [B, H, S]
    scale = _div(amax, _QMAX[fmt]).clamp_min(_TINY).contiguous()
    q8 = _quantize(q.float() * _recip(scale).transpose(1, 2)[..., None], fmt).contiguous()
    return q8, scale


def _token_mean(k: torch.Tensor) -> torch.Tensor:
    """fp32 mean over tokens of ``k`` ``[B, Hk, S, D]`` (any float dtype and strides) ->
    ``[B, Hk, D]``, accumulated in fp32 without an fp32 copy of ``k`` (one read of K instead of a
    read, a double-size write and a re-read; both prologues use it, so their means agree)."""
    return torch.mean(k, dim=2, dtype=torch.float32)


def _channel_amax(v: torch.Tensor) -> torch.Tensor:
    """fp32 max of ``|v|`` over tokens of ``v`` ``[B, Hk, S, D]`` -> ``[B, Hk, D]``: the larger of
    the max and minus the min, from one reduction over ``v`` (no copy of ``|v|``); the same value
    as ``v.abs().amax(2)``."""
    lo, hi = torch.aminmax(v, dim=2)
    return torch.maximum(hi, -lo).float()


def smooth_quantize_k(k: torch.Tensor, block_k: int, fmt: str = "e4m3", mean: Optional[torch.Tensor] = None):
    """K smoothing and per-block 8-bit quantisation.

    Args:
        k: ``[B, Hk, S, D]`` float (any strides), tokens in the plan's key order.
        block_k: the plan's key block size.
        fmt: ``"e4m3"`` or ``"int8"`` (as :func:`quantize_q_tokens`, one scale per block).
        mean: the smoothing shift, fp32 ``[B, Hk, D]`` (default: the token mean of ``k``; any
            per-head vector keeps the attention exact, the mean quantises K most finely).
    Returns:
        ``(k8, k_scale, k_mean)``: e4m3fn or int8 ``[B, Hk, S, D]`` contiguous, fp32
        ``[B, Hk, NKB]`` and fp32 ``[B, Hk, D]`` with
        ``k ~= k8 * k_scale[b, h, block] + k_mean[b, h]``.
    """
    _check_fmt(fmt)
    kf = k.float()
    mean = _token_mean(k) if mean is None else _check_mean(mean, k)  # [B, Hk, D]
    ks = kf - mean[:, :, None]
    scale = _div(_block_amax(ks.abs().amax(-1), block_k), _QMAX[fmt]).clamp_min(_TINY)  # [B, Hk, NKB]
    S = k.shape[2]
    tok = scale[:, :, torch.arange(S, device=k.device) // block_k]  # [B, Hk, S]
    return _quantize(ks * _recip(tok)[..., None], fmt).contiguous(), scale.contiguous(), mean


def p8_key_order(n: int, device=None) -> torch.Tensor:
    """Which token each position of a quantised V^T row holds: int64 ``[n]`` (``n`` a multiple of
    32), :data:`P8_KEY_DIMS` applied to ``arange(n)`` (each 32-token group stays in place)."""
    if n % 32:
        raise ValueError(f"n must be a multiple of 32, got {n}")
    dims = tuple(d - 1 for d in P8_KEY_DIMS.value[1:])  # without the row dim
    return torch.arange(n, device=device).reshape(n // 32, 2, 2, 2, 2, 2).permute(dims).reshape(n)


def quantize_v_channels(v: torch.Tensor, key_order: bool = True):
    """Per-channel e4m3 quantisation of V, stored transposed.

    Args:
        v: ``[B, Hk, S, D]`` float (any strides), tokens in the plan's key order.
        key_order: tokens in :func:`p8_key_order` (for kernels whose key tiles are at least
            :data:`P8_MIN_TILE` wide), else in their own order.
    Returns:
        ``(vt8, v_scale)``: e4m3fn ``[B, Hk, D, S_pad]`` (``S_pad``: ``S`` rounded up to a multiple
        of 32, zeros for the padding tokens) and fp32 ``[B, Hk, D]`` with ``v[b, h, order[a], c] ~=
        vt8[b, h, c, a] * v_scale[b, h, c]``, ``order = p8_key_order(S_pad)`` (or ``arange``).
    """
    B, Hk, S, D = v.shape
    vf = v.float()
    scale = _v_scale(_channel_amax(v))  # [B, Hk, D]
    s_pad = -(-S // _VT_PAD) * _VT_PAD
    vt8 = torch.zeros(B, Hk, D, s_pad, dtype=FP8_DTYPE, device=v.device)
    vt8[..., :S] = _to_e4m3((vf * _recip(scale)[:, :, None]).transpose(2, 3))
    if key_order:
        vt8 = vt8.view(torch.uint8).index_select(-1, p8_key_order(s_pad, v.device)).view(FP8_DTYPE)
    return vt8, scale


def _check_mean(mean, k: torch.Tensor) -> torch.Tensor:
    B, Hk, _, D = k.shape
    if not isinstance(mean, torch.Tensor) or tuple(mean.shape) != (B, Hk, D):
        raise ValueError(f"k_mean must be a [B, Hk, D] = [{B}, {Hk}, {D}] tensor, got "
                         f"{getattr(mean, 'shape', type(mean).__name__)}")
    if mean.dtype != torch.float32:
        raise ValueError(f"k_mean must be float32, got {mean.dtype}")
    return mean.to(k.device)


# ----------------------------------------------------------------------------- device code
@triton.jit
def _round_e4m3(x):
    """Non-negative fp32 ``x`` (<= 448) rounded to the nearest e4m3 value, as fp32 (normal range:
    the mantissa rounded to 3 bits, nearest even; subnormals: multiples of 2^-9). Used only under
    the CPU interpreter, whose fp32 -> e4m3 cast mis-rounds when the mantissa carries into the
    exponent; a value already on the e4m3 grid converts exactly there. GPUs cast in hardware."""
    bits = x.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    sub = tl.floor(x * 512.0 + 0.5) * 0.001953125
    return tl.where(x < 0.015625, sub, normal)


@triton.jit
def _cast_e4m3(x, EMU_CAST: tl.constexpr):
    """Saturating fp32 -> e4m3 cast of a tensor already divided by its scale (round to nearest)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMU_CAST:
        r = _round_e4m3(tl.abs(x))
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _cast_int8(x):
    """fp32 ``x`` already divided by its scale -> int8: clamped to [-127, 127], rounded to the
    nearest integer with ties to even (adding then subtracting 1.5 * 2^23 leaves an fp32 of
    magnitude < 2^22 rounded to an integer by IEEE round-to-nearest-even: torch's ``round``)."""
    x = tl.minimum(tl.maximum(x, -127.0), 127.0)
    r = (x + 12582912.0) - 12582912.0
    return r.to(tl.int8)


@triton.jit
def _bf16_round(x):
    """Non-negative fp32 ``x`` rounded to the nearest bfloat16 value (ties to even), as fp32: the
    GPU's cast of P before a 16-bit P.V, for the CPU interpreter (whose bf16 cast truncates and
    whose bf16 dot the kernel replaces by an fp32 one)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _tile_coords(H, TILE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program ``(tile, batch x head)``: ``(b, h, bh, tile rows [TILE], channels [BLOCK_D])``."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * TILE + tl.arange(0, TILE)
    return bh // H, bh % H, bh, rows, tl.arange(0, BLOCK_D)


@triton.jit
def _kv_stats_kernel(K, V, KSUM, VMAX, TICKET, STATS, S, H, D, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                     CHUNK: tl.constexpr, TILE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_V: tl.constexpr):
    """One (chunk of ``CHUNK`` tokens, batch x head) per program, one read of K (and V): the fp32
    sum of the chunk's K rows and (``HAS_V``) the max of ``|v|`` per channel, stored at
    ``KSUM`` / ``VMAX`` ``[B * H, n_chunks, D]`` (contiguous). The last program of a (batch x head)
    to finish (an acquire-release ticket ``TICKET [B * H]`` int32, zeroed by the host) reduces
    the chunks in their order (deterministic) into ``STATS [B * H, 3, D]`` fp32: the K token mean
    (IEEE division of the sum by ``S``), V's channel amax and V's channel scale
    (:func:`_v_scale`'s ``max(amax / 448, 1e-12)``; NaN stays NaN)."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # elementwise accumulators over the chunk's tiles, reduced over tokens once at the end (a
    # reduction per tile would cross warps through shared memory every iteration)
    ksum = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    vmax = tl.zeros([TILE, BLOCK_D], dtype=tl.float32)
    vnan = tl.zeros([TILE, BLOCK_D], dtype=tl.int1)
    k_base = K + b.to(tl.int64) * sk_b + h * sk_h
    v_base = V + b.to(tl.int64) * sv_b + h * sv_h
    for t0 in range(chunk * CHUNK, chunk * CHUNK + CHUNK, TILE):
        pos = t0 + tl.arange(0, TILE)
        ok = (pos < S)[:, None] & d_ok[None, :]
        ksum += tl.load(k_base + pos[:, None].to(tl.int64) * sk_s + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_V:
            y = tl.load(v_base + pos[:, None].to(tl.int64) * sv_s + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            vmax = tl.maximum(vmax, tl.abs(y))
            vnan = vnan | (y != y)
    n_chunks = tl.num_programs(0)
    dst = (bh * n_chunks + chunk) * D + offs_d
    tl.store(KSUM + dst, tl.sum(ksum, 0), mask=d_ok)
    if HAS_V:  # a NaN makes its channel's max NaN, as in torch
        vm = tl.max(vmax, 0)
        tl.store(VMAX + dst, tl.where(tl.max(vnan.to(tl.int32), 0) > 0, float("nan"), vm), mask=d_ok)
    tl.debug_barrier()  # every thread's partials precede the release below
    if tl.atomic_add(TICKET + bh, 1, sem="acq_rel") == n_chunks - 1:
        _kv_stats_finish(KSUM, VMAX, STATS, bh, n_chunks, S, D, offs_d, HAS_V)


@triton.jit
def _kv_stats_finish(KSUM, VMAX, STATS, bh, n_chunks, S, D, offs_d, HAS_V: tl.constexpr):
    """The chunk partials of (batch x head) ``bh`` reduced in chunk order into ``STATS[bh]``
    (mean, amax, V scale; :func:`_kv_stats_kernel`). Loads bypass L1 (``.cg``): other programs
    wrote them."""
    d_ok = offs_d < D
    ksum = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    vmax = tl.zeros([offs_d.shape[0]], dtype=tl.float32)
    vnan = tl.zeros([offs_d.shape[0]], dtype=tl.int1)
    for c in range(n_chunks):
        src = (bh * n_chunks + c) * D + offs_d
        ksum += tl.load(KSUM + src, mask=d_ok, other=0.0, cache_modifier=".cg")
        if HAS_V:
            y = tl.load(VMAX + src, mask=d_ok, other=0.0, cache_modifier=".cg")
            vmax = tl.maximum(vmax, y)
            vnan = vnan | (y != y)
    out = STATS + bh * 3 * D + offs_d
    tl.store(out, tl.div_rn(ksum, S.to(tl.float32)), mask=d_ok)
    if HAS_V:
        amax = tl.where(vnan, float("nan"), vmax)
        scale = tl.maximum(tl.div_rn(amax, 448.0), 1e-12)
        tl.store(out + D, amax, mask=d_ok)
        tl.store(out + 2 * D, tl.where(vnan, float("nan"), scale), mask=d_ok)


@triton.jit
def _quant_tile(x, inv, INT8: tl.constexpr, EMU_CAST: tl.constexpr):
    """fp32 ``x`` times the reciprocal of its scale (broadcast ``inv``), cast to int8 or e4m3."""
    xs = x * inv
    if INT8:
        x8 = _cast_int8(xs)
    else:
        x8 = _cast_e4m3(xs, EMU_CAST)
    return x8


@triton.jit
def _quantize_rows(x, INT8: tl.constexpr, EMU_CAST: tl.constexpr):
    """Per-row 8-bit quantisation of an fp32 tile ``[rows, D]`` (:func:`quantize_q_tokens`'s
    arithmetic): scale ``max(amax / qmax, 1e-12)`` by IEEE division, the rows times its IEEE
    reciprocal, cast. Returns ``(x8 [rows, D], scale [rows])``; also used inside the attention
    kernel, which then quantises Q itself."""
    qmax = 127.0 if INT8 else 448.0
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), 1), qmax), 1e-12)
    return _quant_tile(x, tl.div_rn(1.0, scale)[:, None], INT8, EMU_CAST), scale


@triton.jit
def _quant_rows_kernel(X, X8, SCALE, S, H, D, sx_b, sx_h, sx_s, s8_b, s8_h, s8_s, sc_b, sc_h,
                       INT8: tl.constexpr, EMU_CAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (block of ``BLOCK`` rows, batch x head) per program: one scale per row
    (:func:`_quantize_rows`: ``amax / 448``, e4m3 rows; with ``INT8`` ``amax / 127``, int8 rows),
    stored at the row's token index (``SCALE`` ``[B, H, S]``, unit token stride). Q's prologue."""
    b, h, bh, pos, offs_d = _tile_coords(H, BLOCK, BLOCK_D)
    ok = (pos < S)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b.to(tl.int64) * sx_b + h * sx_h + pos[:, None].to(tl.int64) * sx_s + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    x8, scale = _quantize_rows(x, INT8, EMU_CAST)  # scale [BLOCK]
    tl.store(SCALE + b * sc_b + h * sc_h + pos, scale, mask=pos < S)
    tl.store(X8 + b.to(tl.int64) * s8_b + h * s8_h + pos[:, None].to(tl.int64) * s8_s + offs_d[None, :], x8, mask=ok)


@triton.jit
def _quant_k_block(K, K8, KSC, STATS, blk, b, h, bh, S, H, D, sk_b, sk_h, sk_s, NKB,
                   INT8: tl.constexpr, EMU_CAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """K block ``blk`` of (batch b, head h): its rows minus the head's token mean (``STATS[bh, 0]``),
    one fp32 scale for the block (``amax / 448`` e4m3, ``amax / 127`` int8) at ``KSC [B * H,
    NKB]``, the rows times the IEEE reciprocal of the scale, cast, at ``K8 [B, H, S, D]``
    (contiguous)."""
    pos = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    ok = (pos < S)[:, None] & d_ok[None, :]
    x = tl.load(K + b.to(tl.int64) * sk_b + h * sk_h + pos[:, None].to(tl.int64) * sk_s + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(STATS + bh * 3 * D + offs_d, mask=d_ok, other=0.0)
    x = tl.where(ok, x - mean[None, :], 0.0)
    qmax = 127.0 if INT8 else 448.0
    scale = tl.maximum(tl.div_rn(tl.max(tl.max(tl.abs(x), 1), 0), qmax), 1e-12)
    tl.store(KSC + bh * NKB + blk, scale)
    x8 = _quant_tile(x, tl.div_rn(1.0, scale), INT8, EMU_CAST)
    tl.store(K8 + bh.to(tl.int64) * S * D + pos[:, None].to(tl.int64) * D + offs_d[None, :], x8, mask=ok)


@triton.jit
def _quant_vt_tile(V, VT8, STATS, tile, b, h, bh, S, S_PAD, D, sv_b, sv_h, sv_s, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr, EMU_CAST: tl.constexpr, KEY_ORDER: tl.constexpr):
    """V^T positions ``tile * BLOCK_T + [0, BLOCK_T)`` of (batch b, head h): V rows times the IEEE
    reciprocals of the channel scales (``STATS[bh, 2]``), stored transposed (``VT8 [B, H, D,
    S_PAD]`` contiguous; tokens S .. S_PAD written as 0); with ``KEY_ORDER`` position ``p`` holds
    token :func:`p8_key_order` ``[p]`` (``BLOCK_T`` a multiple of 32). The permutation is applied
    to the rows loaded (whole D-channel rows, still coalesced), so the transposed e4m3 store stays
    contiguous along the positions."""
    p = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    # token at position p inside its 32-token group: bits (4, 3, 2, 1, 0) of p come from token bits (4, 2, 1, 3, 0)
    t = p
    if KEY_ORDER:
        t = (p & ~14) | (((p >> 1) & 1) << 3) | (((p >> 3) & 1) << 2) | (((p >> 2) & 1) << 1)
    x = tl.load(V + b.to(tl.int64) * sv_b + h * sv_h + t[:, None].to(tl.int64) * sv_s + offs_d[None, :],
                mask=(t < S)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    sc = tl.load(STATS + bh * 3 * D + 2 * D + offs_d, mask=d_ok, other=1.0)
    x8 = tl.trans(_cast_e4m3(x * tl.div_rn(1.0, sc)[None, :], EMU_CAST))  # [BLOCK_D, BLOCK_T]
    dst = VT8 + bh.to(tl.int64) * D * S_PAD + offs_d[:, None].to(tl.int64) * S_PAD + p[None, :]
    tl.store(dst, x8, mask=d_ok[:, None] & (p < S_PAD)[None, :])


@triton.jit
def _quant_kv_kernel(K, K8, KSC, V, VT8, STATS, S, S_PAD, H, D, NKB, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                     HAS_K: tl.constexpr, HAS_V: tl.constexpr, INT8: tl.constexpr, EMU_CAST: tl.constexpr,
                     KEY_ORDER: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """K's and V's quantisation in one launch: program ``(i, batch x head)`` quantises K block
    ``i`` (:func:`_quant_k_block`) for ``i < NKB`` (``HAS_K``), else V^T tile ``i - NKB``
    (:func:`_quant_vt_tile`, ``HAS_V``). ``STATS [B * H, 3, D]``: K mean, V amax, V scale."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    if i < NKB:
        if HAS_K:
            _quant_k_block(K, K8, KSC, STATS, i, b, h, bh, S, H, D, sk_b, sk_h, sk_s, NKB, INT8, EMU_CAST, BLOCK_K,
                           BLOCK_D)
    elif HAS_V:
        _quant_vt_tile(V, VT8, STATS, i - NKB, b, h, bh, S, S_PAD, D, sv_b, sv_h, sv_s, BLOCK_T, BLOCK_D, EMU_CAST,
                       KEY_ORDER)


# launch settings of the prologue kernels (chosen on the H200, benchmarks/prologue_breakdown.py;
# kv_warps: the fused K / V^T launch, which sessions 12's separate K and V sweeps both put at 4)
TUNING = dict(q_rows=32, q_warps=4, kv_warps=4, v_tile=64, stats_chunk=1024, stats_tile=32, stats_warps=4)


def _tuning(tuning) -> dict:
    """:data:`TUNING` with the keys of ``tuning`` (a dict or None) replaced."""
    return dict(TUNING, **tuning) if tuning else TUNING


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _kv_stats_triton(k: torch.Tensor, v: Optional[torch.Tensor], tuning=None):
    """One pass over ``k`` (and ``v``) ``[B, Hk, S, D]`` (any strides, unit last one), finished
    in the kernel (no host reduction): fp32 ``stats [B, Hk, 3, D]``, ``[:, :, 0]`` K's token mean
    (fp32 sums of ``stats_chunk``-token chunks, then of the chunks in order, divided by S) and,
    with ``v``, ``[:, :, 1]`` the max of ``|v|`` over tokens (exact; a NaN makes its channel's
    max NaN, as in torch) and ``[:, :, 2]`` the channel scales of :func:`_v_scale`. Returns
    ``(mean [B, Hk, D], amax or None, v_scale or None, stats)`` (views of ``stats``)."""
    t = _tuning(tuning)
    B, Hk, S, D = k.shape
    has_v = v is not None
    chunk = min(t["stats_chunk"], max(t["stats_tile"], triton.next_power_of_2(S)))
    n_chunks = triton.cdiv(S, chunk)
    part = torch.empty(2 if has_v else 1, B * Hk, n_chunks, D, dtype=torch.float32, device=k.device)
    stats = torch.empty(B, Hk, 3, D, dtype=torch.float32, device=k.device)
    ticket = torch.zeros(B * Hk, dtype=torch.int32, device=k.device)
    vv = v if has_v else k
    _kv_stats_kernel[(n_chunks, B * Hk)](
        k, vv, part[0], part[-1], ticket, stats, S, Hk, D, k.stride(0), k.stride(1), k.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), CHUNK=chunk, TILE=min(t["stats_tile"], chunk), BLOCK_D=_block_d(D),
        HAS_V=has_v, num_warps=t["stats_warps"])
    return stats[:, :, 0], (stats[:, :, 1] if has_v else None), (stats[:, :, 2] if has_v else None), stats


def _quant_rows_triton(x, bhs_strides, sizes, out, out_strides, block, warps):
    """Launch :func:`_quant_rows_kernel` over ``x`` of sizes ``(B, H, S, D)`` with (batch, head,
    token) strides ``bhs_strides`` into ``out`` (e4m3 or int8, strides ``out_strides``); returns
    the fp32 per-token scales ``[B, H, S]`` (``block``: rows per program)."""
    B, H, S, D = sizes
    scale = torch.empty(B, H, S, dtype=torch.float32, device=out.device)
    _quant_rows_kernel[(-(-S // block), B * H)](
        x, out, scale, S, H, D, *bhs_strides, *out_strides, scale.stride(0), scale.stride(1),
        INT8=out.dtype == torch.int8, EMU_CAST=_interpreting(), BLOCK=block, BLOCK_D=_block_d(D), num_warps=warps)
    return scale


_TORCH_8BIT = {"e4m3": FP8_DTYPE, "int8": torch.int8}


def _quantize_q_triton(q, fmt="e4m3", tuning=None):
    t = _tuning(tuning)
    B, S, H, D = q.shape
    q8 = torch.empty(B, S, H, D, dtype=_TORCH_8BIT[fmt], device=q.device)
    qs = _quant_rows_triton(q, (q.stride(0), q.stride(2), q.stride(1)), (B, H, S, D), q8,
                            (q8.stride(0), q8.stride(2), q8.stride(1)), t["q_rows"], t["q_warps"])
    return q8, qs


def _stats_of(mean: torch.Tensor, v_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, Hk, 3, D]`` fp32 statistics (:func:`_kv_stats_triton`'s layout) from a given K mean
    and V channel scales (None: not used)."""
    B, Hk, D = mean.shape
    stats = torch.zeros(B, Hk, 3, D, dtype=torch.float32, device=mean.device)
    stats[:, :, 0] = mean
    if v_scale is not None:
        stats[:, :, 2] = v_scale
    return stats


def _quantize_kv_triton(k, v, block_k, fmt="e4m3", stats=None, key_order=True, tuning=None):
    """K's smoothing and per-block quantisation and (with ``v``) V^T's per-channel quantisation,
    one launch (:func:`_quant_kv_kernel`). ``k`` / ``v`` ``[B, Hk, S, D]`` (any strides, unit last
    one; either may be None); ``stats``: ``[B, Hk, 3, D]`` (:func:`_kv_stats_triton`, or
    :func:`_stats_of`). Returns ``(k8 [B, Hk, S, D], k_scale [B, Hk, NKB], vt8 [B, Hk, D, S_pad])``
    (None for an absent input)."""
    t = _tuning(tuning)
    x = k if k is not None else v
    B, Hk, S, D = x.shape
    dev = x.device
    BLOCK_D = _block_d(D)
    nkb = -(-S // block_k) if k is not None else 0
    k8 = ks = vt8 = None
    if k is not None:
        k8 = torch.empty(B, Hk, S, D, dtype=_TORCH_8BIT[fmt], device=dev)
        ks = torch.empty(B, Hk, nkb, dtype=torch.float32, device=dev)
    nvt, s_pad, BLOCK_T = 0, 0, 32
    if v is not None:
        s_pad = -(-S // _VT_PAD) * _VT_PAD
        vt8 = torch.empty(B, Hk, D, s_pad, dtype=FP8_DTYPE, device=dev)
        BLOCK_T = t["v_tile"] if BLOCK_D <= 128 else 32
        nvt = triton.cdiv(s_pad, BLOCK_T)
    kk, vv = (k if k is not None else x), (v if v is not None else x)
    _quant_kv_kernel[(nkb + nvt, B * Hk)](
        kk, k8 if k8 is not None else stats, ks if ks is not None else stats, vv, vt8 if vt8 is not None else stats,
        stats, S, s_pad, Hk, D, nkb, kk.stride(0), kk.stride(1), kk.stride(2), vv.stride(0), vv.stride(1), vv.stride(2),
        HAS_K=k is not None, HAS_V=v is not None, INT8=fmt == "int8", EMU_CAST=_interpreting(), KEY_ORDER=key_order,
        BLOCK_K=block_k, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=t["kv_warps"])
    return k8, ks, vt8


def _v_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel V scales from the channel amax ``[B, Hk, D]`` (the torch prologue; the Triton
    one computes the same in :func:`_kv_stats_finish`)."""
    return _div(amax, FP8_MAX).clamp_min(_TINY).contiguous()


@dataclass
class FP8Operands:
    """What the kernel's quantised variants read (shapes as in the functions above). The name is
    historical: ``q8`` / ``k8`` are e4m3 or int8 (:func:`precision_parts`), and ``vt8`` /
    ``v_scale`` are None when P.V is not 8-bit (``precision="int8"``: the kernel reads V itself)."""

    q8: Optional[torch.Tensor]  # [B, S, H, D] e4m3 or int8, original token order (None: the kernel quantises Q)
    q_scale: Optional[torch.Tensor]  # [B, H, S] fp32, one per token (None with q8)
    k8: torch.Tensor  # [B, Hk, S, D] e4m3 or int8, plan key order, smoothed
    k_scale: torch.Tensor  # [B, Hk, NKB] fp32
    k_mean: torch.Tensor  # [B, Hk, D] fp32 (the smoothing shift; for the LSE correction)
    vt8: Optional[torch.Tensor]  # [B, Hk, D, S_pad] e4m3, plan key order (None without an 8-bit P.V)
    v_scale: Optional[torch.Tensor]  # [B, Hk, D] fp32 (None without an 8-bit P.V)


def _check_operands(q, k_plan, v_plan, block_k, pv8):
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, S, H, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    B, S, H, D = q.shape
    if not isinstance(k_plan, torch.Tensor) or k_plan.dim() != 4 or k_plan.shape[0] != B or k_plan.shape[2:] != (S, D):
        raise ValueError(f"k_plan must be a [B, Hk, S, D] = [{B}, Hk, {S}, {D}] tensor, got "
                         f"{getattr(k_plan, 'shape', type(k_plan).__name__)}")
    Hk = k_plan.shape[1]
    if Hk < 1 or H % Hk:
        raise ValueError(f"k_plan's {Hk} heads must divide q's {H}")
    if pv8 and (not isinstance(v_plan, torch.Tensor) or v_plan.shape != k_plan.shape):
        raise ValueError(f"v_plan must be a tensor of k_plan's shape {tuple(k_plan.shape)}, got "
                         f"{getattr(v_plan, 'shape', type(v_plan).__name__)}")
    for name, x in (("q", q), ("k_plan", k_plan)) + ((("v_plan", v_plan),) if pv8 else ()):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got strides {x.stride()}")
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1:
        raise ValueError(f"block_k must be a positive int, got {block_k!r}")


def quantize_operands(q: torch.Tensor, k_plan: torch.Tensor, v_plan: Optional[torch.Tensor], block_k: int,
                      precision: str = "fp8", impl: Optional[str] = None,
                      v_key_order: bool = True, k_mean: Optional[torch.Tensor] = None,
                      with_q: bool = True) -> FP8Operands:
    """The whole prologue of the quantised precision ``precision``.

    Args:
        q: ``[B, S, H, D]`` fp16/bf16/fp32, original token order, unit last stride.
        k_plan, v_plan: ``[B, Hk, S, D]`` (Hk divides H), plan key order, any strides with a unit
            last one. ``v_plan`` is read only when P.V is 8-bit (``"fp8"``, ``"int8_fp8"``; may
            be None for ``"int8"``).
        block_k: the plan's key block size (K's quantisation blocks; Q has one scale per token).
        precision: ``"fp8"``, ``"int8"`` or ``"int8_fp8"`` (:func:`precision_parts`).
        impl: ``"triton"`` / ``"torch"`` (default: ``VIDATTN_FP8_PROLOGUE`` or
            :data:`DEFAULT_IMPL`; torch where Triton cannot run). Both give identical results.
        v_key_order: ``vt8``'s tokens in :func:`p8_key_order` (:func:`quantize_v_channels`).
        k_mean: the K smoothing shift, fp32 ``[B, Hk, D]`` (default: K's token mean, which the
            Triton prologue sums in fp32 chunks of tokens and the torch one with ``torch.mean``;
            equal to ~1e-7 relative, so pass one implementation's ``k_mean`` to the other to
            compare their 8-bit tensors bit for bit).
        with_q: quantise Q (False: ``q8`` / ``q_scale`` are None, for a kernel that quantises Q
            per token itself with the same arithmetic, :func:`_quantize_rows`; q is then only checked).
    Returns:
        :class:`FP8Operands`: ``q8`` ``[B, S, H, D]`` contiguous (original order) and ``k8``
        ``[B, Hk, S, D]`` contiguous (plan order, smoothed), e4m3fn or int8, their fp32 scales
        ``[B, H, S]`` (per token) / ``[B, Hk, NKB]``, ``k_mean`` ``[B, Hk, D]``; with an 8-bit
        P.V ``vt8`` e4m3fn ``[B, Hk, D, S_pad]`` and ``v_scale`` ``[B, Hk, D]``, else both None.
    Raises:
        ValueError: ``precision`` is not a quantised precision, ``impl`` unknown, or the tensors /
            block size do not fit (naming the argument).
    """
    qk, pv8 = precision_parts(precision)
    if qk is None:
        raise ValueError(f"precision must be one of {PRECISIONS[1:]} (a quantised precision), got None")
    if FP8_DTYPE is None and (qk == "e4m3" or pv8):
        raise TypeError(f"torch {torch.__version__} has no float8_e4m3fn")
    impl = impl or os.environ.get("VIDATTN_FP8_PROLOGUE") or DEFAULT_IMPL
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'triton' or 'torch', got {impl!r}")
    _check_operands(q, k_plan, v_plan, block_k, pv8)
    if q.device.type != "cuda" and not _interpreting():
        impl = "torch"
    if k_mean is not None:
        k_mean = _check_mean(k_mean, k_plan)
    vt8 = vs = q8 = qs = None
    with torch.no_grad():
        if impl == "triton":
            # one pass over K and V for the K mean and V's channel scales (finished in the kernel),
            # then one launch that quantises K and V^T (and one for Q)
            vp = v_plan if pv8 else None
            if k_mean is None:
                k_mean, _, vs, stats = _kv_stats_triton(k_plan, vp)
            else:
                vs = _v_scale(_channel_amax(v_plan)) if pv8 else None
                stats = _stats_of(k_mean, vs)
            if with_q:
                q8, qs = _quantize_q_triton(q, qk)
            k8, ks, vt8 = _quantize_kv_triton(k_plan, vp, block_k, qk, stats, v_key_order)
            km = k_mean
        else:
            if with_q:
                q8, qs = quantize_q_tokens(q, qk)
            k8, ks, km = smooth_quantize_k(k_plan, block_k, qk, mean=k_mean)
            if pv8:
                vt8, vs = quantize_v_channels(v_plan, v_key_order)
    return FP8Operands(q8, qs, k8, ks, km, vt8, vs)


def lse_smoothing_correction(q: torch.Tensor, k_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """The term the K smoothing removed from every logit of a row, as a natural-log LSE shift:
    ``scale * q . k_mean`` ``[B, H, S]`` fp32 (``q [B, S, H, D]``, ``k_mean [B, Hk, D]``, Hk
    divides H). The true LSE is the smoothed one plus this."""
    H, Hk = q.shape[2], k_mean.shape[1]
    km = k_mean.repeat_interleave(H // Hk, dim=1) if Hk != H else k_mean
    return scale * torch.einsum("bshd,bhd->bhs", q.float(), km)

"""The Hopper Gluon kernel: when it runs (refusals, checked on CPU), that it builds for sm_90 with
this Triton (compile-only, no GPU needed), and on a Hopper GPU its values against the float64
reference (random full-block plans, token permutations, ragged lengths, grouped K/V heads, LSE)."""

import os

import pytest
import torch

from vidattn.kernels.reference import block_sparse_attention_reference as reference
from vidattn.plan import FULL, PARTIAL, plan_from_block_mask

from kernel_cases import random_qkv

gluon_launch = pytest.importorskip("vidattn.kernels.sparse_flash_gluon_launch")

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
# the suite's conftest turns the interpreter on by default; a GPU run sets TRITON_INTERPRET=0
ON_GPU = pytest.mark.skipif(not HOPPER or os.environ.get("TRITON_INTERPRET") != "0",
                            reason="needs a Hopper (sm_90) GPU and TRITON_INTERPRET=0")


def random_full_plan(S, H, density, block_q, block_k, seed, perm=False, device="cpu"):
    """A full-block plan: each query block keeps ``round(density * NKB)`` random key blocks (at
    least one), optionally in a random token order per head."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = -(-S // block_q), -(-S // block_k)
    keep = max(1, round(density * nk))
    idx = torch.argsort(torch.rand(1, H, nq, nk, generator=g), dim=-1)[..., :keep]
    cls = torch.zeros(1, H, nq, nk, dtype=torch.int8).scatter_(-1, idx, FULL)
    p = torch.stack([torch.randperm(S, generator=g) for _ in range(H)]) if perm else None
    plan = plan_from_block_mask(cls, seq_len=S, block_q=block_q, block_k=block_k, rule=None, perm=p,
                                token_density=keep / nk)
    return plan.to(device)


# ---- refusals: every case the kernel does not take is named before it runs (CPU tensors)

def _refusal(q=None, plan=None, precision=None, dtype=torch.bfloat16, D=128):
    q, k, v = random_qkv(1, 256, 2, 2, D, dtype, seed=0) if q is None else q
    plan = random_full_plan(256, 2, 0.5, 128, 128, seed=0) if plan is None else plan
    return gluon_launch.gluon_refusal(q, k, v, plan, precision)


def test_refuses_what_it_does_not_run(monkeypatch):
    assert "precision='int4'" in _refusal(precision="int4")
    assert "dtype torch.float32" in _refusal(dtype=torch.float32)
    assert "head dim 96" in _refusal(D=96)
    assert "plan blocks 32x64" in _refusal(plan=random_full_plan(256, 2, 0.5, 32, 64, seed=0))
    cls = torch.full((1, 2, 2, 2), PARTIAL, dtype=torch.int8)
    from kernel_cases import StripeRule
    partial = plan_from_block_mask(cls, seq_len=256, block_q=128, block_k=128, rule=StripeRule(), token_density=1.0)
    monkeypatch.setattr("vidattn.kernels.sparse_flash_tables.MASK_BUDGET_BYTES", 0)
    assert "VIDATTN_MASK_BUDGET_BYTES" in _refusal(plan=partial)
    # a case it takes, on a CPU tensor: refused for the interpreter, then for the device
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" in _refusal()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA device" in _refusal()


def test_mode_is_checked(monkeypatch):
    monkeypatch.setenv("VIDATTN_GLUON", "sometimes")
    with pytest.raises(ValueError, match="VIDATTN_GLUON"):
        gluon_launch.gluon_mode()


def test_stage_count_fits_shared_memory():
    # 227 KiB: Q (128 rows), 24 KiB of scratch, then rings of K + V tiles (1 byte per 8-bit value)
    for bq, bk, d, precision, want in (
            (128, 128, 128, None, 2), (128, 64, 128, None, 4), (128, 128, 64, None, 4), (64, 64, 128, None, 2),
            (64, 64, 64, None, 4), (64, 128, 64, None, 2), (64, 128, 128, None, 1),
            (128, 128, 128, "int8", 3), (128, 128, 128, "fp8", 4), (64, 128, 128, "int8", 1),
            (64, 128, 128, "int8_fp8", 2)):
        cfg = gluon_launch.gluon_config(bq, bk, d, precision)
        assert cfg["STAGES"] == want and cfg["SPLIT"] == (bq == 64), (bq, bk, d, precision)


def test_refuses_kv_strides_without_a_descriptor():
    q, k, v = random_qkv(1, 256, 2, 2, 128, torch.bfloat16, seed=0)
    k = torch.randn(1, 256, 2, 136, dtype=torch.bfloat16)[..., 3:131]  # rows not 16-byte aligned
    plan = random_full_plan(256, 2, 0.5, 128, 128, seed=0)
    assert "k strides" in gluon_launch.gluon_refusal(q, k, v, plan)


def test_kv_view_is_the_descriptor_view():
    """The Gluon launcher builds its descriptors from kv_view; the portable one through
    kv_descriptor: the same 2-D view for token-major and head-major K/V."""
    from vidattn.kernels.sparse_flash_io import _bhs_strides, _bsh_strides, kv_descriptor, kv_view

    tm = torch.randn(2, 300, 3, 64, dtype=torch.bfloat16)  # [B, S, Hk, D]
    hm = torch.randn(2, 3, 300, 64, dtype=torch.bfloat16)  # [B, Hk, S, D]
    for t, st in ((tm, _bsh_strides(tm)), (hm, _bhs_strides(hm))):
        rows, cols, row_stride, *offsets = kv_view(t, st, 2, 3, 300)
        desc, *desc_offsets = kv_descriptor(t, st, 2, 3, 300, 64)
        assert [rows, cols] == list(desc.shape) and [row_stride, 1] == list(desc.strides)
        assert offsets == desc_offsets and desc.base is t
    assert kv_view(tm[..., 1:63], _bsh_strides(tm), 2, 3, 300) is None  # not 16-byte aligned


def test_refuses_what_does_not_fit_shared_memory():
    q, k, v = random_qkv(1, 256, 2, 2, 128, torch.bfloat16, seed=0)
    plan = random_full_plan(256, 2, 0.5, 64, 128, seed=0)
    assert "do not fit in shared memory" in gluon_launch.gluon_refusal(q, k, v, plan)


# ---- the kernel builds for sm_90 with this Triton (no GPU: triton.compile to PTX and cubin)

# the wgmma of S = Q K^T and of O += P V in each precision
_MMAS = {None: ("m64n128k16.f32.bf16.bf16", "m64n128k16.f32.bf16.bf16"),
         "int8": ("m64n128k32.s32.s8.s8", "m64n128k16.f32.bf16.bf16"),
         "fp8": ("m64n128k32.f32.e4m3.e4m3", "m64n128k32.f32.e4m3.e4m3"),
         "int8_fp8": ("m64n128k32.s32.s8.s8", "m64n128k32.f32.e4m3.e4m3")}


@pytest.mark.skipif(gluon_launch.gluon_available() is not None, reason="no usable Gluon Hopper module")
def test_polynomial_exponentials_build_without_shuffles():
    """``EXP_POLY``: half of the softmax's 256 MUFU ``ex2`` per thread (64 logits x two call sites
    x two consumer warpgroups; a few more for the row rescale factors) leave for the polynomial,
    and the column split / join moves no data between threads. Built for sm_90 as below."""
    from benchmarks.gluon_build import build

    try:
        ptx = {poly: build("fp8", modes="bench", exp_poly=poly)["ptx"] for poly in (False, True)}
    except RuntimeError as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this Triton install: {str(e)[-300:]}")
        raise
    n = {poly: p.count("ex2.approx") for poly, p in ptx.items()}
    assert n[False] >= 256 and n[False] - n[True] == 128, n
    assert ptx[True].count("shfl.sync.idx") <= 1 and ptx[True].count("shfl.sync.bfly") == ptx[False].count("shfl.sync.bfly")


@pytest.mark.skipif(gluon_launch.gluon_available() is not None, reason="no usable Gluon Hopper module")
@pytest.mark.parametrize("split,precision,i2f_bits", [(False, None, False), (True, None, False), (False, "int8", False),
                                                      (True, "fp8", False), (False, "int8_fp8", False),
                                                      (True, "int8", True)])
def test_builds_for_sm90(split, precision, i2f_bits):
    """Compiled to PTX and a cubin in a fresh process, every mode on (``benchmarks/gluon_build.py``;
    Gluon kernels do not build under the interpreter this suite runs in)."""
    from benchmarks.gluon_build import build

    try:
        built = build(precision or "bf16", split=split, i2f_bits=i2f_bits, modes="all")
    except RuntimeError as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this Triton install: {str(e)[-300:]}")
        raise
    ptx = built["ptx"]
    assert built["cubin_bytes"] > 0
    assert ptx.count("cp.async.bulk.tensor") >= 2  # K and V by TMA
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx  # warpgroup MMAs, register hand-over
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # S of the next tile overlaps P.V of this one
    assert built["num_warps"] == 12  # 4 + 4 consumer warps, 1 load warp padded to a warpgroup
    import re
    mmas = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.\w+\.\w+\.\w+)", ptx))
    assert mmas == set(_MMAS[precision]), mmas
    if precision in ("fp8", "int8_fp8"):  # the e4m3 P register operand is held past its MMA's wait
        assert "// hold" in ptx
    # P reaches the P.V MMA without shuffles between threads: only the row max / sum butterflies
    # and one index shuffle in every mode (the e4m3 P needed 64 more before P8_KEY_DIMS)
    assert ptx.count("shfl.sync.idx") <= 1, ptx.count("shfl.sync.idx")
    if precision in ("int8", "int8_fp8"):  # int32 logits: the conversion instruction, or bit arithmetic
        # (64 logits per thread per 64 x 128 tile, two softmax call sites, two consumer warpgroups = 256;
        # a few other conversions remain in every mode)
        n_cvt = ptx.count("cvt.rn.f32.s32")
        assert (n_cvt < 64) if i2f_bits else (n_cvt >= 256), n_cvt


@pytest.mark.skipif(gluon_launch.gluon_available() is not None, reason="no usable Gluon Hopper module")
def test_row_sums_by_mma_build_without_the_add_tree():
    """``ROWSUM_MMA`` (int8 Q.K, bf16 P.V): the row sums leave the registers for an N = 8 wgmma of
    P (``m64n8k16``) next to the P.V's, the sum's butterflies go (only the row max's remain), and
    the steady key loop gets shorter. Built for sm_90 as above."""
    from benchmarks.gluon_build import build

    try:
        built = {on: build("int8", modes="bench", rowsum=on) for on in (False, True)}
    except RuntimeError as e:
        if "ptxas" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this Triton install: {str(e)[-300:]}")
        raise
    assert "m64n8k16.f32.bf16.bf16" in built[True]["ptx"] and "m64n8k16" not in built[False]["ptx"]
    assert built[True]["shfl_bfly"] < built[False]["shfl_bfly"], (built[True]["shfl_bfly"], built[False]["shfl_bfly"])
    loop = {on: b["key_loop"]["instructions"] for on, b in built.items()}
    assert loop[True] < loop[False] - 32, loop
    assert "FADD" not in built[True]["key_loop"]["ops"] or built[True]["key_loop"]["ops"]["FADD"] < 8


def test_e4m3_p_key_order_leaves_p_dot_v_unchanged():
    """The kernels permute the e4m3 P's columns into the S accumulator's register order
    (``P8_KEY_DIMS``); the prologue stores V^T's tokens in the same order. Against the order derived
    from the wgmma register layouts: in each 32-key group, A-operand position 16 h + 4 t + i
    (thread t of a quad, byte i) holds the S column 16 h + 8 (i // 2) + 2 t + i % 2."""
    from vidattn.kernels.quant_fp8 import P8_KEY_DIMS, p8_key_order, quantize_v_channels

    n = 128
    want = [32 * g + 16 * h + 8 * (i // 2) + 2 * t + i % 2 for g in range(n // 32) for h in range(2)
            for t in range(4) for i in range(4)]
    assert p8_key_order(n).tolist() == want
    g = torch.Generator().manual_seed(0)
    p, v = torch.rand(64, n, generator=g, dtype=torch.float64), torch.randn(2, 3, n, 16, generator=g)
    # the kernels' view of P (reshape / permute are row-major in Triton and Gluon as in torch)
    p_k = p.reshape(64, n // 32, 2, 2, 2, 2, 2).permute(P8_KEY_DIMS.value).reshape(64, n)
    assert not torch.equal(p_k, p)
    vt8, vs = quantize_v_channels(v)  # [B, Hk, D, S_pad], tokens in the P8 key order
    vt_nat, _ = quantize_v_channels(v, key_order=False)
    ref = p @ (vt_nat.double() * vs[..., None]).transpose(-1, -2)
    torch.testing.assert_close(p_k @ (vt8.double() * vs[..., None]).transpose(-1, -2), ref, rtol=1e-12, atol=1e-12)


# ---- values on a Hopper GPU

@ON_GPU
@pytest.mark.parametrize("S,H,Hk,D,bq,bk,density,perm,lse", [
    (1024, 2, 2, 128, 128, 128, 0.5, False, False),
    (1000, 4, 2, 128, 128, 128, 0.3, True, True),  # ragged, grouped K/V, permuted, LSE
    (777, 2, 1, 64, 128, 64, 0.6, False, True),
    (2048, 2, 2, 128, 128, 64, 1.0, True, False),  # dense plan, 64-key blocks
    (300, 1, 1, 128, 128, 128, 0.01, False, True),  # one key block per query block
    (1000, 2, 1, 128, 64, 64, 0.4, True, True),  # 64-token query blocks: a list per warpgroup
    (704, 2, 2, 64, 64, 128, 0.5, False, False),  # 11 query blocks: the last CTA's second half is empty
    (4096, 1, 1, 128, 64, 64, 0.05, False, False),
])
def test_matches_float64_reference(S, H, Hk, D, bq, bk, density, perm, lse, monkeypatch):
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    monkeypatch.setenv("VIDATTN_GLUON", "1")
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t.cuda() for t in random_qkv(2, S, H, Hk, D, dtype, seed=S + D))
        plan = random_full_plan(S, H, density, bq, bk, seed=S, perm=perm, device="cuda")
        got = block_sparse_attention_triton(q, k, v, plan, return_lse=lse)
        assert last_launch["path"] == "gluon-hopper"
        want = reference(q.double(), k.double(), v.double(), plan, return_lse=lse)
        if lse:
            (got, got_lse), (want, want_lse) = got, want
            torch.testing.assert_close(got_lse, want_lse.float(), atol=2e-3, rtol=0)
        err = (got.double() - want).norm() / want.norm()
        assert err < (8e-3 if dtype == torch.bfloat16 else 2e-3), (dtype, float(err))


@ON_GPU
@pytest.mark.parametrize("bq,bk,D,perm", [(128, 128, 128, False), (64, 64, 128, True), (128, 64, 64, True),
                                          (64, 128, 64, False)])
def test_partial_blocks_match_float64_reference(bq, bk, D, perm, monkeypatch):
    """Plans with partial blocks (token masks read per block): a generic rule, in the token order
    or a random order per head, and a 3-D neighborhood with text tokens."""
    import vidattn
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    from kernel_cases import StripeRule, per_head_permuted_plan

    monkeypatch.setenv("VIDATTN_GLUON", "1")
    S, H = 900, 2
    if perm:
        plans = [per_head_permuted_plan(StripeRule(), S, H, bq, bk, seed=3)]
    else:
        from vidattn.plan import plan_from_rule
        plans = [plan_from_rule(StripeRule(), seq_len=S, block_q=bq, block_k=bk, num_heads=H)]
    layout = vidattn.TokenLayout((4, 12, 16), suffix=20)
    plans.append(vidattn.Neighborhood(kernel_size=(3, 5, 7), block_size=bq).plan(layout, num_heads=H))
    for plan in plans:
        S = plan.seq_len
        q, k, v = (t.cuda() for t in random_qkv(1, S, H, H, D, torch.bfloat16, seed=S))
        plan = plan.to("cuda")
        assert plan.has_partial
        got, got_lse = block_sparse_attention_triton(q, k, v, plan, return_lse=True)
        assert last_launch["path"] == "gluon-hopper"
        want, want_lse = reference(q.double(), k.double(), v.double(), plan, return_lse=True)
        assert float((got.double() - want).norm() / want.norm()) < 8e-3
        torch.testing.assert_close(got_lse, want_lse.float(), atol=2e-3, rtol=0)


@ON_GPU
def test_auto_mode_takes_portable_kernel_when_it_cannot_run(monkeypatch):
    from vidattn.errors import TritonUnsupported
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    monkeypatch.delenv("VIDATTN_GLUON", raising=False)
    q, k, v = (t.cuda() for t in random_qkv(1, 256, 2, 2, 96, torch.bfloat16, seed=1))  # head dim 96
    plan = random_full_plan(256, 2, 0.5, 128, 128, seed=0, device="cuda")
    block_sparse_attention_triton(q, k, v, plan)
    assert last_launch["path"] == "portable" and "head dim 96" in last_launch["gluon_refused"]
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    with pytest.raises(TritonUnsupported, match="head dim 96"):
        block_sparse_attention_triton(q, k, v, plan)
    # quantised precisions: the portable kernel unless VIDATTN_GLUON=1 (it was faster there), except
    # fp8 and int8 on plans of full blocks
    q, k, v = (t.cuda() for t in random_qkv(1, 256, 2, 2, 128, torch.bfloat16, seed=1))
    monkeypatch.setenv("VIDATTN_GLUON", "auto")
    block_sparse_attention_triton(q, k, v, plan, precision="int8_fp8")
    assert last_launch["path"] == "portable" and "VIDATTN_GLUON=1" in last_launch["gluon_refused"]
    for precision in ("int8", "fp8"):
        block_sparse_attention_triton(q, k, v, plan, precision=precision)
        assert last_launch["path"] == "gluon-hopper", precision


def test_auto_mode_sends_fp8_and_int8_full_block_plans_to_the_gluon_kernel():
    from vidattn.kernels.sparse_flash_launch import auto_portable_reason

    dense, half = random_full_plan(512, 2, 1.0, 128, 128, seed=0), random_full_plan(512, 2, 0.5, 128, 128, seed=0)
    assert auto_portable_reason(dense, None) is None and auto_portable_reason(half, None) is None
    for precision in ("int8", "fp8"):
        assert auto_portable_reason(dense, precision) is None and auto_portable_reason(half, precision) is None
    assert "portable kernel" in auto_portable_reason(dense, "int8_fp8")
    assert "except" not in auto_portable_reason(dense, "int8_fp8")
    cls = torch.full((1, 2, 4, 4), FULL, dtype=torch.int8)
    cls[0, 0, 0, 0] = PARTIAL  # every block listed, one of them partial: not dense
    from kernel_cases import StripeRule
    partial = plan_from_block_mask(cls, seq_len=512, block_q=128, block_k=128, rule=StripeRule(), token_density=1.0)
    assert "except on plans of full blocks" in auto_portable_reason(partial, "int8")
    assert "except on plans of full blocks" in auto_portable_reason(partial, "fp8")


# relative L2 error vs the float64 reference on Gaussian inputs allowed per quantised precision
# (the portable kernel's quantisation error, tests/kernels/test_sparse_flash_fp8.py), and how far the
# Gluon kernel may sit from the portable kernel of the same precision (same operands, other MMA order)
_QUANT_TOL = {"int8": 0.03, "int8_fp8": 0.08, "fp8": 0.12}
_QUANT_DIFF = {"int8": 0.01, "int8_fp8": 0.03, "fp8": 0.03}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@ON_GPU
@pytest.mark.parametrize("precision", ["int8", "int8_fp8", "fp8"])
@pytest.mark.parametrize("S,H,Hk,D,bq,bk,density,perm,lse", [
    (1000, 4, 2, 128, 128, 128, 0.3, True, True),  # ragged, grouped K/V, permuted, LSE
    (777, 2, 1, 64, 128, 64, 0.6, False, True),
    (1000, 2, 1, 128, 64, 64, 0.4, True, False),  # 64-token query blocks: a list per warpgroup
    (2048, 2, 2, 128, 128, 128, 1.0, False, False),  # dense plan
])
def test_quantised_precisions_match_the_portable_kernel_and_reference(precision, S, H, Hk, D, bq, bk, density, perm,
                                                                      lse, monkeypatch):
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    q, k, v = (t.cuda() for t in random_qkv(1, S, H, Hk, D, torch.bfloat16, seed=S + D))
    plan = random_full_plan(S, H, density, bq, bk, seed=S, perm=perm, device="cuda")
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    got = block_sparse_attention_triton(q, k, v, plan, return_lse=lse, precision=precision)
    assert last_launch["path"] == "gluon-hopper"
    monkeypatch.setenv("VIDATTN_GLUON", "0")
    port = block_sparse_attention_triton(q, k, v, plan, return_lse=lse, precision=precision)
    assert last_launch["path"] == "portable"
    want = reference(q.double(), k.double(), v.double(), plan, return_lse=lse)
    if lse:
        (got, got_lse), (port, port_lse), (want, want_lse) = got, port, want
        lse_err = (got_lse.double() - want_lse).abs().mean()
        assert lse_err < max(0.1, 1.5 * float((port_lse.double() - want_lse).abs().mean())), float(lse_err)
    err, port_err = _rel(got, want), _rel(port, want)
    assert err < _QUANT_TOL[precision], (precision, err)
    assert err < 1.1 * port_err + 2e-3, (precision, err, port_err)  # no worse than the portable kernel
    assert _rel(got, port) < _QUANT_DIFF[precision], (precision, _rel(got, port))


@ON_GPU
@pytest.mark.parametrize("precision", ["int8_fp8", "fp8"])
def test_8bit_pv_accumulation_in_fp32_registers_matches_the_mma_accumulation(precision, monkeypatch):
    """``VIDATTN_GLUON_PV_SPLIT_ACC=1`` (each tile's e4m3 P.V added in fp32 registers) and the default
    (accumulated in the MMA across tiles): both against the float64 reference, and close to each other."""
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    S, H = 1500, 2
    q, k, v = (t.cuda() for t in random_qkv(1, S, H, H, 128, torch.bfloat16, seed=11))
    plan = random_full_plan(S, H, 0.7, 128, 128, seed=3, perm=True, device="cuda")
    want = reference(q.double(), k.double(), v.double(), plan)
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    outs = {}
    for split in ("0", "1"):
        monkeypatch.setenv("VIDATTN_GLUON_PV_SPLIT_ACC", split)
        outs[split] = block_sparse_attention_triton(q, k, v, plan, precision=precision)
        assert last_launch["path"] == "gluon-hopper"
        assert _rel(outs[split], want) < _QUANT_TOL[precision], (split, _rel(outs[split], want))
    assert _rel(outs["0"], outs["1"]) < _QUANT_DIFF[precision]


@ON_GPU
@pytest.mark.parametrize("precision", ["int8", "int8_fp8"])
def test_quantised_partial_blocks(precision, monkeypatch):
    """A 3-D neighborhood with text tokens (partial blocks through their token masks) in a
    quantised precision: against the float64 reference and the portable kernel."""
    import vidattn
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    H = 2
    plan = vidattn.Neighborhood(kernel_size=(3, 5, 7), block_size=128).plan(
        vidattn.TokenLayout((4, 12, 16), suffix=20), num_heads=H).to("cuda")
    assert plan.has_partial
    q, k, v = (t.cuda() for t in random_qkv(1, plan.seq_len, H, H, 128, torch.bfloat16, seed=7))
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    got = block_sparse_attention_triton(q, k, v, plan, precision=precision)
    assert last_launch["path"] == "gluon-hopper"
    monkeypatch.setenv("VIDATTN_GLUON", "0")
    port = block_sparse_attention_triton(q, k, v, plan, precision=precision)
    want = reference(q.double(), k.double(), v.double(), plan)
    assert _rel(got, want) < _QUANT_TOL[precision] and _rel(got, port) < _QUANT_DIFF[precision]


@ON_GPU
@pytest.mark.parametrize("precision", ["int8", "int8_fp8", "fp8"])
@pytest.mark.parametrize("S,bq,perm", [(1000, 128, True), (777, 64, False)])
def test_q_quantised_in_the_kernel_equals_the_prologue_q(precision, S, bq, perm, monkeypatch):
    """``VIDATTN_Q_IN_KERNEL=gluon`` (default: each consumer warpgroup quantises its bf16 Q rows itself) and
    ``=0`` (the prologue's ``q8`` / ``q_scale``): the same output and LSE bit for bit, with query
    rows of norms over two decades (ragged, permuted, 64- and 128-token query blocks)."""
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    H = 2
    q, k, v = (t.cuda() for t in random_qkv(1, S, H, 1, 128, torch.bfloat16, seed=S))
    g = torch.Generator().manual_seed(S)
    q = q * torch.logspace(-1, 1, S)[torch.randperm(S, generator=g)][None, :, None, None].to(q)
    plan = random_full_plan(S, H, 0.5, bq, bq, seed=S, perm=perm, device="cuda")
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    outs = []
    for mode in ("0", "gluon"):
        monkeypatch.setenv("VIDATTN_Q_IN_KERNEL", mode)
        outs.append(block_sparse_attention_triton(q, k, v, plan, return_lse=True, precision=precision))
        assert last_launch["path"] == "gluon-hopper" and last_launch["q_in_kernel"] is (mode == "gluon")
    (o0, l0), (o1, l1) = outs
    assert torch.equal(o0, o1) and torch.equal(l0, l1)


def _assert_variant_as_accurate(base, variant, want, want_lse, precision):
    """A kernel variant's ``(out, lse)`` against the float64 reference: within the precision's
    tolerance (bf16: the bf16 kernel's) and within 5% of the base variant's error, the LSE too."""
    (o0, l0), (o1, l1) = base, variant
    tol = _QUANT_TOL[precision] if precision else 1e-2
    assert _rel(o1, want) < tol and _rel(o1, want) < 1.05 * _rel(o0, want) + 1e-3, (_rel(o1, want), _rel(o0, want))
    assert (l1.double() - want_lse).abs().max() < (l0.double() - want_lse).abs().max() + 1e-3


@ON_GPU
@pytest.mark.parametrize("precision", [None, "int8", "fp8"])
def test_polynomial_exponentials_keep_the_accuracy(precision, monkeypatch):
    """``VIDATTN_GLUON_EXP_POLY=1`` (half of each tile's exponentials by the FMA-pipe polynomial):
    against the float64 reference within the precision's tolerance (bf16: the bf16 kernel's) and
    close to the MUFU-only output; the LSE too."""
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    S, H = 1500, 2
    q, k, v = (t.cuda() for t in random_qkv(1, S, H, H, 128, torch.bfloat16, seed=12))
    plan = random_full_plan(S, H, 0.7, 128, 128, seed=4, perm=True, device="cuda")
    want, want_lse = reference(q.double(), k.double(), v.double(), plan, return_lse=True)
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    outs = {}
    for poly in ("0", "1"):
        monkeypatch.setenv("VIDATTN_GLUON_EXP_POLY", poly)
        outs[poly] = block_sparse_attention_triton(q, k, v, plan, return_lse=True, precision=precision)
        assert last_launch["path"] == "gluon-hopper"
    _assert_variant_as_accurate(outs["0"], outs["1"], want, want_lse, precision)


@ON_GPU
@pytest.mark.parametrize("precision", [None, "int8", "fp8", "int8_fp8"])
@pytest.mark.parametrize("case", ["rising", "partial"])
def test_lazy_rescale_matches_the_eager_rescale(precision, case, monkeypatch):
    """``VIDATTN_GLUON_LAZY_RESCALE=1`` (a row keeps its max until a tile raises it by more than
    the threshold; a warpgroup rescales its accumulator only after a tile that changed a row's
    max): against the float64 reference within the precision's tolerance and within 5% of the
    eager rescale's error, the LSE too. ``rising``: keys whose norm grows along the sequence, so
    row maxima rise by both small steps (under the threshold) and large ones, in a ragged,
    permuted plan; ``partial``: a plan with partial blocks (token masks) and grouped K/V heads."""
    _assert_setting_keeps_the_accuracy("VIDATTN_GLUON_LAZY_RESCALE", case, precision, monkeypatch)


def _variant_case(case):
    """``(q, k, v, plan)`` on the GPU, bf16, D 128. ``rising``: keys whose norm grows along the
    sequence (row maxima rise by small and large steps), a ragged, permuted plan of full blocks;
    ``partial``: a 3-D neighborhood plan with partial blocks (token masks) and grouped K/V heads;
    ``split``: 64-token plan blocks (each consumer warpgroup its own key list), ragged, permuted."""
    import vidattn

    if case in ("rising", "split"):
        S, H, Hk = 1500, 2, 2
        q, k, v = (t.cuda() for t in random_qkv(1, S, H, Hk, 128, torch.bfloat16, seed=21))
        k = (k.float() * torch.linspace(0.3, 2.5, S, device="cuda")[None, :, None, None]).to(torch.bfloat16)
        bq, bk = (128, 128) if case == "rising" else (64, 64)
        plan = random_full_plan(S, H, 0.8, bq, bk, seed=5, perm=True, device="cuda")
    else:
        layout = vidattn.TokenLayout((4, 12, 16), suffix=20)
        H, Hk = 4, 2
        plan = vidattn.Neighborhood(kernel_size=(3, 5, 7), block_size=128).plan(layout, num_heads=H).to("cuda")
        S = plan.seq_len
        q, k, v = (t.cuda() for t in random_qkv(1, S, H, Hk, 128, torch.bfloat16, seed=22))
        assert plan.has_partial
    return q, k, v, plan


def _assert_setting_keeps_the_accuracy(variable, case, precision, monkeypatch):
    """The Gluon kernel with ``variable`` = 1 against = 0 on :func:`_variant_case` ``case``
    (:func:`_assert_variant_as_accurate`)."""
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    q, k, v, plan = _variant_case(case)
    want, want_lse = reference(q.double(), k.double(), v.double(), plan, return_lse=True)
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv(variable, on)
        outs[on] = block_sparse_attention_triton(q, k, v, plan, return_lse=True, precision=precision)
        assert last_launch["path"] == "gluon-hopper"
    _assert_variant_as_accurate(outs["0"], outs["1"], want, want_lse, precision)


@ON_GPU
@pytest.mark.parametrize("precision,case", [(None, "rising"), (None, "partial"), (None, "split"), ("int8", "rising"),
                                            ("int8", "partial"), ("int8", "split")])
def test_row_sums_by_mma_keep_the_accuracy(precision, case, monkeypatch):
    """``VIDATTN_GLUON_ROWSUM_MMA=1`` (the softmax row sums from a P x ones wgmma; 16-bit P.V
    only): against the float64 reference within the precision's tolerance and within 5% of the
    register sums' error, the LSE too (it is built from the same sums)."""
    _assert_setting_keeps_the_accuracy("VIDATTN_GLUON_ROWSUM_MMA", case, precision, monkeypatch)


@ON_GPU
@pytest.mark.parametrize("precision", [None, "int8"])
@pytest.mark.parametrize("case", ["rising", "partial", "split"])
def test_persistent_grid_with_q_prefetch_is_bitwise_the_default(precision, case, monkeypatch):
    """A persistent grid of 3 programs (many work items each), with and without
    ``VIDATTN_GLUON_Q_PREFETCH=1`` (each next item's Q rows loaded under the current item's tail):
    every item does the same arithmetic as in the one-program-per-item grid, so O and the LSE are
    bitwise equal to it, and within the precision's tolerance of the float64 reference."""
    from vidattn.kernels.sparse_flash_launch import block_sparse_attention_triton, last_launch

    q, k, v, plan = _variant_case(case)
    want, want_lse = reference(q.double(), k.double(), v.double(), plan, return_lse=True)
    monkeypatch.setenv("VIDATTN_GLUON", "1")
    monkeypatch.setattr(gluon_launch, "_sm_count", lambda index: 3)
    outs = {}
    for persistent, prefetch in (("0", "0"), ("1", "0"), ("1", "1")):
        monkeypatch.setenv("VIDATTN_GLUON_PERSISTENT", persistent)
        monkeypatch.setenv("VIDATTN_GLUON_Q_PREFETCH", prefetch)
        outs[persistent + prefetch] = block_sparse_attention_triton(q, k, v, plan, return_lse=True,
                                                                    precision=precision)
        assert last_launch["path"] == "gluon-hopper"
        assert last_launch["q_prefetch"] == (prefetch == "1")
    assert -(-q.shape[1] // 128) * q.shape[0] * q.shape[2] > 3  # some program runs two or more items
    for key in ("10", "11"):
        assert torch.equal(outs[key][0], outs["00"][0]), key
        assert torch.equal(outs[key][1], outs["00"][1]), key
    _assert_variant_as_accurate(outs["00"], outs["11"], want, want_lse, precision)


def test_q_prefetch_setting_is_checked(monkeypatch):
    """``VIDATTN_GLUON_Q_PREFETCH``: 1 on, but only with a persistent grid; 0 / unset off;
    anything else a ValueError naming the variable."""
    monkeypatch.delenv("VIDATTN_GLUON_Q_PREFETCH", raising=False)
    assert not gluon_launch.q_prefetch(True)
    monkeypatch.setenv("VIDATTN_GLUON_Q_PREFETCH", "1")
    assert gluon_launch.q_prefetch(True) and not gluon_launch.q_prefetch(False)
    monkeypatch.setenv("VIDATTN_GLUON_Q_PREFETCH", "0")
    assert not gluon_launch.q_prefetch(True)
    monkeypatch.setenv("VIDATTN_GLUON_Q_PREFETCH", "yes")
    with pytest.raises(ValueError, match="VIDATTN_GLUON_Q_PREFETCH"):
        gluon_launch.q_prefetch(True)


def test_rowsum_setting_is_checked(monkeypatch):
    """``VIDATTN_GLUON_ROWSUM_MMA``: 1 on for every 16-bit P.V (never with an e4m3 P.V), 0 / unset
    off; anything else a ValueError naming the variable."""
    monkeypatch.delenv("VIDATTN_GLUON_ROWSUM_MMA", raising=False)
    assert not any(gluon_launch.gluon_config(128, 128, 128, p)["ROWSUM_MMA"] for p in (None, "int8", "fp8"))
    monkeypatch.setenv("VIDATTN_GLUON_ROWSUM_MMA", "1")
    on = {p: gluon_launch.gluon_config(128, 128, 128, p)["ROWSUM_MMA"] for p in (None, "int8", "fp8", "int8_fp8")}
    assert on == {None: True, "int8": True, "fp8": False, "int8_fp8": False}
    monkeypatch.setenv("VIDATTN_GLUON_ROWSUM_MMA", "0")
    assert not gluon_launch.rowsum_by_mma("int8")
    monkeypatch.setenv("VIDATTN_GLUON_ROWSUM_MMA", "on")
    with pytest.raises(ValueError, match="VIDATTN_GLUON_ROWSUM_MMA"):
        gluon_launch.gluon_config(128, 128, 128, None)


def test_lazy_rescale_setting_is_checked(monkeypatch):
    """``VIDATTN_GLUON_LAZY_RESCALE``: 1 gives the thresholds (an e4m3 P's smaller), 0 / unset
    the eager rescale, anything else a ValueError naming the variable."""
    monkeypatch.setenv("VIDATTN_GLUON_LAZY_RESCALE", "1")
    assert gluon_launch.rescale_tau(True) == gluon_launch.LAZY_TAU_E4M3 < gluon_launch.rescale_tau(False)
    assert gluon_launch.gluon_config(128, 128, 128, "fp8")["RESCALE_TAU"] == gluon_launch.LAZY_TAU_E4M3
    monkeypatch.setenv("VIDATTN_GLUON_LAZY_RESCALE", "0")
    assert gluon_launch.rescale_tau(False) < 0
    monkeypatch.delenv("VIDATTN_GLUON_LAZY_RESCALE")
    assert gluon_launch.gluon_config(128, 128, 128, None)["RESCALE_TAU"] < 0
    monkeypatch.setenv("VIDATTN_GLUON_LAZY_RESCALE", "yes")
    with pytest.raises(ValueError, match="VIDATTN_GLUON_LAZY_RESCALE"):
        gluon_launch.rescale_tau(False)

"""The portable kernel builds for sm_90 in every precision with this Triton, on a machine without a
GPU (``benchmarks/portable_build.py``: the launcher's real arguments, then ``triton.compile`` and
``ptxas``). The interpreter does not run Triton's front end, so a kernel can pass every
interpreter test and still fail to compile on the GPU: the per-token Q scale did, in session 9."""

import pytest

from benchmarks.portable_build import build_case

# the Q.K^T and P.V warpgroup MMAs of each precision (full-block plans, head dim 128, default tiles)
_MMA_TYPES = {"bf16": {"f32.bf16.bf16"}, "fp8": {"f32.e4m3.e4m3"}, "int8": {"s32.s8.s8", "f32.bf16.bf16"},
              "int8_fp8": {"s32.s8.s8", "f32.e4m3.e4m3"}}


@pytest.mark.parametrize("precision", ["bf16", "fp8", "int8", "int8_fp8"])
def test_builds_for_sm90(precision):
    try:
        built = build_case(precision, 0, 0, head_dim=128, rule="dense")
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no CUDA toolchain in this Triton install: {str(e)[-300:]}")
        raise
    assert {m.split(".", 1)[1] for m in built["wgmma"]} == _MMA_TYPES[precision], built["wgmma"]
    # no row vector changes layout inside a key loop (a shared-memory round trip per tile; the
    # per-token Q scale folded into the per-tile scale did, and doubled the spills)
    assert built["loop_row_converts"] == 0, built
    assert built["regs"] is not None and built["stack_frame"] is not None
    if precision != "bf16":  # 0-40 bytes with triton 3.6-3.8 (the H200 driver agrees); 536 when broken
        assert built["stack_frame"] <= 128, built
    # P reaches the P.V MMA without shuffles between threads (an e4m3 P took 96 before its keys
    # were put in the S accumulator's register order, quant_fp8.P8_KEY_DIMS)
    assert built["shfl_idx"] <= 1, built

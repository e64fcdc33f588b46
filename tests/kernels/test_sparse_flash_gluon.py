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
    assert "precision='fp8'" in _refusal(precision="fp8")
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
    for bq, bk, d, want in ((128, 128, 128, 2), (128, 64, 128, 4), (128, 128, 64, 4), (64, 64, 128, 2),
                            (64, 64, 64, 4), (64, 128, 64, 2), (64, 128, 128, 1)):
        cfg = gluon_launch.gluon_config(bq, bk, d)
        assert cfg["STAGES"] == want and cfg["SPLIT"] == (bq == 64)


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

_BUILD_SCRIPT = r"""
import json, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from vidattn.kernels.sparse_flash_gluon import _gluon_sparse_flash_fwd

SPLIT = __SPLIT__

layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16)
desc = f"tensordesc<bf16[128, 128],{layout!r}>"
ints = ("qperm_h S H HK_GROUP ROW_B ROW_H COL_H NQT NUM_TILES NQB NKB stride_qb stride_qh stride_qs stride_ob "
        "stride_oh stride_os fn_b fn_h fi_b fi_h fi_q pn_b pn_h pi_b pi_h pi_q slot_b slot_h").split()
sig = dict(desc_k=desc, desc_v=desc, Q="*bf16", O="*bf16", LSE="*fp32", FULL_NUM="*i32", FULL_IDX="*i32",
           QPERM="*i32", PART_NUM="*i32", PART_IDX="*i32", BITS="*u8", SLOT="*i64", qk_scale="fp32",
           **{n: "i32" for n in ints})
const = dict(RAGGED=True, Q_PERM=True, RETURN_LSE=True, STAGES=2, SPLIT=SPLIT, PINGPONG=not SPLIT, HAS_PARTIAL=True,
             BLOCK_N=128, BLOCK_D=128, CONSUMER_REGS=240,
             PRODUCER_REGS=24)
sig.update({n: "constexpr" for n in const})
c = triton.compile(GluonASTSource(_gluon_sparse_flash_fwd, sig, const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4})
print(json.dumps(dict(ptx=c.asm["ptx"], num_warps=c.metadata.num_warps, cubin=len(c.asm.get("cubin", b"")))))
"""


@pytest.mark.skipif(gluon_launch.gluon_available() is not None, reason="no usable Gluon Hopper module")
@pytest.mark.parametrize("split", [False, True])
def test_builds_for_sm90(split):
    """Compiled to PTX and a cubin in a fresh process (Gluon kernels do not build under the
    interpreter this suite runs in)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT.replace("__SPLIT__", str(split))], env=env,
                         capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower():
        pytest.skip(f"no CUDA toolchain in this Triton install: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    ptx = built["ptx"]
    assert built["cubin"] > 0
    assert ptx.count("cp.async.bulk.tensor") >= 2  # K and V by TMA
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx  # warpgroup MMAs, register hand-over
    assert "wgmma.wait_group.sync.aligned 1" in ptx  # S of the next tile overlaps P.V of this one
    assert built["num_warps"] == 12  # 4 + 4 consumer warps, 1 load warp padded to a warpgroup


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

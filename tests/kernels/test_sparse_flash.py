"""Fused Triton kernel vs the reference executor (CPU, TRITON_INTERPRET=1)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import vidattn  # noqa: E402
from vidattn import Neighborhood, TokenLayout  # noqa: E402
from vidattn.plan import Rectification  # noqa: E402

pytest.importorskip("triton")
from vidattn.kernels.reference import block_sparse_attention_reference as reference  # noqa: E402
from vidattn.kernels.sparse_flash import block_sparse_attention_triton as triton_attn  # noqa: E402

from kernel_cases import StripeRule, per_head_permuted_plan  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _qkv(B, S, H, Hk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, Hk, D, generator=g)
    v = torch.randn(B, S, Hk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _compare(q, k, v, plan, scale=None):
    out, lse = triton_attn(q, k, v, plan, scale=scale, return_lse=True)
    ref, ref_lse = reference(q.float(), k.float(), v.float(), plan, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[q.dtype], err
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max().item() <= 1e-3


@st.composite
def na_case(draw):
    ndim = draw(st.integers(1, 3))
    k, d, s, c, grid = [], [], [], [], []
    for _ in range(ndim):
        ka, da = draw(st.integers(1, 4)), draw(st.integers(1, 2))
        k.append(ka), d.append(da), s.append(draw(st.integers(1, ka))), c.append(draw(st.booleans()))
        grid.append(draw(st.integers(ka * da, ka * da + (5 if ndim < 3 else 2))))
    if math.prod(grid) > 160:
        grid = [ka * da for ka, da in zip(k, d)]
    return (TokenLayout(tuple(grid), draw(st.integers(0, 3)), draw(st.integers(0, 3))), tuple(k), tuple(d), tuple(s),
            tuple(c), draw(st.sampled_from([16, 32])))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=na_case(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       heads=st.sampled_from([(2, 2), (4, 1), (2, 1)]), D=st.sampled_from([16, 24, 32]), B=st.integers(1, 2))
def test_neighborhood_matches_reference(case, dtype, heads, D, B):
    layout, k, d, s, c, block = case
    plan = Neighborhood(kernel_size=k, dilation=d, stride=s, is_causal=c, block_size=block).plan(layout)
    q, kk, v = _qkv(B, layout.seq_len, heads[0], heads[1], D, dtype, seed=layout.seq_len)
    _compare(q, kk, v, plan)


def test_generic_rule_with_per_head_permutation_and_rect_blocks():
    S, H = 70, 3
    plan = per_head_permuted_plan(StripeRule(), S, H, block_q=16, block_k=32, seed=1)
    q, k, v = _qkv(2, S, H, 1, 16, torch.float32, seed=3)
    _compare(q, k, v, plan, scale=0.2)


def test_rectification_terms_are_fused():
    layout = TokenLayout((4, 5, 6))
    plan = Neighborhood(kernel_size=(3, 3, 3), block_size=16).plan(layout)
    B, H, D = 2, 2, 16
    nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
    g = torch.Generator().manual_seed(5)
    w = torch.randn(B, H, nqb, nkb, generator=g)
    w[w < 0.3] = -math.inf  # some pooled columns absent
    rect = Rectification(kept_log_scale=0.3 * torch.randn(B, H, nqb, nkb, generator=g),
                         pooled_k=torch.randn(B, H, nkb, D, generator=g), pooled_v=torch.randn(B, H, nkb, D, generator=g),
                         pooled_log_weight=w)
    import dataclasses

    plan = dataclasses.replace(plan, rectification=rect)
    q, k, v = _qkv(B, layout.seq_len, H, H, D, torch.float32, seed=7)
    _compare(q, k, v, plan)


def test_dispatcher_runs_triton_and_dense_plan_with_ragged_tail():
    layout = TokenLayout((3, 7), prefix=5)  # 26 tokens, block 16: ragged tail
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 32, torch.float32, seed=9)
    out = vidattn.sparse_attention(q, k, v, vidattn.Dense(block_size=16), layout, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5


def test_unsupported_block_size_falls_back_with_warning():
    layout = TokenLayout((4, 6))
    plan = Neighborhood(kernel_size=3, block_size=24).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, torch.float32, seed=2)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = vidattn.run_plan(q, k, v, plan, backend="triton")
    assert (out - reference(q, k, v, plan)).abs().max() < 1e-5


@pytest.mark.parametrize("tiles,mode", [((16, 16, "0"), "masks"), ((32, 16, "1"), "in_kernel"),
                                        ((16, 32, "1"), "masks"), ((16, 16, "2"), "masks")])
def test_sub_tiles_and_work_ordered_schedule(monkeypatch, tiles, mode):
    """Kernel tiles smaller than the plan blocks (a 32x32 plan block run as 16-row / 16-column
    tiles), heaviest-first program order, both partial-block rule paths, a ragged tail, GQA, and
    q/k/v read in place from non-contiguous [B, S, H, D] views."""
    bm, bn, sched = tiles
    monkeypatch.setenv("VIDATTN_TRITON_BLOCK_M", str(bm))
    monkeypatch.setenv("VIDATTN_TRITON_BLOCK_N", str(bn))
    monkeypatch.setenv("VIDATTN_TRITON_SCHED", sched)
    if mode == "in_kernel":
        monkeypatch.setattr("vidattn.kernels.sparse_flash_tables.MASK_BUDGET_BYTES", 0)
    layout = TokenLayout((3, 6, 7), suffix=3)  # 129 tokens: ragged against 32
    plan = Neighborhood(kernel_size=(3, 3, 5), dilation=(1, 2, 1), block_size=32).plan(layout)
    assert plan.has_partial
    B, H, Hk, D = 1, 2, 1, 32
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, layout.seq_len, 3, H, D, generator=g)
    q = qkv[:, :, 0]  # non-contiguous view, unit last stride
    k = qkv[:, :, 1, :Hk]
    v = qkv[:, :, 2, Hk:]
    _compare(q, k, v, plan)


@pytest.mark.parametrize("tile", [None, (2, 4, 4)])
def test_tensor_descriptor_loads_token_and_head_major(tile):
    """K/V tiles through tensor descriptors (TMA on Hopper): token-major packed qkv views (no plan
    permutation: read in place, tail rows spill into the next batch and must be masked) and
    head-major gathered copies (a tiled token order)."""
    from vidattn.kernels import sparse_flash

    layout = TokenLayout((3, 8, 9), suffix=5)  # 221 tokens, ragged against 32
    pat = vidattn.Dense(block_size=32) if tile is None else Neighborhood(kernel_size=(3, 3, 5), block_size=32,
                                                                       tile_shape=tile)
    plan = pat.plan(layout)
    assert (plan.perm is None) == (tile is None)
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, layout.seq_len, 3, 4, 32, generator=g).to(torch.float16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, 2:]
    assert sparse_flash.kv_descriptor(k, (k.stride(0), k.stride(2), k.stride(1)), 2, 2, layout.seq_len, 32)
    _compare(q, k, v, plan)


def test_unsorted_full_block_lists_with_ragged_tail():
    """Full-block lists in any order (here reversed) with a ragged last key block: the kernel's
    unmasked main loop must never see the ragged block."""
    import dataclasses

    layout = TokenLayout((5, 9))  # 45 tokens, block 16: ragged last block
    plan = vidattn.Dense(block_size=16).plan(layout)
    num = plan.full_kv_num_blocks
    rev = plan.full_kv_indices.flip(-1)
    assert int(num.min()) == rev.shape[-1]  # every list full, so the flip reverses the order
    plan = dataclasses.replace(plan, full_kv_indices=rev.contiguous())
    q, k, v = _qkv(2, layout.seq_len, 2, 2, 16, torch.float16, seed=12)
    _compare(q, k, v, plan)

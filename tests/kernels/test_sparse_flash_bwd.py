"""Triton block-sparse backward vs float64 autograd on the dense masked oracle (CPU, TRITON_INTERPRET=1)."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import vidattn  # noqa: E402
from vidattn import Neighborhood, TokenLayout  # noqa: E402
from vidattn.plan import Rectification, plan_from_rule  # noqa: E402

pytest.importorskip("triton")
from vidattn.kernels import sparse_flash_tables  # noqa: E402
from vidattn.kernels.sparse_flash_autograd import block_sparse_attention_triton_autograd as tri  # noqa: E402
from vidattn.kernels.sparse_flash_bwd import transposed_tables  # noqa: E402
from vidattn.kernels.sparse_flash_kernel import RuleMode  # noqa: E402
from vidattn.kernels.sparse_flash_tables import plan_launch_tables  # noqa: E402
from kernel_cases import StripeRule, per_head_permuted_plan, random_qkv  # noqa: E402
from vidattn_testutils import dense_masked_attention  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

# relative to the largest reference gradient entry
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_qkv = functools.partial(random_qkv, requires_grad=True)  # q, k, v leaves of the gradient checks


def _oracle_grads(q, k, v, plan, dout, scale=None):
    """float64 autograd of dense attention masked by ``plan.token_mask()`` (original token order)."""
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    mask = plan.token_mask()  # [Bp, Hp, S, S]
    out = dense_masked_attention(qd, kd, vd, mask, scale=scale)
    return (out, *torch.autograd.grad(out, (qd, kd, vd), dout.double()))


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _check(q, k, v, plan, scale=None, dtype=torch.float32):
    out = tri(q, k, v, plan, scale=scale)
    assert out.grad_fn is not None
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = _oracle_grads(q, k, v, plan, dout.float(), scale)
    tol = TOL[dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        assert a.dtype == dtype and a.shape == b.shape
        assert _rel(a, b) <= tol, (name, _rel(a, b))


def _plan_case(kind, layout, block):
    if kind == "neighborhood":
        return Neighborhood(kernel_size=(3, 3), block_size=block).plan(layout)
    if kind == "causal-strided":
        return Neighborhood(kernel_size=(3, 4), stride=(1, 2), is_causal=(True, False), block_size=block).plan(layout)
    if kind == "dense":
        return vidattn.Dense(block_size=block).plan(layout)
    raise AssertionError(kind)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["neighborhood", "causal-strided", "dense"]),
       in_kernel_rule=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]),
       heads=st.sampled_from([(2, 2), (2, 1)]), D=st.sampled_from([16, 24]),
       text=st.sampled_from([(0, 0), (3, 0), (2, 5)]))
def test_static_plans_match_float64_oracle(kind, in_kernel_rule, dtype, heads, D, text):
    """Full + partial blocks, both partial-block rule paths (in-kernel neighborhood, per-block
    masks), prefix/suffix text tokens (ragged tails), GQA/MQA, fp32/bf16/fp16, padded head dims."""
    layout = TokenLayout((4, 8), prefix=text[0], suffix=text[1])
    with pytest.MonkeyPatch.context() as mp:
        if in_kernel_rule:
            mp.setattr(sparse_flash_tables, "MASK_BUDGET_BYTES", 0)
        plan = _plan_case(kind, layout, 16)
        q, k, v = _qkv(1, layout.seq_len, heads[0], heads[1], D, dtype, seed=layout.seq_len + D)
        _check(q, k, v, plan, dtype=dtype)


def test_rule_mode_is_what_the_test_asks_for(monkeypatch):
    """The two partial-block paths the sweep above draws are really taken."""
    layout = TokenLayout((5, 8))
    plan = Neighborhood(kernel_size=(3, 3), block_size=16).plan(layout)
    assert int(sparse_flash_tables.plan_launch_tables(plan)["rule_mode"]) == 2
    monkeypatch.setattr(sparse_flash_tables, "MASK_BUDGET_BYTES", 0)
    plan = Neighborhood(kernel_size=(3, 3), block_size=16).plan(layout)
    assert int(sparse_flash_tables.plan_launch_tables(plan)["rule_mode"]) == 1


def test_generic_rule_per_head_permutation_gqa_and_unequal_blocks():
    S, H = 45, 2
    plan = per_head_permuted_plan(StripeRule(), S, H, block_q=16, block_k=32, seed=1)
    q, k, v = _qkv(1, S, H, 1, 16, torch.float32, seed=3)
    _check(q, k, v, plan, scale=0.3)


def test_tile_order_permutation_shared_by_heads():
    layout = TokenLayout((4, 8))
    perm = torch.randperm(layout.seq_len, generator=torch.Generator().manual_seed(2))[None]
    plan = plan_from_rule(Neighborhood(kernel_size=(3, 3)).plan(layout).rule, seq_len=layout.seq_len,
                          block_q=16, block_k=16, num_heads=1, perm=perm)
    assert plan.perm is not None
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, torch.float32, seed=4)
    _check(q, k, v, plan)


def test_transposed_plan_lists_every_block_pair_once():
    layout = TokenLayout((5, 8), prefix=3)
    plan = Neighborhood(kernel_size=(3, 3), block_size=16).plan(layout)
    tt = transposed_tables(plan)
    cls = plan.block_classes()[0, 0]  # [NQB, NKB]
    for name, val in (("tf", 2), ("tp", 1)):
        num, idx = tt[name + "num"][0, 0], tt[name + "idx"][0, 0]
        got = torch.zeros_like(cls, dtype=torch.bool)
        for kb in range(plan.num_k_blocks):
            got[idx[kb, :num[kb]].long(), kb] = True
        assert torch.equal(got, cls == val)
    assert transposed_tables(plan) is tt  # cached per plan


def _oracle_rectified(q, k, v, plan, scale):
    """float64 softmax over the plan's keys (+ kept_log_scale) and its pooled columns (no perm)."""
    B, S, H, D = q.shape
    rect = plan.rectification
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    qb = torch.arange(S) // plan.block_q
    kb = torch.arange(S) // plan.block_k
    s = scale * qh @ kh.transpose(-1, -2)
    if rect.kept_log_scale is not None:
        s = s + rect.kept_log_scale.double()[:, :, qb][:, :, :, kb]
    s = s.masked_fill(~plan.token_mask(), -math.inf)
    sp = scale * qh @ rect.pooled_k.transpose(-1, -2) + rect.pooled_log_weight[:, :, qb]
    p = torch.softmax(torch.cat([s, sp], -1), -1)
    return (p @ torch.cat([vh, rect.pooled_v.expand(B, H, -1, -1)], 2)).transpose(1, 2)


def test_pooled_columns_and_kept_scale_gradients():
    """Fused rectification: dq/dk/dv and the gradients of pooled_k / pooled_v / pooled_log_weight."""
    layout = TokenLayout((4, 10))
    rule = Neighborhood(kernel_size=(3, 3)).plan(layout).rule
    plan = plan_from_rule(rule, seq_len=layout.seq_len, block_q=16, block_k=16)  # natural order (oracle)
    assert plan.perm is None and plan.has_partial
    B, H, D = 1, 2, 16
    nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
    g = torch.Generator().manual_seed(5)
    w = torch.randn(B, H, nqb, nkb, generator=g)
    w[w < 0.0] = -math.inf
    pk, pv = torch.randn(B, H, nkb, D, generator=g), torch.randn(B, H, nkb, D, generator=g)
    kept = 0.3 * torch.randn(B, H, nqb, nkb, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (pk, pv, w)]
    plan = dataclasses.replace(plan, rectification=Rectification(kept, *leaves))
    q, k, v = _qkv(B, layout.seq_len, H, H, D, torch.float32, seed=7)
    out = tri(q, k, v, plan)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v, *leaves), dout)
    dl = [t.detach().double().requires_grad_(True) for t in (q, k, v, pk, pv)]
    wd = w.double().requires_grad_(True)
    rplan = dataclasses.replace(plan, rectification=Rectification(kept.double(), dl[3], dl[4], wd))
    ref_out = _oracle_rectified(*dl[:3], rplan, D ** -0.5)
    ref = torch.autograd.grad(ref_out, (*dl, wd), dout.double())
    assert _rel(out, ref_out) <= 1e-4
    for name, a, b in zip(("dq", "dk", "dv", "dpk", "dpv", "dpw"), got, ref):
        b = torch.nan_to_num(b)
        assert _rel(a, b) <= 1e-4, (name, _rel(a, b))


def test_kept_log_scale_with_grad_is_refused():
    layout = TokenLayout((4, 8))
    plan = vidattn.Dense(block_size=16).plan(layout)
    kept = torch.zeros(1, 1, plan.num_q_blocks, plan.num_k_blocks, requires_grad=True)
    plan = dataclasses.replace(plan, rectification=Rectification(kept_log_scale=kept))
    q, k, v = _qkv(1, layout.seq_len, 1, 1, 16, torch.float32, seed=1)
    from vidattn.errors import TritonUnsupported

    with pytest.raises(TritonUnsupported, match="kept_log_scale"):
        tri(q, k, v, plan)


def test_backward_is_bitwise_deterministic():
    layout = TokenLayout((4, 8), prefix=2)
    plan = Neighborhood(kernel_size=(3, 3), block_size=32).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, 2, 1, 16, torch.float32, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    runs = [torch.autograd.grad(tri(q, k, v, plan), (q, k, v), dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_lse_output_gradient():
    """d/dq of sum(LSE * w) through the triton autograd matches float64 autograd."""
    layout = TokenLayout((4, 8))
    plan = Neighborhood(kernel_size=(3, 3), block_size=16).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, torch.float32, seed=12)
    out, lse = tri(q, k, v, plan, return_lse=True)
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3))
    gq, gk = torch.autograd.grad((lse * w).sum() + out.sum(), (q, k))
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    s = (qd.transpose(1, 2) @ kd.transpose(1, 2).transpose(-1, -2)) * 16 ** -0.5
    s = s.masked_fill(~plan.token_mask()[0], -math.inf)
    lse_d = torch.logsumexp(s, -1)
    out_d = dense_masked_attention(qd, kd, vd, plan.token_mask(), scale=None)
    rq, rk = torch.autograd.grad((lse_d * w.double()).sum() + out_d.sum(), (qd, kd))
    assert _rel(gq, rq) <= 1e-4 and _rel(gk, rk) <= 1e-4


def test_dispatcher_triton_output_is_differentiable():
    """The issue's failing case: sparse_attention(..., backend="triton") with q/k/v requiring grad."""
    layout = TokenLayout((4, 8), prefix=3)
    pat = Neighborhood(kernel_size=(3, 3), block_size=16)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, torch.float32, seed=13)
    out = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton")
    assert out.grad_fn is not None
    gq = torch.autograd.grad(out.square().sum(), q)[0]
    ref = vidattn.sparse_attention(q, k, v, pat, layout, backend="reference")
    rq = torch.autograd.grad(ref.square().sum(), q)[0]
    assert _rel(gq, rq) <= 1e-4


@pytest.mark.parametrize("dense_nongrid", [True, False])
def test_nongrid_token_policy_forward_and_backward(monkeypatch, dense_nongrid):
    """The in-kernel neighborhood rule (forced: no mask budget) with text tokens on both sides:
    with ``dense_nongrid`` text attends / is attended by everything, without it text only sees text
    (forward and gradients vs the float64 oracle)."""
    monkeypatch.setattr(sparse_flash_tables, "MASK_BUDGET_BYTES", 0)
    layout = TokenLayout((4, 8), prefix=3, suffix=2)
    plan = Neighborhood(kernel_size=(3, 3), block_size=16, dense_nongrid=dense_nongrid).plan(layout)
    assert plan_launch_tables(plan)["rule_mode"] == RuleMode.NEIGHBORHOOD
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, torch.float32, seed=11)
    _check(q, k, v, plan)

"""The cpu backend's execution strategy (vidattn.kernels.cpu_gather) against a float64 dense masked
oracle: query super-blocks (query blocks with identical key sets merged into one SDPA query), mixed
FULL / PARTIAL classes inside a super-block, the reused gather buffers, chunking, the per-call
mask path, the LSE from the flash op, gradients; and the one-sum finiteness pre-check."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vidattn
from vidattn import Neighborhood, TokenLayout
from vidattn.kernels import cpu_gather
from vidattn.kernels.cpu_gather import block_sparse_attention_cpu
from vidattn.plan import FULL, PARTIAL, TokenRule, plan_from_block_mask


def oracle(q, k, v, mask, scale):
    """float64 dense masked attention: (out ``[B, S, H, Dv]``, natural-log LSE ``[B, H, S]``);
    ``mask`` bool ``[Bm, Hm, S, S]`` (broadcast over batch / heads); rows with no allowed key give
    output 0 and LSE -inf."""
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    rep = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", qh, kh) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, vh).transpose(1, 2), lse


class _ModRule(TokenRule):
    """Per-head token rule for PARTIAL blocks (allows about 2/3 of the pairs, the diagonal always)."""

    def __call__(self, h, q_idx, k_idx):
        return ((q_idx * 3 + k_idx + h) % 3 != 0) | (q_idx == k_idx)


def _qkv(B, S, H, Hk, D, seed, dtype=torch.float32, Dv=None):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g, dtype=dtype), torch.randn(B, S, Hk, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hk, Dv or D, generator=g, dtype=dtype))


class _BandRule(TokenRule):
    """Head-independent rule for PARTIAL blocks (a band): heads of a head-shared plan share masks."""

    def __call__(self, h, q_idx, k_idx):
        return (q_idx - k_idx).abs() <= 5


def _merging_plan(S, H, bq, bk, seed, batch=1, perm_heads=0, distinct=3, rule=None):
    """Random plan ``[batch, H]`` (1 = shared) whose query blocks draw their kept key-block sets
    from only ``distinct`` sets per (batch, head), with FULL / PARTIAL chosen per block
    independently: super-blocks form, and mix both classes. The first query block keeps nothing
    (its rows must give 0 / LSE -inf)."""
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-S // bq), -(-S // bk)
    sets = torch.rand(batch, H, distinct, nkb, generator=g) < 0.5
    pick = torch.randint(0, distinct, (batch, H, nqb), generator=g)
    kept = torch.gather(sets, 2, pick[..., None].expand(batch, H, nqb, nkb))
    cls = torch.where(torch.rand(batch, H, nqb, nkb, generator=g) < 0.4, FULL, PARTIAL).to(torch.int8)
    cls = torch.where(kept, cls, torch.zeros_like(cls))
    cls[..., 0, :] = 0
    perm = torch.stack([torch.randperm(S, generator=g) for _ in range(perm_heads)]) if perm_heads else None
    return plan_from_block_mask(cls, seq_len=S, block_q=bq, block_k=bk, rule=rule or _ModRule(), perm=perm,
                                token_density=0.5)


def token_mask(plan, H):
    """Bool ``[Bp, H, S, S]`` in original token order, the rule evaluated at every one of the ``H``
    heads (a head-shared plan's rule may still depend on the head)."""
    S, dev = plan.seq_len, plan.device
    cls = plan.block_classes()
    tok = cls[:, :, torch.arange(S) // plan.block_q][:, :, :, torch.arange(S) // plan.block_k]  # plan order
    perm = plan.perm if plan.perm is not None else torch.arange(S)[None]
    out = torch.zeros(cls.shape[0], H, S, S, dtype=torch.bool)
    for h in range(H):
        hp = h if cls.shape[1] > 1 else 0
        ph = perm[h if perm.shape[0] > 1 else 0]
        rule = plan.rule(torch.tensor(h), ph[:, None], ph[None, :])
        allowed = (tok[:, hp] == FULL) | ((tok[:, hp] == PARTIAL) & rule)
        out[:, h][:, ph[:, None], ph[None, :]] = allowed  # plan position (i, j) -> tokens (ph[i], ph[j])
    return out


def _check(q, k, v, plan, scale=0.3, tol=2e-5):
    out, lse = block_sparse_attention_cpu(q, k, v, plan, scale=scale, return_lse=True)
    ref, ref_lse = oracle(q, k, v, token_mask(plan, q.shape[2]), scale)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # no allowed key: -inf, exactly there
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin].double(), ref_lse[fin], atol=tol, rtol=tol)
    assert bool((out[torch.isinf(lse).transpose(1, 2)] == 0).all())
    return out


def test_super_blocks_merge_identical_key_sets_and_match_oracle(monkeypatch):
    monkeypatch.setattr(cpu_gather, "QUERY_ROWS", 32)  # at most 4 query blocks of 8 per super-block
    plan = _merging_plan(S=90, H=2, bq=8, bk=16, seed=1)
    groups = cpu_gather._super_blocks(plan, 32)
    assert max(g["r"] for g in groups) == 4
    mixed = [g for g in groups if g["r"] > 1 and bool(((g["cls"] == FULL).any(1) & (g["cls"] == PARTIAL).any(1)).any())]
    assert mixed, "a super-block whose query blocks see one key block as FULL and PARTIAL"
    q, k, v = _qkv(1, 90, 2, 2, 16, seed=2)
    _check(q, k, v, plan)


def test_neighborhood_plans_merge_on_the_cpu_path():
    """A 3-D window spanning the clip in T: query tiles of one spatial position share their key set."""
    lay = TokenLayout((8, 6, 6), prefix=2)
    pat = Neighborhood(kernel_size=(7, 3, 3), block_size=16)
    plan = pat.plan(lay, num_heads=2)
    assert max(g["r"] for g in cpu_gather._super_blocks(plan, 768)) > 1
    q, k, v = _qkv(2, lay.seq_len, 2, 1, 16, seed=4)
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="cpu")
    ref, _ = oracle(q, k, v, pat.mask(lay, num_heads=2)[None], 16 ** -0.5)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@settings(max_examples=12, deadline=None)
@given(S=st.integers(9, 70), H=st.sampled_from([1, 2, 4]), kv_div=st.sampled_from([1, 2]),
       bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 8, 16]), batch=st.sampled_from([1, 2]),
       shared=st.sampled_from(["none", "batch", "heads", "both"]), perm_heads=st.sampled_from([0, 1, -1]),
       band=st.booleans(), rows=st.sampled_from([1, 16, 64]), distinct=st.integers(1, 4),
       seed=st.integers(0, 10 ** 6))
def test_cpu_path_sweep_matches_oracle(S, H, kv_div, bq, bk, batch, shared, perm_heads, band, rows, distinct, seed):
    Hk = max(1, H // kv_div)
    Bp = 1 if shared in ("batch", "both") else batch
    Hp = 1 if shared in ("heads", "both") else H
    ph = Hp if perm_heads < 0 else perm_heads  # per-head orders only on per-head plans
    plan = _merging_plan(S, Hp, bq, bk, seed, batch=Bp, perm_heads=ph, distinct=distinct,
                         rule=_BandRule() if band else None)
    q, k, v = _qkv(batch, S, H, Hk, 8, seed + 1, Dv=12)
    old = cpu_gather.QUERY_ROWS
    cpu_gather.QUERY_ROWS = rows
    try:
        _check(q, k, v, plan)
    finally:
        cpu_gather.QUERY_ROWS = old


@pytest.mark.parametrize("band", [True, False])
def test_head_shared_plans_store_one_mask_per_super_block_when_heads_agree(band):
    plan = _merging_plan(S=64, H=1, bq=8, bk=8, seed=15, rule=_BandRule() if band else None)
    H = 4
    units = [u for u in cpu_gather._groups(plan, 2, H, H, 2 * 16 * 4, torch.float32) if u["masked"]]
    n_masks = sum(u["add"].shape[1] for u in units)
    n_sb = sum(g["bp"].numel() for g in cpu_gather._super_blocks(plan, cpu_gather.QUERY_ROWS) if g["masked"])
    assert n_masks == (n_sb if band else n_sb * H)  # the head-dependent rule keeps one per head
    assert all(c["rep"] == (2 * H if band else 2) for u in units for c in u["calls"])  # batch always shares
    q, k, v = _qkv(2, 64, H, 2, 16, seed=16)
    _check(q, k, v, plan)


def test_chunking_and_per_call_masks_give_the_same_result(monkeypatch):
    plan = _merging_plan(S=64, H=2, bq=8, bk=8, seed=7, batch=2)
    q, k, v = _qkv(2, 64, 2, 2, 16, seed=8)
    base = _check(q, k, v, plan)
    monkeypatch.setattr(cpu_gather, "CHUNK_BYTES", 1)  # one super-block per SDPA call
    monkeypatch.setattr(cpu_gather, "MASK_BUDGET_BYTES", 0)  # masks built per call
    assert all(g["add"] is None for g in cpu_gather._groups(plan, 2, 2, 2, 2 * 16 * 4, torch.float32) if g["masked"])
    torch.testing.assert_close(_check(q, k, v, plan), base, atol=1e-6, rtol=1e-6)


def test_results_do_not_alias_the_reused_buffers():
    plan = _merging_plan(S=48, H=2, bq=8, bk=8, seed=9)
    q1, k1, v1 = _qkv(1, 48, 2, 2, 16, seed=10)
    out1, lse1 = block_sparse_attention_cpu(q1, k1, v1, plan, return_lse=True)
    keep = out1.clone(), lse1.clone()
    q2, k2, v2 = _qkv(1, 48, 2, 2, 16, seed=11)
    block_sparse_attention_cpu(q2, k2, v2, plan, return_lse=True)
    assert torch.equal(out1, keep[0]) and torch.equal(lse1, keep[1])


def test_gradients_match_the_float64_oracle():
    plan = _merging_plan(S=40, H=2, bq=8, bk=8, seed=12)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 40, 2, 1, 8, seed=13))
    out, lse = block_sparse_attention_cpu(q, k, v, plan, scale=0.5, return_lse=True)
    w = torch.randn_like(out)
    fin = torch.isfinite(lse)
    (out * w).sum().backward(inputs=[q, k, v])
    grads = [t.grad.clone() for t in (q, k, v)]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = oracle(qd, kd, vd, token_mask(plan, 2), 0.5)
    (ref * w.double()).sum().backward()
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # the LSE is differentiable too (context-parallel merges use it)
    qd2 = q.detach().clone().requires_grad_()
    _, lse2 = block_sparse_attention_cpu(qd2, k.detach(), v.detach(), plan, scale=0.5, return_lse=True)
    lse2[fin].sum().backward()
    qo = q.detach().double().requires_grad_()
    _, ref_lse = oracle(qo, k.detach(), v.detach(), token_mask(plan, 2), 0.5)
    ref_lse[fin].sum().backward()
    torch.testing.assert_close(qd2.grad.double(), qo.grad, atol=1e-5, rtol=1e-5)


def test_overflowing_finite_inputs_take_the_exact_path_and_stay_finite():
    """The finiteness pre-check sums each tensor: finite values whose sum overflows are not
    non-finite; the call still returns the finite, exact result."""
    lay = TokenLayout((4, 8))
    pat = Neighborhood(kernel_size=(3, 3))
    q, k, v = _qkv(1, 32, 2, 2, 8, seed=14)
    v = v.clone()
    v[0, :, :, 0] = 1e37  # 64 of them: the sum overflows to inf, every entry is finite
    assert not vidattn.attention._all_finite(q, k, v)  # so the per-entry path runs
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="cpu")
    assert bool(torch.isfinite(out).all())
    ref, _ = oracle(q, k, v, pat.mask(lay)[None], 8 ** -0.5)
    torch.testing.assert_close(out.double() / 1e37, ref / 1e37, atol=1e-5, rtol=1e-5)
    v[0, 3, 1, 2] = math.nan  # a real NaN is still found
    assert not vidattn.attention._all_finite(q, k, v)
    assert vidattn.attention._all_finite(q.half(), k.bfloat16(), k.double())


def test_calls_under_inference_mode_and_outside_it_in_either_order():
    # a work buffer allocated under torch.inference_mode is an inference tensor: a later call
    # outside inference mode must not write into it (RuntimeError before the fix)
    plan = _merging_plan(256, 2, 32, 32, seed=5)
    q, k, v = _qkv(1, 256, 2, 2, 16, seed=5)
    cpu_gather._work.__dict__.clear()
    with torch.inference_mode():
        a = block_sparse_attention_cpu(q, k, v, plan, scale=0.3)
    b = block_sparse_attention_cpu(q, k, v, plan, scale=0.3)
    with torch.inference_mode():
        c = block_sparse_attention_cpu(q, k, v, plan, scale=0.3)
    assert torch.equal(a, b) and torch.equal(b, c)
    _check(q, k, v, plan)

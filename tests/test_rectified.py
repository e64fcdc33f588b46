"""RectifiedSparse: dense limit, selection vs a hand-written pooled selection, rectification
terms vs their formulas, error reduction on decaying attention, determinism, pooling."""

import math

import pytest
import torch

import vidattn
from vidattn import TokenLayout
from vidattn.kernels.pooling import block_counts, block_mean_pool, block_moments
from vidattn.patterns.rectified import RectifiedSparse, select_blocks

from vidattn_testutils import dense_masked_attention


def pooled_by_loops(x, block):
    """[B, S, H, D] -> (mean, var) [B, H, NB, D] with explicit per-block loops."""
    B, S, H, D = x.shape
    means, vars_ = [], []
    for s0 in range(0, S, block):
        chunk = x[:, s0:s0 + block].double()
        means.append(chunk.mean(1))
        vars_.append(chunk.var(1, unbiased=False))
    return torch.stack(means, 2), torch.stack(vars_, 2)


def decaying_qkv(S, H, D, gen, amp=1.5, B=1):
    """Q/K with smooth positional features (attention decays with |i - j|), smooth V."""
    pos = torch.arange(S).float()
    fr = torch.arange(1, D // 2 + 1).float() * 0.01
    f = torch.cat([torch.cos(pos[:, None] * fr), torch.sin(pos[:, None] * fr)], -1) * amp
    q = f[None, :, None, :].expand(B, S, H, D) + 0.2 * torch.randn(B, S, H, D, generator=gen)
    k = f[None, :, None, :].expand(B, S, H, D) + 0.2 * torch.randn(B, S, H, D, generator=gen)
    v = torch.sin(pos / 40)[None, :, None, None] * torch.linspace(0.5, 1.5, D) + 0.1 * torch.randn(B, S, H, D, generator=gen)
    return q.contiguous(), k.contiguous(), v.contiguous()


def test_pooling_matches_loops(rng):
    x = torch.randn(2, 37, 3, 5, generator=rng)
    mean, var = block_moments(x, 8)
    m2, v2 = pooled_by_loops(x, 8)
    torch.testing.assert_close(mean.double(), m2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var.double(), v2, atol=1e-6, rtol=1e-6)
    assert block_counts(37, 8).tolist() == [8, 8, 8, 8, 5]
    perm = torch.stack([torch.randperm(37, generator=rng) for _ in range(3)])
    pm = block_mean_pool(x, 8, perm=perm)
    for h in range(3):
        ref, _ = pooled_by_loops(x[:, perm[h], h:h + 1], 8)
        torch.testing.assert_close(pm[:, h:h + 1].double(), ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="x must be"):
        block_mean_pool(torch.randn(3, 4), 2)


@pytest.mark.parametrize("prefix,suffix", [(0, 0), (5, 3)])
def test_keep_all_unrectified_equals_dense(rng, prefix, suffix):
    lay = TokenLayout((3, 4, 5), prefix=prefix, suffix=suffix)
    S = lay.seq_len
    q, k, v = (torch.randn(2, S, 2, 8, generator=rng) for _ in range(3))
    pat = RectifiedSparse(keep=1.0, rectify=False, block_size=16)
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    ref = dense_masked_attention(q, k, v, torch.ones(1, S, S, dtype=torch.bool))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    plan = pat.plan(lay, q, k)
    assert plan.token_density == pytest.approx(1.0) and plan.block_density == pytest.approx(1.0)


def test_selection_matches_handwritten(rng):
    lay = TokenLayout((64,))
    S, H, D, bs = 64, 2, 8, 8
    q, k = (torch.randn(2, S, H, D, generator=rng) for _ in range(2))
    qp, _ = pooled_by_loops(q, bs)
    kp, _ = pooled_by_loops(k, bs)
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", qp, kp) * D ** -0.5 + math.log(bs), -1)
    for keep, mass in ((0.25, None), (0.5, None), (0.25, 0.6)):
        plan = RectifiedSparse(keep=keep, mass=mass, rectify=False, block_size=bs, keep_diagonal=False).plan(lay, q, k)
        got = plan.block_classes() > 0
        want = torch.zeros_like(got)
        for b in range(2):
            for h in range(H):
                for i in range(8):
                    order = sorted(range(8), key=lambda j: (-probs[b, h, i, j].item(), j))
                    if mass is None:
                        chosen = order[:math.ceil(keep * 8)]
                    else:
                        chosen, acc = [], 0.0
                        for j in order:
                            if acc >= mass:
                                break
                            chosen.append(j)
                            acc += probs[b, h, i, j].item()
                    want[b, h, i, chosen] = True
        assert torch.equal(got, want), (keep, mass)
        assert plan.plan_batch == 2 and plan.plan_heads == H
        assert plan.token_density == pytest.approx(got.float().mean().item())
    sel = select_blocks(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), keep=0.5, mass=None)
    assert sel.tolist() == [[True, True, False, False]]


def test_rectification_lowers_error_on_decaying_attention(capsys):
    gen = torch.Generator().manual_seed(0)
    lay = TokenLayout((4, 8, 8))
    S, H, D = lay.seq_len, 2, 16
    q, k, v = decaying_qkv(S, H, D, gen)
    ref = dense_masked_attention(q, k, v, torch.ones(1, S, S, dtype=torch.bool))
    for keep in (0.125, 0.25):
        errs = {}
        for rect in (False, True):
            pat = RectifiedSparse(keep=keep, rectify=rect, block_size=16)
            out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
            errs[rect] = float((out.double() - ref).norm() / ref.norm())
        plan_r = RectifiedSparse(keep=keep, rectify=True, block_size=16).plan(lay, q, k, v=v)
        plan_u = RectifiedSparse(keep=keep, rectify=False, block_size=16).plan(lay, q, k, v=v)
        assert torch.equal(plan_r.block_classes(), plan_u.block_classes())  # same selection
        print(f"keep={keep}: rel. error vs dense unrectified={errs[False]:.4f} rectified={errs[True]:.4f} "
              f"pooled columns={plan_r.meta['pooled_columns']:.3f}")
        assert errs[True] < 0.5 * errs[False]


def test_rectification_terms_follow_formulas():
    gen = torch.Generator().manual_seed(4)
    lay = TokenLayout((64,))
    S, H, D, bs = 64, 1, 8, 8
    q, k, v = decaying_qkv(S, H, D, gen, amp=1.0)
    pat = RectifiedSparse(keep=0.25, rectify=True, block_size=bs)
    plan = pat.plan(lay, q, k, v=v)
    r = plan.rectification
    qp, _ = pooled_by_loops(q, bs)
    kp, kvar = pooled_by_loops(k, bs)
    vp, vvar = pooled_by_loops(v, bs)
    torch.testing.assert_close(r.pooled_k.double(), kp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.pooled_v.double(), vp, atol=1e-5, rtol=1e-5)
    kept = plan.block_classes()[0, 0] > 0
    s = D ** -0.5
    logits = s * qp[0, 0] @ kp[0, 0].T + math.log(bs)
    g = (0.5 * s * s * (qp[0, 0] ** 2) @ kvar[0, 0].T).clamp(0, 4)
    pref = torch.softmax(logits + g, -1)
    pw = r.pooled_log_weight[0, 0].double()
    for i in range(8):
        w = pref[i] * kept[i]
        vbar = (w[:, None] * vp[0, 0]).sum(0) / w.sum()
        for j in range(8):
            gain = ((vp[0, 0, j] - vbar) ** 2).mean().sqrt()
            err = vvar[0, 0, j].sqrt().pow(2).mean().sqrt() * math.sqrt(math.expm1(2 * g[i, j].item()))
            want_col = (not kept[i, j]) and gain.item() > err
            assert bool(torch.isfinite(pw[i, j])) == want_col, (i, j)
            if want_col:
                assert pw[i, j].item() == pytest.approx(math.log(bs) + g[i, j].item(), abs=1e-4)
    # execution = one softmax over kept tokens plus pooled columns (explicit S x (S + NKB) logits)
    out = vidattn.run_plan(q, k, v, plan, backend="reference")
    qd, kd, vd = q[0, :, 0].double(), k[0, :, 0].double(), v[0, :, 0].double()
    tok = torch.where(kept.repeat_interleave(bs, 0).repeat_interleave(bs, 1), s * qd @ kd.T, -math.inf)
    col = s * qd @ r.pooled_k[0, 0].double().T + pw.repeat_interleave(bs, 0)
    p = torch.softmax(torch.cat([tok, col], 1), 1)
    want = p @ torch.cat([vd, r.pooled_v[0, 0].double()], 0)
    torch.testing.assert_close(out[0, :, 0].double(), want, atol=1e-5, rtol=1e-5)


def test_deterministic_gqa_text_and_errors(rng):
    lay = TokenLayout((4, 4, 4), prefix=3)
    S = lay.seq_len
    q = torch.randn(2, S, 4, 8, generator=rng)
    k, v = (torch.randn(2, S, 2, 8, generator=rng) for _ in range(2))
    pat = RectifiedSparse(keep=0.3, block_size=8)
    a, b = pat.plan(lay, q, k, v=v), pat.plan(lay, q.clone(), k.clone(), v=v.clone())
    assert torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.full_kv_indices, b.full_kv_indices)
    assert torch.equal(a.rectification.pooled_log_weight, b.rectification.pooled_log_weight)
    cls = a.block_classes()
    assert bool((cls[:, :, 0] > 0).all()) and bool((cls[:, :, :, 0] > 0).all())  # text block dense both ways
    assert bool((torch.diagonal(cls, dim1=2, dim2=3) > 0).all())
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert pat.is_dynamic
    with pytest.raises(ValueError, match="keep"):
        RectifiedSparse(keep=0)
    with pytest.raises(ValueError, match="mass"):
        RectifiedSparse(mass=1.5)
    with pytest.raises(ValueError, match="needs q"):
        pat.plan(lay)
    with pytest.raises(ValueError, match="q length"):
        pat.plan(TokenLayout((10,)), q, k)

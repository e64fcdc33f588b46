"""PermutedGrid: head classification on synthetic heads, plan/mask consistency, block density,
permutation round-trips, determinism and caching."""

import pytest
import torch

import vidattn
from vidattn import TokenLayout, invert_permutation
from vidattn.patterns.grid import PermutedGrid

from vidattn_testutils import dense_masked_attention

T, HH, WW = 8, 4, 4
TPF, N = HH * WW, T * HH * WW


def _unit(n, d, gen):
    x = torch.randn(n, d, generator=gen)
    return x / x.norm(dim=-1, keepdim=True)


def synthetic_qk(layout, gen, D=32, c=8.0, grid_stride=4, grid_phase=1):
    """Heads built to be: 0 spatial-only (same frame), 1 temporal-only (same position),
    2 grid (all queries look at keys with g % stride == phase), 3 unstructured (dense)."""
    S, P = layout.seq_len, layout.prefix
    g = torch.arange(N)
    f, p = g // TPF, g % TPF
    q = torch.zeros(2, S, 4, D)
    k = torch.zeros(2, S, 4, D)
    ef, ep, u = _unit(T, D, gen), _unit(TPF, D, gen), _unit(1, D, gen)[0]
    sl = slice(P, P + N)
    q[:, sl, 0], k[:, sl, 0] = c * ef[f], c * ef[f]
    q[:, sl, 1], k[:, sl, 1] = c * ep[p], c * ep[p]
    q[:, sl, 2] = c * u
    k[:, sl, 2] = c * u * ((g % grid_stride) == grid_phase).float()[:, None]
    q[:, :, 3] = torch.randn(2, S, D, generator=gen)
    k[:, :, 3] = torch.randn(2, S, D, generator=gen)
    return q, k


def handwritten_mask(layout, name, stride=1, phase=0, spatial_frames=1):
    """Token mask of one candidate from its definition, by explicit coordinates."""
    S, P = layout.seq_len, layout.prefix
    m = torch.ones(S, S, dtype=torch.bool)
    g = torch.arange(N)
    f, p = g // TPF, g % TPF
    if name == "spatial":
        sub = (f[:, None] - f[None, :]).abs() <= spatial_frames
    elif name == "temporal":
        sub = p[:, None] == p[None, :]
    elif name == "grid":
        sub = ((g[None, :] % stride) == phase) | ((g[:, None] % stride) == phase)
    else:
        sub = torch.ones(N, N, dtype=torch.bool)
    m[P:P + N, P:P + N] = sub
    return m


@pytest.mark.parametrize("prefix,suffix", [(0, 0), (3, 5)])
def test_profiler_picks_each_head_and_outputs_match(prefix, suffix):
    gen = torch.Generator().manual_seed(0)
    lay = TokenLayout((T, HH, WW), prefix=prefix, suffix=suffix)
    q, k = synthetic_qk(lay, gen)
    v = torch.randn(q.shape, generator=gen)
    pat = PermutedGrid(block_size=8)
    plan = pat.plan(lay, q, k)
    assert plan.meta["head_patterns"] == ["spatial", "temporal", "grid(stride=4,phase=1)", "dense"]
    assert all(r >= 0.9 for r in plan.meta["head_recalls"])
    masks = torch.stack([handwritten_mask(lay, "spatial"), handwritten_mask(lay, "temporal"),
                         handwritten_mask(lay, "grid", 4, 1), handwritten_mask(lay, "dense")])
    assert torch.equal(plan.token_mask()[0], masks)
    assert plan.token_density == pytest.approx(masks.float().mean().item())
    assert plan.perm.shape == (4, lay.seq_len)
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    ref = dense_masked_attention(q, k, v, masks)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def test_block_density_close_to_token_density():
    gen = torch.Generator().manual_seed(1)
    lay = TokenLayout((T, HH, WW))
    q, k = synthetic_qk(lay, gen)
    plan = PermutedGrid(block_size=8).plan(lay, q, k)
    # per sparse head, in its permuted order
    cls = plan.block_classes()[0]
    for h in range(3):
        bd = float((cls[h] > 0).float().mean())
        td = plan.meta["head_densities"][h]
        assert td <= bd + 1e-9 and bd <= 1.25 * td, (h, bd, td)
    assert plan.block_density <= 1.25 * plan.token_density


def test_permutations_round_trip():
    lay = TokenLayout((T, HH, WW), prefix=2, suffix=3)
    pat = PermutedGrid(block_size=8)
    x = torch.randn(1, lay.seq_len, 1, 4)
    for kind, st, ph in ((1, 1, 0), (2, 1, 0), (3, 4, 1), (3, 16, 5), (0, 1, 0)):
        perm = pat.head_permutation(lay, kind, st, ph)
        assert torch.equal(torch.sort(perm).values, torch.arange(lay.seq_len))
        inv = invert_permutation(perm)
        assert torch.equal(perm[inv], torch.arange(lay.seq_len))
        assert torch.equal(x.index_select(1, perm).index_select(1, inv), x)
        # prefix/suffix stay in place
        assert torch.equal(perm[:2], torch.arange(2)) and torch.equal(perm[-3:], torch.arange(lay.seq_len - 3, lay.seq_len))
    # temporal order is position-major: consecutive tokens share the spatial position
    perm = pat.head_permutation(lay, 2, 1, 0)
    gpos = (perm[2:2 + N] - 2) % TPF
    assert torch.equal(gpos.view(TPF, T), torch.arange(TPF)[:, None].expand(TPF, T))


def test_deterministic_and_profile_cache():
    gen = torch.Generator().manual_seed(2)
    lay = TokenLayout((T, HH, WW))
    q, k = synthetic_qk(lay, gen)
    p1 = PermutedGrid(block_size=8).plan(lay, q, k)
    p2 = PermutedGrid(block_size=8).plan(lay, q.clone(), k.clone())
    assert p1.meta["head_patterns"] == p2.meta["head_patterns"]
    assert torch.equal(p1.block_classes(), p2.block_classes()) and torch.equal(p1.perm, p2.perm)
    # profile_every=2: the second call reuses the classification even if Q/K change
    pat = PermutedGrid(block_size=8, profile_every=2)
    a = pat.plan(lay, q, k)
    b = pat.plan(lay, torch.randn_like(q), torch.randn_like(k))
    assert b is a
    c = pat.plan(lay, torch.randn_like(q), torch.randn_like(k))
    assert c.meta["head_patterns"] == ["dense"] * 4  # random heads: nothing sparse recalls 90%


def test_gqa_and_errors():
    gen = torch.Generator().manual_seed(3)
    lay = TokenLayout((T, HH, WW))
    q, k = synthetic_qk(lay, gen)
    # MQA: one K head = head 0's (spatial) keys; all query heads see frame-structured keys
    kk = k[:, :, :1].contiguous()
    qq = q[:, :, :1].expand(-1, -1, 2, -1).contiguous()
    v = torch.randn(2, lay.seq_len, 1, 32, generator=gen)
    pat = PermutedGrid(block_size=8)
    plan = pat.plan(lay, qq, kk)
    assert plan.meta["head_patterns"] == ["spatial", "spatial"]
    out = vidattn.sparse_attention(qq, kk, v, pat, lay, backend="reference")
    m = handwritten_mask(lay, "spatial")[None]
    torch.testing.assert_close(out.double(), dense_masked_attention(qq, kk, v, m), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="T, H, W"):
        pat.plan(TokenLayout((16, 8)), torch.randn(1, 128, 1, 8), torch.randn(1, 128, 1, 8))
    with pytest.raises(ValueError, match="dynamic"):
        pat.plan(lay)
    with pytest.raises(ValueError, match="recall"):
        PermutedGrid(recall=0)
    with pytest.raises(ValueError, match="grid_strides"):
        PermutedGrid(grid_strides=(1,))
    with pytest.raises(TypeError):
        pat.mask(lay)

"""Radial attention: against a hand-written implementation of the paper's definition, plan
consistency, density decay, text tokens, and SDPA equality."""

import pytest
import torch

import vidattn
from vidattn import TokenLayout
from vidattn.patterns.radial import Radial

from vidattn_testutils import dense_masked_attention


def paper_radial_mask(T, tpf, block, decay, sink_frames, dense_near, prefix=0, suffix=0):
    """Independent token-level radial mask, frame pair by frame pair, straight from the
    definition (Li et al. 2025, get_window_width / get_diagonal_split_mask)."""
    N = T * tpf
    S = prefix + N + suffix
    m = torch.ones(S, S, dtype=torch.bool)
    r = torch.arange(tpf)[:, None]
    c = torch.arange(tpf)[None, :]
    for i in range(T):
        for j in range(T):
            d = abs(i - j)
            if j < sink_frames:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                if d == 0 or d <= dense_near:
                    width = tpf
                elif d == 1 and dense_near == 0:
                    width = tpf // 2
                else:
                    width = max(2 ** tpf.bit_length() / 2 ** d.bit_length() * decay, block)
                local = (r - c).abs() <= width
                dl = 2 ** tpf.bit_length() / 2 ** d.bit_length()
                if dl < block and d % int(block / dl) != 0:
                    local = torch.zeros(tpf, tpf, dtype=torch.bool)
            m[prefix + i * tpf: prefix + (i + 1) * tpf, prefix + j * tpf: prefix + (j + 1) * tpf] = local
    return m


CASES = [
    # (grid, block, decay, sink, dense_near, prefix, suffix)
    ((6, 4, 8), 4, 0.2, 1, 0, 0, 0),      # Wan-style
    ((9, 4, 4), 4, 1.0, 1, 0, 5, 0),      # Wan-style, text first
    ((7, 6, 6), 8, 0.95, 0, 1, 0, 7),     # HunyuanVideo-style, text last
    ((12, 2, 8), 2, 0.5, 2, 0, 3, 2),     # two sink frames, text both sides
    ((5, 3, 5), 16, 0.2, 1, 0, 0, 0),     # tpf < block: frequency reduction drops frames
    ((6, 2, 3), 16, 0.95, 0, 1, 2, 0),    # tpf < block with dense_near: reduction even at d = 1
]


@pytest.mark.parametrize("grid,block,decay,sink,near,prefix,suffix", CASES)
def test_matches_paper_definition_and_plan(grid, block, decay, sink, near, prefix, suffix):
    pat = Radial(decay_factor=decay, sink_frames=sink, dense_near_frames=near, block_size=block)
    lay = TokenLayout(grid, prefix=prefix, suffix=suffix)
    T, H, W = grid
    want = paper_radial_mask(T, H * W, block, decay, sink, near, prefix, suffix)
    got = pat.mask(lay)
    assert got.shape == (1, lay.seq_len, lay.seq_len)
    assert torch.equal(got[0], want)
    plan = pat.plan(lay)
    assert torch.equal(plan.token_mask()[0, 0], want)
    assert plan.token_density == pytest.approx(want.float().mean().item())
    assert plan.token_density <= plan.block_density <= 1.0
    # same-frame attention always full, text dense both ways
    for f in range(T):
        sl = slice(prefix + f * H * W, prefix + (f + 1) * H * W)
        assert bool(got[0, sl, sl].all())
    g = lay.grid_slice
    assert bool(got[0, :g.start].all()) and bool(got[0, :, :g.start].all())
    assert bool(got[0, g.stop:].all()) and bool(got[0, :, g.stop:].all())


def test_density_falls_per_frame_doubling():
    # O(log n / n): each doubling of the frame count cuts density by >= 20% (tpf / block = 8 or 9,
    # as in the paper's regime where a frame spans many blocks)
    for hw, block, frames in (((8, 8), 8, (2, 4, 8, 16)), ((4, 8), 4, (2, 4, 8, 16, 32)), ((6, 6), 4, (2, 4, 8, 16, 32))):
        dens = []
        for T in frames:
            lay = TokenLayout((T,) + hw, suffix=0)
            plan = Radial(block_size=block).plan(lay)
            dens.append(plan.token_density)
            assert plan.block_density >= plan.token_density
        drops = [1 - b / a for a, b in zip(dens, dens[1:])]
        assert all(dr >= 0.2 for dr in drops), (hw, block, dens, drops)


def test_reference_backend_equals_sdpa_with_mask(rng):
    lay = TokenLayout((6, 4, 4), prefix=4, suffix=3)
    pat = Radial(block_size=8, decay_factor=0.5)
    S, Hd, D = lay.seq_len, 3, 16
    q, k, v = (torch.randn(2, S, Hd, D, generator=rng) for _ in range(3))
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    ref = dense_masked_attention(q, k, v, pat.mask(lay, num_heads=Hd))
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    # GQA
    out_g = vidattn.sparse_attention(q, k[:, :, :1], v[:, :, :1], pat, lay, backend="reference")
    ref_g = dense_masked_attention(q, k[:, :, :1], v[:, :, :1], pat.mask(lay))
    torch.testing.assert_close(out_g.double(), ref_g, atol=2e-5, rtol=1e-5)


def test_defaults_and_errors():
    p = vidattn.Radial()
    assert (p.block_size, p.decay_factor, p.sink_frames, p.dense_near_frames) == (128, 0.2, 1, 0)
    assert p.needs_frames and not p.is_dynamic
    with pytest.raises(ValueError, match="T, H, W"):
        p.validate(TokenLayout((16, 16)))
    with pytest.raises(ValueError, match="T, H, W"):
        p.mask(TokenLayout((64,)))
    with pytest.raises(ValueError, match="decay_factor"):
        Radial(decay_factor=0)
    with pytest.raises(ValueError, match="block_size"):
        Radial(block_size=0)
    with pytest.raises(ValueError, match="sink_frames"):
        Radial(sink_frames=-1)
    q = torch.randn(1, 16, 1, 8)
    with pytest.raises(ValueError, match="T, H, W"):
        vidattn.sparse_attention(q, q, q, p, TokenLayout((4, 4)), backend="reference")


def test_plan_is_cached_and_rule_hashable():
    p = Radial(block_size=8)
    lay = TokenLayout((4, 4, 4))
    assert p.plan(lay) is p.plan(lay)
    assert hash(p.rule(lay).cache_key()) == hash(p.rule(lay).cache_key())


def test_rule_arithmetic_matches_distance_tables():
    """The gather-free in-kernel arithmetic of RadialRule equals radial_tables at every distance."""
    from vidattn.patterns.radial import RadialRule, radial_tables

    for tpf in (5, 16, 60, 100, 1560):
        for B in (4, 16, 128):
            for decay in (0.2, 0.95, 1.0, 0.5):
                for near in (0, 1):
                    T = 40
                    widths, keeps = radial_tables(T, tpf, B, decay, near)
                    rule = RadialRule(prefix=0, num_frames=T, tokens_per_frame=tpf, sink_frames=0, decay_factor=decay,
                                      block_size=B, dense_near_frames=near)
                    d = torch.arange(T)[:, None]
                    c = torch.arange(tpf)[None, :]
                    got = rule(torch.tensor(0), d * tpf, c)  # query (frame d, pos 0), key (frame 0, pos c)
                    want = torch.tensor(keeps)[:, None] & (c.double() <= torch.tensor(widths, dtype=torch.float64)[:, None])
                    assert torch.equal(got, want), (tpf, B, decay, near)


def test_block_granularity_is_superset_run_in_full(rng):
    lay = TokenLayout((6, 5, 6), prefix=3)  # frames straddle blocks
    tok = Radial(block_size=8, decay_factor=0.5)
    blk = Radial(block_size=8, decay_factor=0.5, granularity="block")
    mt, mb = tok.mask(lay)[0], blk.mask(lay)[0]
    plan = blk.plan(lay)
    assert not plan.has_partial and plan.rule is None
    assert torch.equal(plan.token_mask()[0, 0], mb)
    assert bool((mb | ~mt).all()) and bool((mb & ~mt).any())  # strict superset of the token mask
    # exactly the blocks that hold an allowed pair
    nb = -(-lay.seq_len // 8)
    pad = torch.nn.functional.pad(mt, (0, nb * 8 - lay.seq_len, 0, nb * 8 - lay.seq_len))
    want = pad.view(nb, 8, nb, 8).any(3).any(1)
    assert torch.equal(plan.block_classes()[0, 0] > 0, want)
    assert plan.token_density == pytest.approx(mb.float().mean().item())
    q, k, v = (torch.randn(1, lay.seq_len, 2, 8, generator=rng) for _ in range(3))
    out = vidattn.sparse_attention(q, k, v, blk, lay, backend="reference")
    torch.testing.assert_close(out.double(), dense_masked_attention(q, k, v, mb[None]), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="granularity"):
        Radial(granularity="tile")

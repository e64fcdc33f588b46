"""Radial.from_authors against an independent transcription of the authors' block-mask
construction (mit-han-lab/radial-attention, radial_attn/attn_mask.py @ 72788d4, gen_log_mask_shrinked),
written here from its definition: full tpf x tpf frame-pair masks, zero-padded canvas, float64
column densities, OR into the global block mask. Then token expansion, plan and backends."""

import math

import pytest
import torch

from vidattn import TokenLayout
from vidattn.patterns.radial import Radial

from vidattn_testutils import dense_masked_attention


def oracle_block_mask(F, tpf, B, decay, model):
    """The authors' construction, pair by pair, with materialised masks (float64 densities)."""
    N = F * tpf
    nvb = -(-N // B)
    out = torch.zeros(nvb, nvb, dtype=torch.bool)
    r = torch.arange(tpf, dtype=torch.float64)[:, None]
    c = torch.arange(tpf, dtype=torch.float64)[None, :]
    for i in range(F):
        for j in range(F):
            d = abs(i - j)
            if model == "wan" and j == 0:
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                if d <= 1:
                    w = float(tpf)
                else:
                    w = max(2 ** tpf.bit_length() / 2 ** d.bit_length() * decay, B)
                w = float(torch.tensor(w, dtype=torch.float32))  # their comparison runs in float32
                local = (c - r).abs() <= w
                dl = 2 ** tpf.bit_length() / 2 ** d.bit_length()
                if dl < 128 and d % int(128 / dl) != 0:   # threshold 128 whatever B
                    local = torch.zeros_like(local)
            ro, co = (i * tpf) % B, (j * tpf) % B
            nb = math.ceil(tpf / B)
            canvas = torch.zeros(ro + nb * B, co + nb * B, dtype=torch.bool)
            canvas[ro:ro + tpf, co:co + tpf] = local
            canvas = canvas[:nb * B, :nb * B].reshape(nb, B, nb, B).double()
            dens = canvas.sum(1) / B                                # [nb, nb, B] per column of each block
            nonzero = (dens > 0).sum(-1).double()
            high = (dens > 1.0 / 3.0).sum(-1).double()
            keep = high / torch.where(nonzero > 0, nonzero, torch.ones_like(nonzero)) > 0.6
            r0, c0 = (i * tpf) // B, (j * tpf) // B
            out[r0:r0 + nb, c0:c0 + nb] |= keep
    if N % B:  # the block past their video/text border (N // B) is dense, as on their padded input
        out[N // B, :] = True
        out[:, N // B] = True
    return out


def oracle_token_mask(lay, table, B):
    S, P, N = lay.seq_len, lay.prefix, lay.num_grid_tokens
    m = torch.ones(S, S, dtype=torch.bool)
    vb = torch.arange(N) // B
    m[P:P + N, P:P + N] = table[vb][:, vb]
    return m


CASES = [
    # (grid, B, decay, model, prefix, suffix)
    ((5, 8, 16), 128, 0.2, "wan", 0, 0),        # tpf 128 = B, N multiple of B
    ((6, 10, 16), 128, 0.2, "wan", 0, 0),       # tpf 160: frames straddle blocks
    ((9, 6, 16), 64, 0.2, "wan", 0, 0),         # block 64, tpf 96: threshold 128 != B
    ((12, 4, 10), 64, 0.95, "hunyuan", 0, 64),  # tpf 40 < 64: frequency reduction bites
    ((7, 10, 16), 64, 0.8, "wan", 0, 0),        # Wan 2.2 path: block 64
    ((8, 12, 16), 128, 0.95, "hunyuan", 0, 128),  # text after the video
    ((5, 9, 13), 128, 0.2, "wan", 0, 0),        # N = 585, not a multiple: padded-video extension
    ((6, 5, 13), 64, 0.95, "hunyuan", 37, 11),  # prefix not a block multiple: permuted plan
]


@pytest.mark.parametrize("grid,B,decay,model,prefix,suffix", CASES)
def test_matches_authors_construction(grid, B, decay, model, prefix, suffix):
    T, H, W = grid
    pat = Radial.from_authors(model=model, decay_factor=decay, block_size=B)
    lay = TokenLayout(grid, prefix=prefix, suffix=suffix)
    want_tab = oracle_block_mask(T, H * W, B, decay, model)
    assert torch.equal(pat.authors_table(lay), want_tab)
    want = oracle_token_mask(lay, want_tab, B)
    got = pat.mask(lay)
    assert got.shape == (1, lay.seq_len, lay.seq_len) and got.dtype == torch.bool
    assert torch.equal(got[0], want)
    plan = pat.plan(lay)
    assert torch.equal(plan.token_mask()[0, 0], want)
    assert abs(float(plan.token_density) - want.double().mean().item()) < 1e-12
    if prefix % B == 0 and (H * W * T) % B == 0:
        assert not plan.has_partial  # aligned: full blocks only, as the authors' kernels run


def test_wan_and_hunyuan_differ_by_sink_only_and_defaults():
    lay = TokenLayout((6, 10, 16))
    wan, hun = Radial.from_authors("wan"), Radial.from_authors("hunyuan", decay_factor=0.2)
    assert Radial.from_authors("wan").decay_factor == 0.2 and Radial.from_authors("hunyuan").decay_factor == 0.95
    tw, th = wan.authors_table(lay), hun.authors_table(lay)
    assert torch.equal(tw | th, tw)  # the sink only adds blocks
    assert tw[:, 0].all() and not torch.equal(tw, th)
    with pytest.raises(ValueError, match="model"):
        Radial.from_authors("mochi")
    with pytest.raises(ValueError, match="authors"):
        Radial(granularity="authors")  # dense_near_frames 0 is not the authors' window


def test_reference_backend_runs_the_mask(rng):
    import vidattn

    lay = TokenLayout((5, 9, 13), suffix=6)
    pat = Radial.from_authors("wan", block_size=64)
    q, k, v = (torch.randn(1, lay.seq_len, 2, 16, generator=rng) for _ in range(3))
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    want = dense_masked_attention(q.double(), k.double(), v.double(), pat.mask(lay))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_wan480p_shape_density():
    """Wan 2.1 480p: 21 x 30 x 52 (N = 32760, not a multiple of 128): builds fast, sparse."""
    lay = TokenLayout((21, 30, 52))
    pat = Radial.from_authors("wan")
    plan = pat.plan(lay)
    assert plan.seq_len == 32760 and 0.2 < float(plan.token_density) < 0.6


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(F=st.integers(1, 9), tpf=st.integers(1, 200), B=st.sampled_from([64, 128]),
       decay=st.sampled_from([0.2, 0.5, 0.8, 0.95, 1.0]), model=st.sampled_from(["wan", "hunyuan"]))
def test_block_mask_sweep(F, tpf, B, decay, model):
    from vidattn.patterns.radial import authors_block_mask

    assert torch.equal(authors_block_mask(F, tpf, B, decay, model), oracle_block_mask(F, tpf, B, decay, model))

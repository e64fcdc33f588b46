"""PermutedGrid.from_authors("svg" | "mminference") against float64 transcriptions written here
from the definitions (Sparse VideoGen 1 @ 5ce7b01: runtime band + first-frame sink in plan order,
position-major temporal heads, two-frame profiling masks, MSE choice; MMInference: grid head with
stride = tokens per frame, phase of highest recall)."""

import math

import pytest
import torch

import vidattn
from vidattn import TokenLayout
from vidattn.patterns.grid import MMInferenceGrid, PermutedGrid
from vidattn.patterns.svg import SparseVideoGen

from vidattn_testutils import dense_masked_attention


def svg_runtime_mask(F, tpf, C_prefix, C_suffix, sparsity, kinds):
    """[H, S, S] bool, original order."""
    N = F * tpf
    S = N + C_prefix + C_suffix
    C = S - N
    s2 = (sparsity * S * S - 2 * S * C) / (S * S)
    width = S * (1 - math.sqrt(1 - s2))
    band = math.ceil(width / 128) * 128
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    plan_mask = (j < tpf) | ((i - j).abs() <= band)  # in plan positions
    out = torch.ones(len(kinds), S, S, dtype=torch.bool)
    for h, kind in enumerate(kinds):
        if kind == "temporal":  # video token f*tpf+p sits at plan position p*F+f
            g = torch.arange(N)
            pos = (g % tpf) * F + g // tpf
        else:
            pos = torch.arange(N)
        out[h, C_prefix:C_prefix + N, C_prefix:C_prefix + N] = plan_mask[pos][:, pos]
    return out


def svg_profiling_masks(F, tpf):
    """The authors' two profiling masks over the video, [2, N, N] (their reshape/permute form)."""
    N = F * tpf
    m = torch.zeros(N, N, dtype=torch.bool)
    m[:, :tpf] = True
    nb = math.ceil(N / 128)
    thr = (2 * tpf) // 128
    for a in range(nb):
        for b in range(nb):
            if abs(a - b) < thr:
                m[a * 128:(a + 1) * 128, b * 128:(b + 1) * 128] = True
    t = m.reshape(tpf, F, tpf, F).permute(1, 0, 3, 2).reshape(N, N)
    return torch.stack([m, t])


def _temporal_friendly(F, tpf, H, D, gen, text):
    """Head 0: keys match the query's in-frame position (temporal); head 1: frame-local (spatial)."""
    N = F * tpf
    S = N + text
    g = torch.arange(N)
    pos_emb = torch.randn(tpf, D, generator=gen)
    frame_emb = torch.randn(F, D, generator=gen)
    q = torch.randn(1, S, H, D, generator=gen) * 0.1
    k = torch.randn(1, S, H, D, generator=gen) * 0.1
    q[0, :N, 0] += 3 * pos_emb[g % tpf]
    k[0, :N, 0] += 3 * pos_emb[g % tpf]
    q[0, :N, 1] += 3 * frame_emb[g // tpf]
    k[0, :N, 1] += 3 * frame_emb[g // tpf]
    v = torch.randn(1, S, H, D, generator=gen)
    return q, k, v


@pytest.mark.parametrize("grid,suffix,sparsity", [((4, 8, 16), 0, 0.3), ((5, 6, 20), 10, 0.25), ((6, 4, 12), 3, 0.5)])
def test_svg_runtime_mask_matches_definition(grid, suffix, sparsity):
    F, Hh, W = grid
    lay = TokenLayout(grid, suffix=suffix)
    pat = PermutedGrid.from_authors("svg", sparsity=sparsity)
    assert isinstance(pat, SparseVideoGen)
    for kinds in [(0, 1), (1, 1, 0)]:
        plan = pat.plan_for(lay, kinds)
        want = svg_runtime_mask(F, Hh * W, 0, suffix, sparsity, ["temporal" if k else "spatial" for k in kinds])
        got = plan.token_mask()[0]
        assert torch.equal(got, want)
        assert abs(float(plan.token_density) - want[0].double().mean().item()) < 1e-12


def test_svg_profiling_picks_lower_mse_per_head():
    gen = torch.Generator().manual_seed(0)
    F, tpf = 4, 128
    lay = TokenLayout((F, 8, 16))
    q, k, v = _temporal_friendly(F, tpf, 2, 16, gen, 0)
    pat = SparseVideoGen(num_sampled_rows=16, sample_max_row=300)
    rows = (torch.arange(16) * 300) // 16
    masks = svg_profiling_masks(F, tpf)[:, rows]
    qd, kd, vd = (t[0].double().transpose(0, 1) for t in (q, k, v))  # [H, S, D]
    logits = qd[:, rows] @ kd.transpose(1, 2) / math.sqrt(16)
    gold = torch.softmax(logits, -1) @ vd
    mse = torch.stack([((torch.softmax(logits.masked_fill(~m, -math.inf), -1) @ vd - gold) ** 2).mean((1, 2))
                       for m in masks])
    want = tuple(int(x) for x in mse.argmin(0))
    kinds, got_mse = pat.classify(lay, q, k, v)
    assert kinds == want == (1, 0)  # head 0 temporal, head 1 spatial
    torch.testing.assert_close(got_mse.double(), mse, rtol=1e-3, atol=1e-7)
    plan = pat.plan(lay, q, k, v=v)
    assert plan.meta["head_patterns"] == ["temporal", "spatial"]
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    torch.testing.assert_close(out.double(), dense_masked_attention(q, k, v, plan.token_mask()[0]), atol=1e-5, rtol=1e-5)


def mminference_oracle(q, k, layout, n_samples, recall):
    """Per head: best phase by recall of sampled rows (float64), or dense if below ``recall``."""
    B, S, H, D = q.shape
    T, Hh, W = layout.grid
    st, N, P = Hh * W, layout.num_grid_tokens, layout.prefix
    rows = torch.linspace(0, N - 1, min(n_samples, N)).round().long()
    choice = []
    for h in range(H):
        p = torch.softmax(q[:, P + rows, h].double() @ k[:, :, h].double().transpose(1, 2) / math.sqrt(D), -1)
        best, best_r = None, -1.0
        for ph in range(st):
            colmask = torch.ones(S, dtype=torch.bool)
            colmask[P:P + N] = torch.arange(N) % st == ph
            r = torch.where((rows % st == ph)[None], torch.ones(B, len(rows), dtype=torch.float64),
                            (p * colmask).sum(-1)).mean().item()
            if r > best_r + 1e-12:
                best, best_r = ph, r
        choice.append(("grid", best) if best_r >= recall else ("dense", None))
    return choice


def test_mminference_phase_by_recall_and_mask():
    gen = torch.Generator().manual_seed(1)
    lay = TokenLayout((4, 3, 5), prefix=2)
    S, st = lay.seq_len, 15
    q = torch.randn(1, S, 3, 8, generator=gen)
    k = torch.randn(1, S, 3, 8, generator=gen)
    u = torch.randn(3, 8, generator=gen)
    u = u / u.norm(dim=-1, keepdim=True)
    q[0, :, :2] += 3 * u[:2]
    k[0, 2 + torch.arange(60)[torch.arange(60) % st == 4], 0] += 3 * u[0]  # head 0: phase 4 lines
    k[0, 2 + torch.arange(60)[torch.arange(60) % st == 9], 1] += 3 * u[1]  # head 1: phase 9 lines
    pat = PermutedGrid.from_authors("mminference", recall=0.3, num_samples=12, block_size=16)
    assert isinstance(pat, MMInferenceGrid)
    want = mminference_oracle(q, k, lay, 12, 0.3)
    plan = pat.plan(lay, q, k)
    names = plan.meta["head_patterns"]
    for h, (kind, ph) in enumerate(want):
        assert names[h] == ("dense" if kind == "dense" else f"grid(stride={st},phase={ph})")
    assert want[0] == ("grid", 4) and want[1] == ("grid", 9)
    # the executed mask is the grid definition: line keys for everyone, line queries dense, text dense
    m = plan.token_mask()[0]
    g = torch.arange(60)
    for h, (kind, ph) in enumerate(want):
        exp = torch.ones(S, S, dtype=torch.bool)
        if kind == "grid":
            line = g % st == ph
            exp[2:, 2:] = line[None, :] | line[:, None]
        assert torch.equal(m[h], exp)


def test_from_authors_errors():
    with pytest.raises(ValueError, match="method"):
        PermutedGrid.from_authors("stg")
    with pytest.raises(ValueError, match="sparsity"):
        SparseVideoGen(sparsity=0)
    with pytest.raises(ValueError, match="needs q, k and v"):
        SparseVideoGen().plan(TokenLayout((2, 4, 4)), torch.zeros(1, 32, 1, 4), torch.zeros(1, 32, 1, 4))


def test_config_names_round_trip():
    from vidattn.config import pattern_from_dict, pattern_to_dict

    for pat in (PermutedGrid.from_authors("svg", sparsity=0.25), PermutedGrid.from_authors("mminference", recall=0.8)):
        d = pattern_to_dict(pat)
        assert d["pattern"] in ("svg", "mminference")
        assert pattern_from_dict(d) == pat

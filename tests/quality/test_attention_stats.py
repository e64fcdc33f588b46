"""quality.attention_stats: statistics of exact softmax rows against brute-force definitions."""

import math

import numpy as np
import pytest
import torch

from vidattn.layout import TokenLayout
from vidattn.quality.attention_stats import classify_head, head_statistics

LAYOUT = TokenLayout((4, 6, 6), suffix=3)  # 144 grid tokens + 3 text tokens
ROWS = torch.arange(0, 64) + LAYOUT.prefix  # one block of 64 grid queries


def _coords():
    c = LAYOUT.coords().double()  # [N, 3]
    return torch.cat([c, torch.full((LAYOUT.suffix, 3), 99.0)])  # text tokens far away


def _qk_from_logits(logits: torch.Tensor):
    """q/k [1, S, 1, S] whose scaled product equals ``logits`` (q = logits rows, k = identity)."""
    S = logits.shape[0]
    q = logits.float()[None, :, None, :]
    k = torch.eye(S)[None, :, None, :]
    return q, k


def test_uniform_head_matches_window_and_frame_shares():
    S = LAYOUT.seq_len
    q, k = torch.zeros(1, S, 2, 8), torch.randn(1, S, 2, 8)
    st = head_statistics(q, k, LAYOUT, ROWS, block_size=64)
    assert np.allclose(st["entropy_ratio"], 1.0)
    # a uniform row puts (window tokens / S) of its mass in each window: compare per row by brute force
    c = _coords()
    for fi, f in enumerate(st["window_fractions"]):
        ks = [max(1, int(round(f * g))) | 1 for g in LAYOUT.grid]
        ks = [min(kk, g) for kk, g in zip(ks, LAYOUT.grid)]
        expect = []
        for r in ROWS.tolist():
            cnt = 0
            for j in range(LAYOUT.num_grid_tokens):
                ok = True
                for a, (g, kk) in enumerate(zip(LAYOUT.grid, ks)):
                    start = min(max(int(c[r, a]) - kk // 2, 0), g - kk)
                    ok &= start <= int(c[j, a]) < start + kk
                cnt += ok
            expect.append(cnt / S)
        assert st["window_mass"][:, fi] == pytest.approx([np.mean(expect)] * 2, abs=1e-6)
    np.testing.assert_allclose(st["temporal_profile"][0], st["temporal_uniform"], atol=1e-6)
    assert st["text_mass"] == pytest.approx([3 / S] * 2)
    assert classify_head(dict(entropy_ratio=float(st["entropy_ratio"][0]), tube_other_frames=0.0, local_window=0.1,
                              blocks_for_90=1.0)) == "uniform"


def test_local_temporal_and_content_heads():
    c = _coords()
    S = LAYOUT.seq_len
    d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    # local: mass on the query itself and its 6-neighbours
    q, k = _qk_from_logits(-20.0 * d2)
    st = head_statistics(q, k, LAYOUT, ROWS, scale=1.0, block_size=64)
    assert st["window_mass"][0, 1] > 0.99 and st["tube_other_frames"][0] < 0.2 and st["entropy_ratio"][0] < 0.3
    hd = dict(entropy_ratio=float(st["entropy_ratio"][0]), tube_other_frames=float(st["tube_other_frames"][0]),
              local_window=float(st["window_mass"][0, 1]), blocks_for_90=float(st["blocks_for_90"][0]))
    assert classify_head(hd) == "local"
    # temporal: same spatial position, every frame equally
    same = (c[:, None, 1:] == c[None, :, 1:]).all(-1)
    q, k = _qk_from_logits(torch.where(same, 0.0, -60.0).double())
    st = head_statistics(q, k, LAYOUT, ROWS, scale=1.0, block_size=64)
    T = LAYOUT.grid[0]
    assert st["tube_other_frames"][0] == pytest.approx((T - 1) / T, abs=1e-6)
    # exact profile: a query in frame fq puts 1/T on each frame, so profile[d] = #frames at distance d / T, averaged
    fq = c[ROWS, 0].long()
    expect = np.mean([[sum(1 for f in range(T) if abs(f - int(x)) == d) / T for d in range(T)] for x in fq], 0)
    np.testing.assert_allclose(st["temporal_profile"][0], expect, atol=1e-6)
    hd = dict(entropy_ratio=float(st["entropy_ratio"][0]), tube_other_frames=float(st["tube_other_frames"][0]),
              local_window=float(st["window_mass"][0, 1]), blocks_for_90=float(st["blocks_for_90"][0]))
    assert classify_head(hd) == "temporal"
    # content: every query attends the same 10 far-apart keys (one key block of 64 holds them all)
    logits = torch.full((S, S), -60.0, dtype=torch.float64)
    logits[:, 100:110] = 0.0
    q, k = _qk_from_logits(logits)
    st = head_statistics(q, k, LAYOUT, ROWS, scale=1.0, block_size=64)
    nkb = math.ceil(S / 64)
    assert st["blocks_for_90"][0] == pytest.approx(1 / nkb)
    hd = dict(entropy_ratio=float(st["entropy_ratio"][0]), tube_other_frames=float(st["tube_other_frames"][0]),
              local_window=float(st["window_mass"][0, 1]), blocks_for_90=float(st["blocks_for_90"][0]))
    assert classify_head(hd) == "content"


def test_bad_rows_rejected():
    q = torch.zeros(1, LAYOUT.seq_len, 1, 4)
    with pytest.raises(ValueError, match="grid token indices"):
        head_statistics(q, q, LAYOUT, torch.tensor([LAYOUT.seq_len - 1]))
    with pytest.raises(ValueError, match="does not match the layout"):
        head_statistics(q[:, :-1], q[:, :-1], LAYOUT, ROWS)

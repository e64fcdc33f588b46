import math

import pytest
import torch

from vidattn.attention import sparse_attention
from vidattn.layout import TokenLayout
from vidattn.patterns.neighborhood import Neighborhood
from vidattn.quality.probes import AttentionProbe, allowed_rows


def _direct(q, k, v, mask, rows, h, scale):
    # independent: full S x S dense attention and masked recall for the given rows
    logits = (q[0, :, h].double() @ k[0, :, h].double().T) * scale
    p = torch.softmax(logits, -1)
    return p[rows] @ v[0, :, h].double(), (p[rows] * mask[rows]).sum(-1).mean()


def test_probe_matches_direct_computation():
    torch.manual_seed(0)
    layout = TokenLayout((2, 6, 6))
    pat = Neighborhood(kernel_size=(1, 3, 3))
    S, H, D = layout.seq_len, 2, 8
    q, k, v = (torch.randn(1, S, H, D) for _ in range(3))
    mask = pat.mask(layout, H)  # [H, S, S] independent mask definition
    with AttentionProbe(sample_heads=None, max_queries=S, seed=0) as probe:
        out = sparse_attention(q, k, v, pat, layout, backend="reference")
    assert len(probe.records) == H
    scale = 1 / math.sqrt(D)
    rows = torch.arange(S)
    for rec in probe.records:
        h = rec["head"]
        dense, recall = _direct(q, k, v, mask[h if mask.shape[0] > 1 else 0], rows, h, scale)
        sparse = out[0, :, h].double()
        assert rec["rel_l2"] == pytest.approx(float((sparse - dense).norm() / dense.norm()), rel=1e-6)
        assert rec["cosine"] == pytest.approx(float((sparse * dense).sum() / (sparse.norm() * dense.norm())), rel=1e-9)
        assert rec["recall"] == pytest.approx(float(recall), rel=1e-9)
        assert 0 < rec["recall"] < 1 and rec["rel_l2"] > 1e-3
    s = probe.summary()
    assert s["num_records"] == H and s["per_layer"][0]["layer"] == 0


def test_allowed_rows_equals_token_mask_with_permutation():
    import vidattn

    layout = TokenLayout((4, 4, 4))
    pat = vidattn.Radial(block_size=16, sink_frames=0)
    plan = pat.plan(layout, num_heads=2, device="cpu")
    tm = plan.token_mask()
    rows = torch.tensor([0, 5, 17, 63])
    for h in range(plan.plan_heads):
        assert torch.equal(allowed_rows(plan, rows, h), tm[0, h, rows])
    with pytest.raises(ValueError, match="rows"):
        allowed_rows(plan, torch.tensor([64]), 0)


def test_probe_dense_pattern_is_exact_and_layers_counted():
    from vidattn.patterns.dense import Dense

    torch.manual_seed(1)
    layout = TokenLayout((2, 4, 4))
    q, k, v = (torch.randn(1, 32, 2, 8) for _ in range(3))
    with AttentionProbe(sample_layers=[1], max_queries=8) as probe:
        probe.start_step(0)
        for _ in range(3):
            sparse_attention(q, k, v, Dense(), layout, backend="reference")
    assert {r["layer"] for r in probe.records} == {1}
    assert all(r["rel_l2"] < 1e-6 and abs(r["recall"] - 1) < 1e-9 for r in probe.records)

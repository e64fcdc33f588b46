"""RectifiedSparse.from_authors against a float64 transcription of the authors' IPAR + GAPR
(BienLuky/Rectified-SpaAttn @ 4b0aa10, rectified_wan21_attn.py): block-mean pooling at 128,
softmax of pooled scores, critical count #{cumsum <= 0.3} + 1 at least int((1 - drop) * NB),
first-frame block square, GAPR gain vs pooling error, IPAR output correction."""

import math

import pytest
import torch

import vidattn
from vidattn import TokenLayout
from vidattn.patterns.rectified import RectifiedSparse


def oracle(q, k, v, T, drop, p_remain=0.3, bs=128):
    """[B, S, H, D] float64 output and the critical block mask [B, H, NB, NB] (S multiple of bs)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    B, H, S, D = q.shape
    nb = S // bs
    qb, kb, vb = (t.reshape(B, H, nb, bs, D) for t in (q, k, v))
    qm, km, vm = qb.mean(3), kb.mean(3), vb.mean(3)
    qd = (qb - qm[:, :, :, None]).abs().mean(3)
    kd = (kb - km[:, :, :, None]).abs().mean(3)
    P = torch.softmax(qm @ km.transpose(-1, -2) / math.sqrt(D), -1)  # [B, H, nb, nb]
    crit = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    min_count = int((1 - drop) * nb)
    for b in range(B):
        for h in range(H):
            for a in range(nb):
                order = sorted(range(nb), key=lambda j: (-P[b, h, a, j].item(), j))
                csum, count = 0.0, 0
                for j in order:
                    csum += P[b, h, a, j].item()
                    if csum <= p_remain:
                        count += 1
                count = max(count + 1, min_count)
                for j in order[:count]:
                    crit[b, h, a, j] = True
    crit |= torch.eye(nb, dtype=torch.bool)
    ff = nb // T
    crit[:, :, :ff, :ff] = True
    gain = (qm @ km.transpose(-1, -2)).abs()
    err = (qd @ km.transpose(-1, -2)).abs() + (qm @ kd.transpose(-1, -2)).abs()
    pooled = ~crit & (gain > err)
    R = 1 - (P * pooled).sum(-1)  # [B, H, nb]
    shift = (P * pooled) @ vm      # [B, H, nb, D]
    tok = crit.repeat_interleave(bs, 2).repeat_interleave(bs, 3)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    o = torch.softmax(s.masked_fill(~tok, -math.inf), -1) @ v
    out = R.repeat_interleave(bs, 2)[..., None] * o + shift.repeat_interleave(bs, 2)
    return out.transpose(1, 2), crit


@pytest.mark.parametrize("model,grid", [("wan21", (4, 8, 32)), ("wan22", (5, 8, 16)), ("hunyuan", (3, 16, 16))])
def test_matches_authors_method(model, grid):
    gen = torch.Generator().manual_seed(7)
    lay = TokenLayout(grid)
    S = lay.seq_len
    base = torch.randn(S // 32, 16, generator=gen).repeat_interleave(32, 0)  # some block structure
    q = (base[None, :, None] + 0.5 * torch.randn(1, S, 2, 16, generator=gen))
    k = (base[None, :, None] + 0.5 * torch.randn(1, S, 2, 16, generator=gen))
    v = torch.randn(1, S, 2, 16, generator=gen)
    pat = RectifiedSparse.from_authors(model)
    want, crit = oracle(q, k, v, grid[0], RectifiedSparse.AUTHORS_DROP_RATES[model])
    plan = pat.plan(lay, q, k, v=v)
    assert torch.equal(plan.block_classes() > 0, crit)
    out = vidattn.sparse_attention(q, k, v, pat, lay, backend="reference")
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


def test_defaults_and_errors():
    p = RectifiedSparse.from_authors()
    assert (p.mass, p.min_keep, p.block_size, p.method, p.first_frame_square) == (0.3, 0.25, 128, "authors", True)
    assert RectifiedSparse.from_authors("flux").first_frame_square is False
    with pytest.raises(ValueError, match="model"):
        RectifiedSparse.from_authors("cog")
    with pytest.raises(ValueError, match="min_keep"):
        RectifiedSparse(min_keep=2.0)

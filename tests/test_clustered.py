"""Clustered (Sparse VideoGen 2 semantic-aware permutation) and the batched k-means: against an
independent float64 transcription of the method (Lloyd k-means from evenly spaced seeds, size-
weighted centroid softmax, top-p with a minimum count, cluster mask with dense text), plus dense
equality at top_p=1, exact permutation round trips, warm starts and backends."""

import pytest
import torch

import vidattn
from vidattn import TokenLayout, invert_permutation
from vidattn.config import pattern_from_dict
from vidattn.kernels.kmeans import batched_kmeans
from vidattn.patterns.clustered import Clustered, default_cluster_counts

from vidattn_testutils import dense_masked_attention


def blobs(G, N, D, K, gen, noise=0.05):
    """Points drawn around K well-separated centres: [G, N, D] float32."""
    centres = torch.randn(G, K, D, generator=gen) * 3
    lab = torch.randint(0, K, (G, N), generator=gen)
    return torch.gather(centres, 1, lab[..., None].expand(G, N, D)) + noise * torch.randn(G, N, D, generator=gen)


def oracle_kmeans(x, K, iters, init=None):
    """Lloyd's algorithm in float64, point by point semantics: labels of the last assignment,
    centroids after the last update, empty clusters keep their centroid."""
    x = x.double()
    G, N, D = x.shape
    c = x[:, [(i * N) // K for i in range(K)]].clone() if init is None else init.double().clone()
    for _ in range(iters):
        d = ((x[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)
        lab = d.argmin(-1)
        for g in range(G):
            for j in range(K):
                sel = lab[g] == j
                if sel.any():
                    c[g, j] = x[g, sel].mean(0)
    return lab, c


def oracle_cluster_mask(layout, q, k, Kq, Kk, top_p, min_fraction, iters):
    """[B, H, S, S] bool: the SVG2 mask from the definition (batch 1 per call here)."""
    B, S, H, D = q.shape
    g = layout.grid_slice
    out = torch.ones(B, H, S, S, dtype=torch.bool)
    for h in range(H):
        xq = q[:, g, h].permute(1, 0, 2).reshape(1, -1, B * D)
        xk = k[:, g, h].permute(1, 0, 2).reshape(1, -1, B * D)
        lq, cq = oracle_kmeans(xq, Kq, iters)
        lk, ck = oracle_kmeans(xk, Kk, iters)
        sizes = torch.bincount(lk[0], minlength=Kk).double()
        for b in range(B):
            cqb, ckb = cq[0, :, b * D:(b + 1) * D], ck[0, :, b * D:(b + 1) * D]
            s = cqb @ ckb.T * D ** -0.5
            w = torch.exp(s - s.max(-1, keepdim=True).values) * sizes
            p = w / w.sum(-1, keepdim=True)
            keep = torch.zeros(Kq, Kk, dtype=torch.bool)
            for a in range(Kq):
                order = sorted(range(Kk), key=lambda j: -p[a, j].item())
                mass = 0.0
                for rank, j in enumerate(order):
                    if rank == 0 or mass <= top_p or rank < int(min_fraction * Kk):
                        keep[a, j] = True
                    mass += p[a, j].item()
            grid_mask = keep[lq[0]][:, lk[0]]
            out[b, h, g, g] = grid_mask
    return out


def test_kmeans_matches_float64_lloyd_and_warm_start_on_converged_case():
    gen = torch.Generator().manual_seed(0)
    x = blobs(3, 200, 8, 5, gen)
    lab, cent, sizes = batched_kmeans(x, 7, 20)
    want_lab, want_c = oracle_kmeans(x, 7, 20)
    assert torch.equal(lab, want_lab)
    torch.testing.assert_close(cent.double(), want_c, atol=1e-5, rtol=1e-5)
    assert torch.equal(sizes, torch.stack([torch.bincount(r, minlength=7) for r in lab]))
    # converged: a warm start changes only the iteration count, not the result
    lab2, cent2, _ = batched_kmeans(x, 7, 2, init=cent)
    assert torch.equal(lab2, lab)
    torch.testing.assert_close(cent2, cent, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_clusters"):
        batched_kmeans(x, 0, 1)
    with pytest.raises(ValueError, match="init"):
        batched_kmeans(x, 7, 1, init=torch.zeros(3, 6, 8))


def _qk(layout, B, H, D, gen, K=4):
    S = layout.seq_len
    q = blobs(B * H, S, D, K, gen).view(B, H, S, D).transpose(1, 2).contiguous()
    k = blobs(B * H, S, D, K + 2, gen).view(B, H, S, D).transpose(1, 2).contiguous()
    v = torch.randn(B, S, H, D, generator=gen)
    return q, k, v


@pytest.mark.parametrize("B,suffix,prefix,bq,bk", [(1, 0, 0, 16, 16), (1, 7, 0, 32, 16), (2, 3, 5, 16, 32)])
def test_exact_plan_matches_oracle_and_superset(B, suffix, prefix, bq, bk):
    gen = torch.Generator().manual_seed(1 + B + suffix)
    lay = TokenLayout((3, 6, 8), prefix=prefix, suffix=suffix)
    q, k, v = _qk(lay, B, 2, 8, gen)
    want = oracle_cluster_mask(lay, q, k, 5, 9, 0.6, 0.2, 12)
    pat = Clustered(q_clusters=5, k_clusters=9, top_p=0.6, min_fraction=0.2, iters_first=12, block_size=bq,
                    block_k=bk, exact=True, warm_start=False)
    plan = pat.plan(lay, q, k)
    got = plan.token_mask()
    if B == 1:
        assert torch.equal(got, want)
    else:  # exact inside partial blocks up to the batch union
        assert torch.equal(got | want, got) and torch.equal(got & want.any(0, keepdim=True), got)
    assert abs(float(plan.meta["cluster_density"]) - want.double().mean().item()) < 1e-9
    loose = Clustered(q_clusters=5, k_clusters=9, top_p=0.6, min_fraction=0.2, iters_first=12, block_size=bq,
                      block_k=bk, warm_start=False).plan(lay, q, k)
    lm = loose.token_mask()
    assert torch.equal(lm | want, lm) and not loose.has_partial
    assert float(loose.token_density) >= float(loose.meta["cluster_density"]) - 1e-12
    out = vidattn.run_plan(q, k, v, plan, backend="reference")
    torch.testing.assert_close(out.double(), dense_masked_attention(q, k, v, got), atol=1e-5, rtol=1e-5)


def test_top_p_one_equals_dense_and_permutations_round_trip():
    gen = torch.Generator().manual_seed(3)
    lay = TokenLayout((2, 8, 8), suffix=9)
    q, k, v = _qk(lay, 1, 3, 16, gen)
    plan = Clustered(q_clusters=6, k_clusters=12, top_p=1.0, block_size=16).plan(lay, q, k)
    assert float(plan.token_density) == 1.0 and plan.token_mask().all()
    out = vidattn.run_plan(q, k, v, plan, backend="reference")
    want = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v)))
    torch.testing.assert_close(out.double(), want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    for perm in (plan.perm, plan.kv_perm):
        assert perm.shape == (3, lay.seq_len)
        inv = invert_permutation(perm)
        x = torch.randn(3, lay.seq_len, 4, generator=gen)
        px = torch.gather(x, 1, perm[..., None].expand(-1, -1, 4))
        assert torch.equal(torch.gather(px, 1, inv[..., None].expand(-1, -1, 4)), x)  # bit-exact
    assert not torch.equal(plan.perm, plan.kv_perm)  # queries and keys have their own orders
    assert (plan.perm[:, -9:] >= lay.seq_len - 9).all()  # text: one cluster, last


def test_warm_start_iterations_and_state_key():
    gen = torch.Generator().manual_seed(4)
    lay = TokenLayout((2, 6, 8))
    q, k, _ = _qk(lay, 1, 2, 8, gen)
    pat = Clustered(q_clusters=4, k_clusters=6, top_p=0.8, iters_first=30, block_size=16)
    p1 = pat.plan(lay, q, k, state_key=0)
    p2 = pat.plan(lay, q, k, state_key=0)
    p3 = pat.plan(lay, q, k, state_key=1)
    assert (p1.meta["kmeans_iters"], p2.meta["kmeans_iters"], p3.meta["kmeans_iters"]) == (30, 2, 30)
    assert torch.equal(p1.block_classes(), p2.block_classes()) and torch.equal(p1.perm, p2.perm)
    pat.reset()
    assert pat.plan(lay, q, k, state_key=0).meta["kmeans_iters"] == 30


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_backends_run_the_same_plan(backend):
    if backend not in vidattn.available_backends():
        pytest.skip(f"{backend} not available")
    gen = torch.Generator().manual_seed(5)
    lay = TokenLayout((2, 4, 8), suffix=3)
    q, k, v = _qk(lay, 1, 2, 16, gen)
    k = k[:, :, :1].contiguous()  # GQA: one key head
    v = v[:, :, :1].contiguous()
    for exact in (False, True):
        plan = Clustered(q_clusters=4, k_clusters=6, top_p=0.5, block_size=32, block_k=16, exact=exact).plan(lay, q, k)
        ref = vidattn.run_plan(q, k, v, plan, backend="reference")
        out = vidattn.run_plan(q, k, v, plan, backend=backend)
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_defaults_registry_and_errors():
    assert default_cluster_counts(32760) == (200, 1000)
    assert default_cluster_counts(75600) == (304, 1000)
    assert Clustered.from_authors("720p").q_clusters == 300
    p = pattern_from_dict({"pattern": "clustered", "top_p": 0.5})
    assert isinstance(p, Clustered) and p.top_p == 0.5 and vidattn.Clustered is Clustered
    with pytest.raises(ValueError, match="top_p"):
        Clustered(top_p=0)
    with pytest.raises(ValueError, match="needs q"):
        Clustered().plan(TokenLayout((2, 4, 4)))


def test_no_state_key_means_cold_start():
    gen = torch.Generator().manual_seed(6)
    lay = TokenLayout((2, 4, 8))
    q, k, _ = _qk(lay, 1, 2, 8, gen)
    pat = Clustered(q_clusters=3, k_clusters=5, iters_first=7, block_size=16)
    assert [pat.plan(lay, q, k).meta["kmeans_iters"] for _ in range(2)] == [7, 7]


def test_fused_assign_kernel_matches_torch_path():
    from vidattn.kernels.kmeans import kmeans_assign_torch, kmeans_assign_triton

    gen = torch.Generator().manual_seed(8)
    for G, N, D, K in [(2, 300, 32, 20), (3, 200, 48, 70)]:
        x, c = torch.randn(G, N, D, generator=gen), torch.randn(G, K, D, generator=gen)
        assert torch.equal(kmeans_assign_triton(x, c), kmeans_assign_torch(x, c))

"""vidattn under diffusers context parallelism: 2 CPU processes over gloo (127.0.0.1), tiny Wan and
FLUX transformers, Ulysses-2 and Ring-2; one spawn for the whole module (cp_cases.py runs every
case, these tests check its results).

Reference: the same model in a single process, fp32 - vidattn's sparse output for each pattern,
diffusers' dense output for ``Dense()``. Tolerance 1e-5 relative."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import cp_cases

WORLD = 2
TOL = 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "results.pt"
    mp.spawn(cp_cases.worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    res = torch.load(out, weights_only=False)
    assert "fatal" not in res, res.get("fatal", {}).get("error")
    return res


def _case(results, key):
    r = results[key]
    assert "error" not in r, f"{key}:\n{r['error']}"
    return r


FAMILY_PATTERNS = {"wan": ["neighborhood", "radial", "permuted_grid", "rectified", "rectified_joint", "dense"],
                   "flux": ["neighborhood", "rectified", "dense"]}  # Radial / PermutedGrid need video grids
PARAMS = [(f, m, p) for f, ps in FAMILY_PATTERNS.items() for m in ("ulysses", "ring") for p in ps]


@pytest.mark.parametrize("family,mode,pattern", PARAMS)
def test_parallel_equals_single_process(results, family, mode, pattern):
    r = _case(results, f"{family}/{mode}/parallel-then-apply/{pattern}")
    assert r["rel"] <= TOL, r
    assert r["sparse"] == r["cp"] > 0, r  # Dense() too: its full plan through vidattn's CP op
    if pattern in ("neighborhood", "rectified"):
        assert r["sparse_vs_dense"] > 1e-3  # the pattern really is sparse on this model
    if mode == "ulysses" and pattern != "dense":
        # head load-balance report: global head ids of this rank (rank 0: heads 0 .. H/2-1)
        assert r["head_work"] and all(set(hw) == {0} for hw in r["head_work"].values())


ROUTE_CASES = [("apply-then-parallel", p) for p in ("neighborhood", "rectified")] + \
    [(f"set_attention_backend-{b}", "neighborhood") for b in ("vidattn", "native")]


@pytest.mark.parametrize("family", list(FAMILY_PATTERNS))
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_other_orders_and_routes(results, family, mode):
    """apply before enable_parallelism; set_attention_backend after apply; set_attn_processor."""
    for route, pattern in ROUTE_CASES:
        r = _case(results, f"{family}/{mode}/{route}/{pattern}")
        assert r["rel"] <= TOL and r["sparse"] == r["cp"] > 0, (route, r)
    r = _case(results, f"{family}/{mode}/set_attn_processor/neighborhood")
    assert r["rel"] <= TOL and r["first"] <= TOL * 10 and r["cp"] > 0, r


# Ring: which patterns run per-(query shard, key shard) plan slices (aligned, or re-blocked where the
# 24-token shards of tiny Wan / 26-token shards of tiny FLUX cut plan blocks) and which fall back
# to all-gathered K/V
RING_PER_SHARD = {"neighborhood", "radial", "permuted_grid", "rectified_joint", "dense"}
RING_GATHERED = {"rectified"}  # method="authors": an output epilogue, not mergeable by LSE


@pytest.mark.parametrize("family,pattern", [(f, p) for f, ps in FAMILY_PATTERNS.items() for p in ps])
def test_ring_per_shard_plans_ran(results, family, pattern):
    r = _case(results, f"{family}/ring/parallel-then-apply/{pattern}")
    calls = r["sparse"]  # sparse calls on this rank (one per self-attention layer)
    if pattern in RING_PER_SHARD:
        assert r["ring_shard"] == WORLD * calls and r["ring_gathered"] == 0, r  # one kernel call per ring step
    else:
        assert pattern in RING_GATHERED and r["ring_gathered"] == calls and r["ring_shard"] == 0, r


def test_ring_per_shard_flux_split_text(results):
    """FLUX's shards are [text_r, image_r]: whole blocks when 16 text + 8x8 image tokens."""
    for pattern in ("neighborhood", "rectified_joint"):
        r = _case(results, f"flux16/ring/parallel-then-apply/{pattern}")
        assert r["rel"] <= TOL and r["sparse"] == r["cp"] > 0, r
        assert r["ring_shard"] == WORLD * r["sparse"] and r["ring_gathered"] == 0, r


@pytest.mark.parametrize("family", list(FAMILY_PATTERNS))
def test_remove_bit_exact_under_ulysses(results, family):
    assert _case(results, f"{family}/ulysses/remove-bit-exact/dense")["equal"]


def test_head_balance_report():
    from vidattn.context_parallel import head_balance

    rep = head_balance({0: 10.0, 1: 10.0, 2: 1.0, 3: 1.0}, world=2)
    assert rep["rank_work"] == [20.0, 2.0]
    assert rep["imbalance"] == pytest.approx(20.0 / 11.0)
    assert rep["balanced_imbalance"] == pytest.approx(1.0)
    assert sorted(rep["balanced_order"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of world"):
        head_balance({0: 1.0, 1: 1.0, 2: 1.0}, world=2)


def test_cp_order_and_plan_helpers():
    import vidattn
    from vidattn.context_parallel import cp_order, restrict_plan_rows, slice_plan_heads

    lay = vidattn.TokenLayout((2, 4), prefix=2)  # 2 text + 8 image tokens, 2 shards: [t0 i0..i3 | t1 i4..i7]
    canon_of_cp, cp_of_canon = cp_order(lay, 2, True)
    assert canon_of_cp.tolist() == [0, 2, 3, 4, 5, 1, 6, 7, 8, 9]
    assert torch.equal(canon_of_cp[cp_of_canon], torch.arange(10))
    assert cp_order(lay, 2, False) is None
    plan = vidattn.Neighborhood(kernel_size=(1, 3), block_size=2).plan(vidattn.TokenLayout((2, 4)), num_heads=2)
    rows = torch.zeros(8, dtype=torch.bool)
    rows[:4] = True
    r = restrict_plan_rows(plan, rows)
    assert (r.kv_num_blocks[..., 2:] == 0).all() and (r.full_kv_num_blocks[..., 2:] == 0).all()
    assert torch.equal(r.kv_num_blocks[..., :2], plan.kv_num_blocks[..., :2])
    assert slice_plan_heads(plan, [1], 2) is plan or slice_plan_heads(plan, [1], 2).plan_heads == 1


def test_ring_and_ulysses_combined(tmp_path):
    """Ring-2 x Ulysses-2 (diffusers' unified attention) equals the single process (4 processes,
    about 20 s on an idle 2-core machine)."""
    out = tmp_path / "unified.pt"
    mp.spawn(cp_cases.worker, args=(4, _free_port(), str(out), "run_unified_cases"), nprocs=4, join=True)
    res = torch.load(out, weights_only=False)
    for key, r in res.items():
        assert "error" not in r, f"{key}:\n{r['error']}"
        assert r["rel"] <= TOL and r["sparse"] == r["cp"] > 0, (key, r)
    # Neighborhood: per-shard plans inside each Ulysses group (Wan: whole blocks; FLUX: re-blocked)
    for fam in ("wan", "flux"):
        r = res[f"{fam}/neighborhood"]
        assert r["ring_shard"] == 2 * r["sparse"] and r["ring_gathered"] == 0, r


@pytest.mark.parametrize("case", ["neighborhood", "radial", "permuted_grid", "rectified_joint", "flux_neighborhood",
                                  "reblocked_neighborhood", "reblocked_flux", "reblocked_dense"])
def test_ring_shard_plans_merge_to_the_global_plan(case):
    """Single process: the per-(query shard, key shard) plans, run in diffusers' ring order and
    merged with its LSE formula, give the global plan's rows (float64, 2 shards)."""
    import vidattn
    from vidattn.attention import run_plan
    from vidattn.context_parallel import cp_order, ring_shards
    from vidattn.patterns.grid import PermutedGrid
    from vidattn.patterns.radial import Radial
    from vidattn.patterns.rectified import RectifiedSparse

    N, T = vidattn.Neighborhood, vidattn.TokenLayout
    pat, lay, split = {
        "neighborhood": (N(kernel_size=(3, 3, 3), block_size=8), T((4, 4, 8)), False),
        "radial": (Radial(block_size=8, decay_factor=0.5, sink_frames=0), T((4, 4, 4)), False),
        "permuted_grid": (PermutedGrid(block_size=8, num_samples=8, recall=0.5), T((4, 4, 4)), False),
        "rectified_joint": (RectifiedSparse(block_size=8, keep=0.5, method="joint"), T((2, 4, 8)), False),
        "flux_neighborhood": (N(kernel_size=(3, 3), block_size=8), T((8, 8), prefix=16), True),
        # shards that cut plan blocks (24 tokens, blocks of 16; FLUX [2 text + 24 image] per shard)
        "reblocked_neighborhood": (N(kernel_size=(1, 3, 3), block_size=16), T((3, 4, 4)), False),
        "reblocked_flux": (N(kernel_size=(3, 3), block_size=8), T((8, 6), prefix=4), True),
        "reblocked_dense": (vidattn.Dense(), T((3, 4, 4)), False),
    }[case]
    torch.manual_seed(0)
    S, H, R = lay.seq_len, 2, 2
    q, k, v = (torch.randn(1, S, H, 8, dtype=torch.float64) for _ in range(3))
    plan = pat.plan(lay, q, k, v=v, num_heads=H, scale=None, device=q.device) if pat.is_dynamic else \
        pat.plan(lay, num_heads=H, device=q.device)
    ref = run_plan(q, k, v, plan, backend="reference")
    shards = ring_shards(plan, lay, R, R, split, q.device)
    assert shards.reason is None
    cross = shards.sub(0, 1)
    assert int(cross.kv_num_blocks.sum() + cross.full_kv_num_blocks.sum()) > 0  # the other shard matters
    order = cp_order(lay, R, split)
    canon = order[0] if order is not None else torch.arange(S)
    s = S // R
    for r in range(R):
        rows = canon[r * s:(r + 1) * s]
        out = lse = None
        for i in range(R):
            c = (r + i) % R
            cols = canon[c * s:(c + 1) * s]
            o, l = run_plan(q[:, rows], k[:, cols], v[:, cols], shards.sub(r, c), backend="reference", return_lse=True)
            l = l.transpose(1, 2)[..., None]
            o = torch.where(torch.isfinite(l), o, 0)
            if out is not None:  # diffusers' TemplatedRingAttention merge
                o = out - torch.sigmoid(l - lse) * (out - o)
                l = lse - torch.nn.functional.logsigmoid(lse - l)
            out, lse = o, l
        assert (out - ref[:, rows]).abs().max().item() <= 1e-5


def test_ring_shard_plan_refuses_what_lse_merge_cannot_take():
    import vidattn
    from vidattn.context_parallel import ring_shards
    from vidattn.patterns.rectified import RectifiedSparse

    lay = vidattn.TokenLayout((3, 4, 4))
    q = torch.randn(1, 48, 2, 8)
    for method, why in (("authors", "epilogue"), ("joint", "rectification terms and the shards are not whole")):
        plan = RectifiedSparse(block_size=16, keep=0.5, method=method).plan(lay, q, q, v=q, num_heads=2, scale=None,
                                                                             device=q.device)
        assert why in ring_shards(plan, lay, 2, 2, False, "cpu").reason


def test_own_shard_row_check():
    """A query row with no key in its own shard is caught (diffusers' merge would give NaN), a
    row whose only keys are in a partial block the rule admits is not."""
    from vidattn.context_parallel import rows_attend_own_shard
    from vidattn.plan import TokenRule, plan_from_block_mask

    class EvenKeys(TokenRule):  # key index even, never the query itself for odd rows
        def __call__(self, h, q_idx, k_idx):
            return (k_idx % 2 == 0) & (k_idx != q_idx + 1)

    cls = torch.tensor([[[[1, 0], [0, 2]]]], dtype=torch.int8)  # block 0 partial on the diagonal, block 1 full
    plan = plan_from_block_mask(cls, seq_len=8, block_q=4, block_k=4, rule=EvenKeys(), token_density=0.5)
    assert rows_attend_own_shard(plan)  # rows 1 and 3 have no self, but keys 0 / 2
    cls = torch.tensor([[[[0, 1], [0, 2]]]], dtype=torch.int8)
    class NoKeys(TokenRule):
        def __call__(self, h, q_idx, k_idx):
            return k_idx < 0

    plan = plan_from_block_mask(cls, seq_len=8, block_q=4, block_k=4, rule=NoKeys(), token_density=0.5)
    assert not rows_attend_own_shard(plan)  # block 0's rows: one partial block, the rule admits nothing

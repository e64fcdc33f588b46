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


FAMILY_PATTERNS = {"wan": ["neighborhood", "radial", "permuted_grid", "rectified", "dense"],
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


@pytest.mark.parametrize("family", list(FAMILY_PATTERNS))
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_apply_before_enable_parallelism(results, family, mode):
    for pattern in ("neighborhood", "rectified"):
        r = _case(results, f"{family}/{mode}/apply-then-parallel/{pattern}")
        assert r["rel"] <= TOL and r["sparse"] == r["cp"] > 0, r


@pytest.mark.parametrize("family", list(FAMILY_PATTERNS))
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_set_attention_backend_and_set_attn_processor_routes(results, family, mode):
    for backend in ("vidattn", "native"):
        r = _case(results, f"{family}/{mode}/set_attention_backend-{backend}/neighborhood")
        assert r["rel"] <= TOL and r["sparse"] == r["cp"] > 0, r
    r = _case(results, f"{family}/{mode}/set_attn_processor/neighborhood")
    assert r["rel"] <= TOL and r["first"] <= TOL * 10 and r["cp"] > 0, r


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

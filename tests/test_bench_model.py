"""vidattn.bench.model --tiny (``vidattn bench model``, ``benchmarks/model.py``): every model path (Wan,
HunyuanVideo, FLUX) runs on CPU with tiny configs, the reference backend and the profiler breakdown,
and writes the JSON rows/fields; the shared timer and the profiler-range fallback."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and immune to a busy CI machine
    import vidattn.bench.model as mod  # the installed module (benchmarks/model.py is a thin wrapper of it)

    yield mod
    torch.set_num_threads(n)


EXPECTED = {
    "wan": {"neighborhood-90", "neighborhood-75", "radial", "radial-block", "rectified-75", "rectified-90", "grid"},
    "hunyuan": {"neighborhood-90", "neighborhood-75", "radial", "radial-block", "rectified-75", "rectified-90",
                "grid"},
    "flux": {"neighborhood-90", "neighborhood-75", "rectified-75", "rectified-90"},
}


@pytest.mark.parametrize("model", ["wan", "hunyuan", "flux"])
def test_tiny_model_bench_json(bench, model, tmp_path, capsys):
    out = tmp_path / f"{model}.json"
    rc = bench.main(["--tiny", "--model", model, "--breakdown", "--backend", "reference", "--json", str(out),
                     "--cuda-graphs", "neighborhood-90"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["config"]["model"] == model and data["config"]["tiny"] is True
    rows = {r["name"]: r for r in data["results"]}
    assert rows["dense-sdpa-default-eager"]["status"] == "ok"
    assert any(n.startswith("self-attn-") for n in rows)
    assert rows["dense-vidattn-eager"]["density"] == 1.0
    for name in EXPECTED[model]:
        r = rows[f"{name}-eager"]
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["speedup_vs_dense"] > 0
        assert 0 < r["density"] <= 1 and 0 < r["block_density"] <= 1
        b = r["breakdown"]
        assert b["method"] == "cpu-ops" and "error" not in b
        for k in ("wall_ms", "attention_ms", "linear_ms", "other_ms", "attention_share", "sparse_overhead_ms",
                  "sparse_overhead_pct"):
            assert b[k] is not None and b[k] >= 0, (name, k, b)
        assert b["attention_ms"] > 0 and b["linear_ms"] > 0
        assert b["attention_ms"] + b["linear_ms"] <= b["wall_ms"] * 1.05
    for name in ("neighborhood-90", "neighborhood-75"):
        assert rows[f"{name}-eager"]["density"] < 1 and "grid_density" in rows[f"{name}-eager"]
    if model == "flux":  # video-only families are skipped on the 2-D image grid, with a message
        assert not any(n.startswith(("radial", "grid")) for n in rows)
        assert "Radial needs a (T, H, W) video grid" in capsys.readouterr().out
    dense_bd = rows["dense-sdpa-default-eager"]["breakdown"]
    assert dense_bd["sparse_overhead_ms"] is None and dense_bd["attention_ms"] > 0
    # CUDA graphs need CUDA: reported as skipped rows, no crash
    for name in ("dense-cudagraphs", "neighborhood-90-cudagraphs"):
        assert rows[name]["status"] == "skipped" and "CUDA" in rows[name]["reason"]


def test_neighborhood_kernel_targets(bench):
    assert bench.neighborhood_kernel((21, 30, 52), 0.10) == (9, 15, 27)  # RESULTS.md preset
    for grid in ((33, 45, 80), (64, 64), (128, 128), (9, 22, 40)):
        for target in (0.10, 0.25):
            ks = bench.neighborhood_kernel(grid, target)
            assert all(k % 2 == 1 and k <= g for k, g in zip(ks, grid))
            n = 1
            for g in grid:
                n *= g
            dens = 1
            for k in ks:
                dens *= k
            assert abs(dens / n - target) / target < 0.15, (grid, target, ks)


def test_full_size_needs_cuda_or_tiny(bench, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert bench.main(["--model", "hunyuan"]) == 2
    assert bench.main(["--tiny", "--model", "wan", "--frames", "10"]) == 2  # not 4k+1


def test_script_wrapper_is_the_module():
    spec = importlib.util.spec_from_file_location("vidattn_bench_model_wrapper", os.path.join(ROOT, "benchmarks", "model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import vidattn.bench.model as real

    assert mod.main is real.main and mod.neighborhood_kernel is real.neighborhood_kernel


def test_shared_timer_cpu():
    import time

    from vidattn.bench.timing import ModuleTimer, Stopwatch, median, time_ms

    with Stopwatch("cpu") as sw:
        time.sleep(0.02)
    assert 15 < sw.elapsed_ms() < 500
    calls = []
    assert time_ms(lambda: calls.append(time.sleep(0.01)), "cpu", warmup=2, reps=3) >= 9 and len(calls) == 5
    assert median([3, 1, 2]) == 2 and median([4, 1, 2, 3]) == 2.5 and median([]) is None
    from vidattn.bench.timing import loop_ms

    calls.clear()
    assert 9 <= loop_ms(lambda: calls.append(time.sleep(0.01)), "cpu", iters=4, warmup=1) < 200 and len(calls) == 5
    import torch

    lin = torch.nn.Linear(4, 4)
    with ModuleTimer([lin], "cpu") as t:
        lin(torch.zeros(2, 4))
        lin(torch.zeros(2, 4))
        assert t.calls == 2 and t.total_ms() > 0
        t.reset()
        assert t.calls == 0 and t.total_ms() == 0
    assert not lin._forward_hooks and not lin._forward_pre_hooks


def test_profiler_ranges_come_from_the_library():
    """run_plan and the processors emit the ranges the breakdown looks for (no monkeypatching)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import vidattn
    import vidattn.attention as attention
    from vidattn.bench.breakdown import REGION_RUN

    assert attention.PROFILER_RANGES
    layout = vidattn.TokenLayout((2, 4, 4))
    q = torch.randn(1, layout.seq_len, 2, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        vidattn.sparse_attention(q, q, q, vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=16), layout)
    assert REGION_RUN in {e.key for e in prof.key_averages()}

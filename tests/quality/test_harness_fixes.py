"""Regression tests for the quality-harness defects of issue 14 (each failed on the code before the fix)."""
import json
import os
import types

import numpy as np
import pytest
import torch

import vidattn
from vidattn.patterns.neighborhood import Neighborhood
from vidattn.quality import metrics as M
from vidattn.quality.compare import run_comparison
from vidattn.quality.probes import AttentionProbe
from vidattn.quality.reference_model.model import (ReferenceVideoPipeline, build_scheduler, build_transformer,
                                                   load_config)
from vidattn.quality.report import validate_report

CALL = dict(num_frames=2, height=16, width=16, num_inference_steps=3)


def _pipe(num_layers=3):
    cfg = load_config(version=1)
    cfg["transformer"].update(num_layers=num_layers, num_attention_heads=2, ffn_dim=64)
    torch.manual_seed(0)
    return ReferenceVideoPipeline(build_transformer(cfg), build_scheduler(cfg))


@pytest.fixture(scope="module")
def pipe():
    return _pipe()


def _run(pipe, tmp_path, configs, sub, **kw):
    if "seed" not in kw:
        kw.setdefault("seeds", [0, 1])
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return run_comparison(pipe, configs, call_kwargs=CALL, out_dir=str(tmp_path / sub), progress=False,
                          probes=kw.pop("probes", False), **kw)


def test_dense_cache_key_includes_scheduler_config(pipe, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    exact = {"exact": vidattn.Dense()}
    rep1 = _run(pipe, tmp_path, exact, "a", seed=0, write=False)  # the pre-fix API: one seed
    assert not rep1["dense"]["cached"]
    old = pipe.scheduler
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(old.config, shift=3.0)
        rep2 = _run(pipe, tmp_path, exact, "b", seed=0, write=False)
        # a different schedule is a different dense video: never served from the cache
        assert not rep2["dense"]["cached"]
        # an exactly dense run (Dense pattern through the sparse path) scores as identical
        assert rep2["configs"][0]["metrics"]["psnr"] > 60
        rep3 = _run(pipe, tmp_path, exact, "c", seed=0, write=False)
        assert rep3["dense"]["cached"]
    finally:
        pipe.scheduler = old


def test_dense_cache_key_includes_pipeline_class_and_library_versions(pipe, tmp_path, monkeypatch):
    import diffusers

    from vidattn.quality.compare import dense_cache_key

    settings = {"seeds": [0], "call_kwargs": dict(CALL)}
    k0 = dense_cache_key(pipe, settings)
    assert dense_cache_key(pipe, settings) == k0
    monkeypatch.setattr(diffusers, "__version__", diffusers.__version__ + ".x")
    k1 = dense_cache_key(pipe, settings)
    monkeypatch.setattr(torch, "__version__", str(torch.__version__) + ".x")
    k2 = dense_cache_key(pipe, settings)
    assert len({k0, k1, k2}) == 3

    class OtherPipeline(ReferenceVideoPipeline):
        pass

    other = OtherPipeline(pipe.transformer, pipe.scheduler)
    assert dense_cache_key(other, settings) != k2


def test_psnr_whole_video_keeps_identical_frames():
    rng = np.random.default_rng(0)
    ref = rng.random((8, 16, 16, 3))
    test = ref.copy()
    test[7] = np.clip(ref[7] + 0.25 * rng.standard_normal(ref[7].shape), 0, 1)
    mse_frame = ((ref[7] - test[7]) ** 2).mean()
    whole = 10 * np.log10(1.0 / (mse_frame / 8))  # MSE over all frames: 7 of 8 frames have zero error
    assert M.psnr(ref, test) == pytest.approx(whole, rel=1e-9)
    vm = M.video_metrics(ref, test)
    assert vm["psnr"] == pytest.approx(whole, rel=1e-9)
    assert vm["psnr_video"] == pytest.approx(whole, rel=1e-9)
    # the frame mean counts the identical frames (at the cap) instead of dropping them
    frame_only = 10 * np.log10(1.0 / mse_frame)
    assert vm["psnr_frame_mean"] == pytest.approx((7 * M.PSNR_CAP + frame_only) / 8, rel=1e-9)
    assert M.psnr(ref, ref) == M.PSNR_CAP


def test_floors_and_db_above_floor(pipe, tmp_path):
    rng = np.random.default_rng(1)
    dense = rng.random((4, 16, 16, 3))
    fl = M.floor_videos(dense)
    np.testing.assert_allclose(fl["flat"], np.broadcast_to(dense.mean(axis=(1, 2), keepdims=True), dense.shape))
    np.testing.assert_array_equal(fl["frozen"], np.broadcast_to(dense[:1], dense.shape))
    rep = _run(pipe, tmp_path, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, "f")
    floors = rep["dense"]["floors"]
    assert set(floors) == {"flat", "frozen", "unrelated"}
    for f in floors.values():
        assert np.isfinite(f["psnr"]) and -1 <= f["ssim"] <= 1
    m = rep["configs"][0]["metrics"]
    assert m["above_floor_db"] == pytest.approx(m["psnr"] - max(f["psnr"] for f in floors.values()), abs=1e-9)
    assert m["psnr_above"]["flat"] == pytest.approx(m["psnr"] - floors["flat"]["psnr"], abs=1e-9)
    # the flat floor of seed 0 is exactly the PSNR of the frame-mean video against dense
    assert "floor" in open(tmp_path / "f" / "report.html").read()


def test_seeds_batched_mean_and_spread(pipe, tmp_path):
    rep = _run(pipe, tmp_path, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, "s", seeds=[3, 4, 5, 6], use_cache=False,
               save_videos=True)
    assert rep["settings"]["seeds"] == [3, 4, 5, 6] and rep["settings"]["batched"]
    m = rep["configs"][0]["metrics"]
    per = [s["psnr"] for s in m["per_seed"]]
    assert len(per) == 4 and len(set(per)) == 4  # four different samples
    assert m["psnr"] == pytest.approx(np.mean(per)) and m["psnr_std"] == pytest.approx(np.std(per))
    assert m["psnr_min"] == pytest.approx(min(per))
    # the batched dense sample of seed 4 is the sample of a single call with seed 4
    direct = pipe(**CALL, generator=torch.Generator().manual_seed(4)).frames[0]
    with np.load(os.path.join(tmp_path, "s", "videos.npz")) as z:
        np.testing.assert_allclose(z["dense"][1], direct, atol=2e-4)
    # default: at least 4 seeds
    rep = run_comparison(pipe, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, call_kwargs=CALL,
                         out_dir=str(tmp_path / "s2"), progress=False, probes=False, timing=False)
    assert len(rep["settings"]["seeds"]) >= 4


def test_trajectory_and_per_layer_attention_error_in_report(pipe, tmp_path):
    cfgs = {"exact": vidattn.Dense(), "nbr": Neighborhood(kernel_size=(1, 3, 3))}
    rep = _run(pipe, tmp_path, cfgs, "t", probes=True)
    validate_report(json.load(open(tmp_path / "t" / "report.json")))
    by = {c["name"]: c for c in rep["configs"]}
    for c in by.values():
        tr = c["trajectory"]
        assert len(tr["latent_psnr"]) == CALL["num_inference_steps"] == len(tr["x0_psnr"])
    assert min(by["exact"]["trajectory"]["latent_psnr"]) > 60
    nt = by["nbr"]["trajectory"]
    assert max(nt["latent_psnr"]) < 60 and all(np.isfinite(nt["x0_psnr"]))
    # the last predicted-clean estimate is the final sample (sigma = 0)
    assert nt["x0_psnr"][-1] == pytest.approx(nt["latent_psnr"][-1], abs=1e-6)
    pl = by["nbr"]["attention"]["per_layer"]
    assert [p["layer"] for p in pl] == [0, 1, 2] and all(p["rel_l2"] > 0 for p in pl)
    html = open(tmp_path / "t" / "report.html").read()
    assert 'alt="trajectory"' in html and 'alt="attention_error"' in html


def test_probe_layer_ids_are_model_layer_indices_with_dense_layers(pipe):
    vidattn.apply(pipe, Neighborhood(kernel_size=(1, 3, 3)), dense_layers=(0,))
    try:
        with AttentionProbe(sample_heads=1, max_queries=8) as probe:
            pipe(**CALL, generator=torch.Generator().manual_seed(0))
    finally:
        vidattn.remove(pipe)
    assert sorted({r["layer"] for r in probe.records}) == [1, 2]


def test_side_by_side_labelled_and_upscaled(tmp_path):
    import cv2

    from vidattn.quality.report import side_by_side_frames, write_side_by_side_mp4

    rng = np.random.default_rng(0)
    d = rng.random((3, 16, 16, 3)).astype(np.float32)
    fa = side_by_side_frames(d, {"alpha": d})
    fb = side_by_side_frames(d, {"bravo_long_name": d})
    assert fa.shape[1] >= 256 and fa.shape == fb.shape
    assert not np.array_equal(fa, fb)  # only the labels differ: the text is drawn
    n, h, w = write_side_by_side_mp4(str(tmp_path / "x.mp4"), d, {"alpha": d, "b": d})
    cap = cv2.VideoCapture(str(tmp_path / "x.mp4"))
    ok, frame = cap.read()
    assert ok and frame.shape[0] == h >= 256 and n == 3


def test_cache_holds_videos_only_and_no_cache(pipe, tmp_path):
    cache = tmp_path / "c"
    rep = _run(pipe, tmp_path, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, "n1", cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1
    with np.load(cache / files[0]) as z:
        meta = json.loads(str(z["meta"]))
        assert not any("wall" in k or "time" in k or "attention" in k for k in list(z.files) + list(meta))
    rep2 = _run(pipe, tmp_path, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, "n2", cache_dir=str(cache), write=False)
    assert rep2["dense"]["cached"]
    # timings are measured in this process even with a cached dense video
    assert rep2["dense"]["timing"]["step_s"] > 0 and rep2["configs"][0]["timing"]["step_s"] > 0
    assert rep2["configs"][0]["speedup"] is not None
    rep3 = _run(pipe, tmp_path, {"nbr": Neighborhood(kernel_size=(1, 3, 3))}, "n3", cache_dir=str(tmp_path / "c3"),
                use_cache=False, write=False, timing=False)
    assert not rep3["dense"]["cached"] and not os.path.exists(tmp_path / "c3")


def test_quality_attention_stats_in_report(tmp_path, capsys):
    from vidattn.quality.run import cli_entry

    args = types.SimpleNamespace(model="reference", patterns=["neighborhood"], out=str(tmp_path / "q"), sparsity=0.75,
                                 frames=2, height=16, width=16, steps=2, seeds="0,1", device="cpu", quiet=False,
                                 attention_stats=True, no_cache=True)
    assert cli_entry(args) == 0
    rep = json.load(open(tmp_path / "q" / "report.json"))
    from vidattn.quality.reference_model.model import load_config

    tc = load_config()["transformer"]  # the default reference version's layers x heads
    assert rep["attention_stats"]["summary"]["heads"] == tc["num_layers"] * tc["num_attention_heads"]
    assert "local or temporal" in capsys.readouterr().out


def test_presets_fit_the_grid():
    from vidattn.layout import TokenLayout
    from vidattn.quality.presets import fit_pattern, token_density

    for grid in ((3, 4, 4), (2, 8, 8), (16, 24, 24)):
        lay = TokenLayout(grid)
        for fam in ("neighborhood", "radial"):
            dens = []
            for s in (0.5, 0.75, 0.9):
                p = fit_pattern(fam, s, grid)
                p.validate(lay)  # fits the grid (the old fixed presets raised "kernel larger than the grid")
                dens.append(float(p.mask(lay).float().mean()) if lay.seq_len <= 2048 else token_density(p, grid))
                if fam == "neighborhood":  # exact windows: within a few % of the target
                    assert abs((1 - dens[-1]) - s) < 0.07, (grid, s, dens[-1])
            assert dens[0] >= dens[1] >= dens[2], (fam, grid, dens)  # radial: as sparse as the grid allows
        for fam in ("grid", "rectified"):
            p = fit_pattern(fam, 0.75, grid)
            assert p.block_size * 2 <= lay.seq_len


def test_tiny_wan_quality_runs(tmp_path):
    from vidattn.quality.run import run_quality

    rep = run_quality("tiny-wan", ["neighborhood", "radial"], str(tmp_path / "w"), sparsity=0.75, num_frames=5,
                      height=32, width=32, steps=2, seeds=[0], use_cache=False, progress=False, probes=False)
    assert len(rep["configs"]) == 2

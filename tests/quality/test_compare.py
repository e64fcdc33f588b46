import json
import os

import numpy as np
import pytest
import torch

import vidattn
from vidattn.patterns.neighborhood import Neighborhood
from vidattn.quality.compare import run_comparison
from vidattn.quality.report import validate_report
from vidattn.quality.reference_model.model import (ReferenceVideoPipeline, build_scheduler, build_transformer,
                                                   load_config)


@pytest.fixture(scope="module")
def pipe():
    cfg = load_config(version=1)  # the CI-size v1 architecture (v2 is the default version)
    cfg["transformer"].update(num_layers=2, num_attention_heads=2, ffn_dim=64)
    torch.manual_seed(0)
    return ReferenceVideoPipeline(build_transformer(cfg), build_scheduler(cfg))


CALL = dict(num_frames=4, height=16, width=16, num_inference_steps=3)


def test_run_comparison_end_to_end(pipe, tmp_path):
    configs = {"nbr": Neighborhood(kernel_size=(3, 3, 3)), "rect": vidattn.RectifiedSparse(block_size=16),
               "full": Neighborhood(kernel_size=(4, 8, 8))}
    rep = run_comparison(pipe, configs, call_kwargs=CALL, seed=3, out_dir=str(tmp_path / "out"),
                         cache_dir=str(tmp_path / "cache"), progress=False)
    validate_report(json.load(open(tmp_path / "out" / "report.json")))
    for f in ("report.html", "side_by_side.mp4"):
        assert (tmp_path / "out" / f).stat().st_size > 1000
    by = {c["name"]: c for c in rep["configs"]}
    assert rep["dense"]["timing"]["step_s"] > 0 and not rep["dense"]["cached"]
    assert rep["settings"]["seeds"] == [3, 4, 5, 6]
    # the dense video is reproduced by an independent direct call with the same seed
    direct = pipe(**CALL, generator=torch.Generator().manual_seed(3)).frames[0]
    full = by["full"]
    # a neighborhood kernel as large as the grid is dense: identical output, recall 1
    assert full["density"]["token"] == pytest.approx(1.0)
    assert full["metrics"]["psnr"] > 60 and full["attention"]["recall"] == pytest.approx(1.0)
    assert full["attention"]["rel_l2"] < 1e-4
    nbr = by["nbr"]
    assert nbr["density"]["token"] < 0.5 and nbr["sparse_calls"] == 2 * 3
    assert nbr["attention"]["recall"] < 0.9 and nbr["attention"]["rel_l2"] > 1e-3
    assert nbr["metrics"]["psnr"] < full["metrics"]["psnr"]
    assert nbr["latent_errors"]["rel_l2"] > 0
    assert 0 < nbr["attention_share"] < 1
    _check_cached_dense_equals_direct(direct, tmp_path)
    # second run: dense comes from the cache, bit-identical
    rep2 = run_comparison(pipe, {"nbr": configs["nbr"]}, call_kwargs=CALL, seed=3, out_dir=str(tmp_path / "out2"),
                          cache_dir=str(tmp_path / "cache"), progress=False, probes=False)
    assert rep2["dense"]["cached"] and rep2["configs"][0]["attention"] is None
    assert rep2["configs"][0]["metrics"]["psnr"] == pytest.approx(nbr["metrics"]["psnr"], rel=1e-9)
    # pipeline restored: no processors left behind
    again = pipe(**CALL, generator=torch.Generator().manual_seed(3)).frames[0]
    np.testing.assert_array_equal(again, direct)


def _check_cached_dense_equals_direct(direct, tmp_path):
    # the cached dense video equals an independent direct pipeline call with the same seed
    cache = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".npz")]
    assert len(cache) == 1
    cached = np.load(tmp_path / "cache" / cache[0])["videos"][0]  # seed 3 of the batch 3..6
    np.testing.assert_allclose(cached, direct, atol=2e-4)


def test_run_comparison_bad_args(pipe, tmp_path):
    with pytest.raises(ValueError, match="configs"):
        run_comparison(pipe, {}, call_kwargs=CALL, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="dense"):
        run_comparison(pipe, {"dense": Neighborhood(kernel_size=3)}, call_kwargs=CALL, out_dir=str(tmp_path))

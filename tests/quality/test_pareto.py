"""The Pareto runner end to end on reference v1 at a tiny size (CPU)."""
import json

import torch

from vidattn.quality.pareto import main


def test_pareto_runner_tiny(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "p"
    plan = tmp_path / "plan.yaml"
    import vidattn
    from vidattn.patterns.neighborhood import Neighborhood
    from vidattn.pipelines.apply import SparseAttentionConfig

    vidattn.save_plan(SparseAttentionConfig(Neighborhood(kernel_size=(1, 5, 5)), dense_steps=1), str(plan))
    assert main(["--model", "reference", "--version", "1", "--families", "neighborhood", "--levels",
                 "0.5,0.9", "--seeds", "0,1", "--frames", "2", "--height", "16", "--width", "16", "--steps", "2",
                 "--plan", str(plan), "--no-cache", "--quiet", "--timing-repeats", "1", "--out", str(out)]) == 0
    rows = json.load(open(out / "pareto.json"))["rows"]
    names = [r["name"] for r in rows]
    assert names == ["neighborhood@0.5", "neighborhood@0.9", "calibrated"]
    by = {r["name"]: r for r in rows}
    assert by["neighborhood@0.9"]["token_density"] < by["neighborhood@0.5"]["token_density"]
    for r in rows:
        assert r["psnr"] is not None and r["psnr_std"] is not None and r["above_floor_db"] is not None
        assert r["step_speedup"] > 0 and r["attention_speedup"] > 0 and r["run_speedup"] > 0
        assert len(r["latent_psnr_per_step"]) == 2
    assert by["calibrated"]["dense_steps"] == 1
    md = open(out / "pareto.md").read()
    assert "| calibrated |" in md and "python -m vidattn.quality.pareto" in md and "Floors" in md

"""LoRA fine-tuning recipe: trains, saves a diffusers adapter that load_lora_weights reads back
and that reproduces the tuned output (tiny: 1 frame 16x16 on reference v1, 2 steps)."""

import os

import numpy as np
import pytest
import torch

import vidattn

pytest.importorskip("peft")
from vidattn.quality.reference_model.model import load_reference_pipeline, weights_file  # noqa: E402

if not os.path.isfile(weights_file(1)):
    pytest.skip("reference v1 weights not shipped", allow_module_level=True)

SIZE = dict(num_frames=1, height=16, width=16)


def _sample(pipe, pattern, seed=0):
    h = vidattn.apply(pipe, pattern, backend="reference")
    try:
        lat = torch.randn(1, 3, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
        return np.asarray(pipe(prompt=[""], num_inference_steps=2, latents=lat, output_type="np", **SIZE).frames)
    finally:
        h.remove()


def test_finetune_saves_adapter_that_reproduces_tuned_output(tmp_path):
    from vidattn.pipelines.finetune import finetune

    pattern = vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=16)
    pipe = load_reference_pipeline(version=1)
    base = _sample(pipe, pattern)
    res = finetune(pipe, pattern, lora_rank=2, steps=2, lr=2e-2, batch_size=1, num_inference_steps=2,
                   out_dir=str(tmp_path), backend="reference", **SIZE)
    assert res.steps == 2 and len(res.losses) == 2 and all(np.isfinite(res.losses))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    tuned = _sample(pipe, pattern)
    assert np.abs(tuned - base).max() > 1e-4  # the adapter changed the model

    fresh = load_reference_pipeline(version=1)
    fresh.load_lora_weights(str(tmp_path))
    again = _sample(fresh, pattern)
    assert np.abs(again - tuned).max() < 1e-5


def test_finetune_rejects_bad_arguments():
    from vidattn.pipelines.finetune import finetune

    pipe = load_reference_pipeline(version=1)
    pat = vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=16)
    with pytest.raises(ValueError, match="loss"):
        finetune(pipe, pat, loss="l1", steps=1, **SIZE)
    with pytest.raises(ValueError, match="lora_rank"):
        finetune(pipe, pat, lora_rank=0, steps=1, **SIZE)
    with pytest.raises(ValueError, match="data"):
        finetune(pipe, pat, data="/nonexistent/folder", steps=1, **SIZE)


def test_cli_finetune_rejects_unknown_pattern(tmp_path, capsys):
    from vidattn.cli import main

    assert main(["finetune", "--pattern", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "--pattern" in capsys.readouterr().err

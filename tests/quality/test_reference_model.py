import numpy as np
import pytest
import torch

from vidattn.quality.reference_model import data
from vidattn.quality.reference_model.model import WEIGHTS_PATH, load_config, load_reference_pipeline
from vidattn.quality.run import family_pattern


def test_clips_move_and_are_deterministic():
    a = data.make_batch(np.random.default_rng(5), 2, frames=6, height=24, width=20)
    b = data.make_batch(np.random.default_rng(5), 2, frames=6, height=24, width=20)
    assert a.shape == (2, 6, 24, 20, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    # objects move: consecutive frames differ, but far less than unrelated clips do
    step = np.abs(np.diff(a[0], axis=0)).mean()
    other = np.abs(a[0] - a[1]).mean()
    assert 0 < step < other
    with pytest.raises(ValueError, match="frames"):
        data.make_clip(np.random.default_rng(0), frames=0)


def test_missing_weights_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference model weights not found.*train"):
        load_reference_pipeline(weights_path=str(tmp_path / "nope.safetensors"))


def test_trained_reference_pipeline_samples():
    pipe = load_reference_pipeline()
    cfg = load_config()
    assert pipe.transformer.config.num_layers == cfg["transformer"]["num_layers"]
    out = pipe(num_frames=4, height=16, width=16, num_inference_steps=3,
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 4, 16, 16, 3) and np.isfinite(out).all()
    assert 0.0 <= out.min() and out.max() <= 1.0
    out2 = pipe(num_frames=4, height=16, width=16, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0)).frames
    np.testing.assert_array_equal(out, out2)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        pipe(num_frames=4, height=15, width=16, num_inference_steps=1)


def test_family_pattern_presets():
    from vidattn.layout import TokenLayout

    layout = TokenLayout((8, 16, 16))
    d = [family_pattern("neighborhood", s).plan(layout, num_heads=1, device="cpu").token_density
         for s in (0.5, 0.75, 0.9)]
    assert d[0] > d[1] > d[2] and 0.3 < d[0] < 0.5 and d[2] < 0.1
    with pytest.raises(ValueError, match="family"):
        family_pattern("swirl")
    with pytest.raises(ValueError, match="sparsity"):
        family_pattern("radial", 1.5)

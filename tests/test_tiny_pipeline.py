"""The built-in tiny offline pipeline, the generation runner and the video writers."""

import json
import os

import numpy as np
import pytest
import torch

from vidattn.pipelines import tiny
from vidattn.pipelines.generate import ModelError, detect_family, generate, load_pipeline, token_grid
from vidattn.pipelines.video_io import atomic_path, atomic_write_json, frame_grid, read_mp4, write_mp4, write_png_grid

SMALL = dict(num_frames=5, height=32, width=32, steps=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_wan(seed=0)


# ------------------------------------------------------------------------------- tokenizer

def test_shipped_tokenizer_is_the_trained_one():
    """The asset is exactly what train_tokenizer() builds from the built-in corpus (reproducible)."""
    from tokenizers import Tokenizer

    shipped = Tokenizer.from_file(tiny.TOKENIZER_FILE)
    fresh = tiny.train_tokenizer()
    assert shipped.get_vocab() == fresh.get_vocab()
    text = "a red ball bouncing past a zebra, 42 times!"
    assert shipped.encode(text).ids == fresh.encode(text).ids


def test_tokenizer_roundtrip_and_specials():
    tok = tiny.load_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for text in ("a cat walking across a sunny garden", "quantum zebra xylophone", "émoji ✓ 123"):
        ids = tok(text).input_ids
        assert ids[-1] == 1 and 2 not in ids  # ends with </s>, byte-level: never <unk>
        assert tok.decode(ids, skip_special_tokens=True).strip() == text
        assert max(ids) < tiny.VOCAB_SIZE
    enc = tok(["a dog", "a cat"], padding="max_length", max_length=8, return_tensors="pt")
    assert enc.input_ids.shape == (2, 8) and not torch.equal(enc.input_ids[0], enc.input_ids[1])
    assert enc.attention_mask[0].sum() == len(tok("a dog").input_ids)
    with pytest.raises(TypeError, match="corpus"):
        tiny.train_tokenizer(corpus="not a list")


# ------------------------------------------------------------------------------- pipeline

def test_token_grid_matches_transformer_input(pipe):
    """token_grid() equals the patched latent the transformer actually receives."""
    seen = []
    h = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["hidden_states"].shape)),
                                                   with_kwargs=True)
    try:
        generate(pipe, prompt="x", num_frames=9, height=64, width=32, steps=1, seed=0, progress=False)
    finally:
        h.remove()
    B, C, T, H, W = seen[0]
    assert token_grid(pipe, 9, 64, 32) == (T, H // 2, W // 2) == (3, 4, 2)
    assert detect_family(pipe) == "wan"


def test_generate_shapes_timing_and_determinism(pipe):
    r1 = generate(pipe, prompt="a red ball", seed=3, progress=False, **SMALL)
    f = r1["frames"]
    assert f.shape == (5, 32, 32, 3) and f.dtype == np.float32
    assert f.min() >= 0 and f.max() <= 1 and f.std() > 1e-3
    assert len(r1["step_times_s"]) == 2 and all(t > 0 for t in r1["step_times_s"])
    assert r1["total_s"] >= sum(r1["step_times_s"])
    assert r1["plan_density"] == 1.0 and r1["attention_calls"] == 0  # dense SDPA: no vidattn plan ran
    r2 = generate(pipe, prompt="a red ball", seed=3, progress=False, **SMALL)
    np.testing.assert_array_equal(r1["frames"], r2["frames"])
    r3 = generate(pipe, prompt="snow on a forest road", seed=3, progress=False, **SMALL)
    assert np.abs(r3["frames"] - f).mean() > 1e-4  # the prompt steers the output
    r4 = generate(pipe, prompt="a red ball", seed=4, progress=False, **SMALL)
    assert np.abs(r4["frames"] - f).mean() > 1e-4


def test_save_pretrained_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "ckpt"))
    loaded, family = load_pipeline(str(tmp_path / "ckpt"))
    assert family == "wan" and type(loaded).__name__ == "WanPipeline"
    a = generate(pipe, prompt="a boat", seed=1, progress=False, **SMALL)["frames"]
    b = generate(loaded, prompt="a boat", seed=1, progress=False, **SMALL)["frames"]
    np.testing.assert_allclose(a, b, atol=1e-4)  # same weights; CPU kernels may reorder sums (~1e-6)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert loaded.tokenizer("a boat").input_ids == pipe.tokenizer("a boat").input_ids


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(ModelError, match="not reference, reference-v1, reference-v2, tiny, or an existing"):
        load_pipeline(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline", "_diffusers_version": "0.42.1"}))
    with pytest.raises(ModelError, match="cannot load"):
        load_pipeline(str(bad))
    with pytest.raises(ModelError, match="unsupported pipeline class"):
        detect_family(object())


# ------------------------------------------------------------------------------- video io

def test_mp4_roundtrip(tmp_path):
    F, H, W = 5, 32, 48
    yy, xx = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    frames = np.stack([np.stack([yy, xx, np.full_like(xx, i / F)], -1) for i in range(F)]).astype(np.float32)
    path = str(tmp_path / "v.mp4")
    write_mp4(frames, path, fps=8)
    got = read_mp4(path)
    assert got.shape == (F, H, W, 3)
    err = np.abs(got.astype(np.float32) / 255 - frames).mean()
    assert err < 0.03, err  # lossy codec, smooth content: small error
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    with pytest.raises(ValueError, match="frames must be"):
        write_mp4(frames[0], path)


def test_frame_grid_layout(tmp_path):
    frames = np.zeros((5, 2, 3, 3), np.float32)
    for i in range(5):
        frames[i] = i / 4
    g = frame_grid(frames)  # cols = ceil(sqrt(5)) = 3 -> 2 rows
    assert g.shape == (4, 9, 3) and g.dtype == np.uint8
    expect = np.array([[0, 64, 128], [191, 255, 0]], np.uint8)  # round(i/4*255), last cell empty
    np.testing.assert_array_equal(g[::2, ::3, 0], expect)
    import cv2

    write_png_grid(frames, str(tmp_path / "g.png"), cols=5)
    img = cv2.cvtColor(cv2.imread(str(tmp_path / "g.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(img, frame_grid(frames, cols=5))


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    path = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("{half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    atomic_write_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(ValueError):
        atomic_write_json(str(path), {"a": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["report.json"]

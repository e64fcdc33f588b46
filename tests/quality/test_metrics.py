import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vidattn.quality import metrics as M


def _pair(seed, shape, noise):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1)
    return a, b


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), f=st.integers(1, 3), h=st.integers(11, 24), w=st.integers(11, 24),
       c=st.sampled_from([1, 3]), noise=st.floats(0.01, 0.5))
def test_psnr_ssim_match_skimage(seed, f, h, w, c, noise):
    a, b = _pair(seed, (f, h, w, c), noise)
    ref_p = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(f)]
    ref_s = [structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=True) for i in range(f)]
    np.testing.assert_allclose(M.psnr_per_frame(a, b), ref_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(M.ssim_per_frame(a, b), ref_s, rtol=0, atol=1e-4)


def test_uint8_and_torch_inputs_and_grayscale():
    a, b = _pair(1, (2, 16, 16, 3), 0.1)
    au, bu = (a * 255).round().astype(np.uint8), (b * 255).round().astype(np.uint8)
    ref = [peak_signal_noise_ratio(au[i], bu[i], data_range=255) for i in range(2)]
    np.testing.assert_allclose(M.psnr_per_frame(au, bu), ref, atol=1e-6)
    np.testing.assert_allclose(M.psnr_per_frame(torch.from_numpy(a).float(), torch.from_numpy(b).float()),
                               M.psnr_per_frame(a.astype(np.float32), b.astype(np.float32)), atol=1e-9)
    g = [structural_similarity(a[i, ..., 0], b[i, ..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=True) for i in range(2)]
    np.testing.assert_allclose(M.ssim_per_frame(a[..., 0], b[..., 0]), g, atol=1e-4)
    assert np.isinf(M.psnr_per_frame(a, a)).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        M.psnr_per_frame(np.zeros((2, 16, 16, 3)), np.zeros((2, 16, 15, 3)))
    with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
        M.psnr_per_frame(np.zeros((16, 16)), np.zeros((16, 16)))
    with pytest.raises(TypeError, match="ref"):
        M.psnr_per_frame([[0.0]], np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="11x11"):
        M.ssim_per_frame(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


def test_tensor_errors_vs_numpy():
    rng = np.random.default_rng(3)
    r, t = rng.standard_normal((4, 5, 6)), rng.standard_normal((4, 5, 6))
    e = M.tensor_errors(torch.from_numpy(r), t)
    np.testing.assert_allclose(e["mse"], np.mean((t - r) ** 2), rtol=1e-12)
    np.testing.assert_allclose(e["rel_l2"], np.sqrt(((t - r) ** 2).sum() / (r ** 2).sum()), rtol=1e-12)
    np.testing.assert_allclose(e["cosine"], (r * t).sum() / np.sqrt((r ** 2).sum() * (t ** 2).sum()), rtol=1e-12)
    np.testing.assert_allclose(e["max_abs"], np.abs(t - r).max())
    same = M.tensor_errors(r, r)
    assert same["mse"] == 0 and same["rel_l2"] == 0 and abs(same["cosine"] - 1) < 1e-12


def test_temporal_warp_error_translation():
    # a smooth blob translating by 1 px per frame is well explained by flow; shuffled noise is not
    yy, xx = np.mgrid[0:48, 0:48]
    frames = np.stack([np.exp(-((xx - 16 - f) ** 2 + (yy - 24) ** 2) / 40.0) for f in range(5)])[..., None]
    frames = np.repeat(frames, 3, -1)
    smooth = M.temporal_warp_error(frames)
    noise = M.temporal_warp_error(np.random.default_rng(0).random((5, 48, 48, 3)))
    static = M.temporal_warp_error(np.repeat(frames[:1], 5, 0))
    assert static < 1e-6
    # without warping, the naive frame difference is much larger than the warped residual
    naive = np.abs(np.diff(frames, axis=0)).mean()
    assert smooth < 0.5 * naive
    assert noise > 10 * smooth


def test_lpips_reported_skipped_without_weights(monkeypatch):
    monkeypatch.delenv("VIDATTN_LPIPS_WEIGHTS", raising=False)
    r = M.lpips_distance(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))
    assert r["skipped"] is True and "never downloaded" in r["reason"]

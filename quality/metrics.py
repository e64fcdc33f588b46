"""Quality metrics between a dense reference and a sparse result.

Video convention: ``[F, H, W, C]`` (or ``[F, H, W]`` grayscale) as numpy arrays or torch tensors.
Float inputs are taken as-is (expected in [0, 1] with ``data_range=1``); **uint8 inputs are
converted to float64 by dividing by 255** (so ``data_range`` stays 1.0 for both).  Metrics are
computed in float64.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

__all__ = ["PSNR_CAP", "to_video", "psnr_per_frame", "ssim_per_frame", "psnr", "psnr_video", "psnr_frame_mean", "ssim",
           "temporal_warp_error", "tensor_errors", "lpips_distance", "lpips_available", "video_metrics", "floor_videos",
           "floor_metrics", "tensor_psnr", "aggregate"]

#: PSNR reported for identical inputs (MSE = 0), in dB: finite so that means and JSON stay meaningful.
PSNR_CAP = 100.0


def to_video(x: Any, name: str = "video") -> np.ndarray:
    """Convert a video (numpy/torch, float or uint8) ``[F,H,W,C]`` or ``[F,H,W]`` to float64 numpy.

    uint8 is divided by 255; float is kept as is.
    """
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            x = x.numpy() if x.dtype != torch.bfloat16 else x.float().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape [F, H, W, C] or [F, H, W], got {tuple(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must be float or uint8, got dtype {x.dtype}")
    return x.astype(np.float64)


def _pair(ref, test):
    r, t = to_video(ref, "ref"), to_video(test, "test")
    if r.shape != t.shape:
        raise ValueError(f"ref and test must have the same shape, got {r.shape} and {t.shape}")
    return r, t


def psnr_per_frame(ref, test, data_range: float = 1.0) -> np.ndarray:
    """PSNR in dB per frame: ``10 log10(data_range^2 / MSE_f)``; inf where frames are identical.

    Args: ref, test: videos ``[F,H,W,C]``/``[F,H,W]``. Returns float64 ``[F]``.
    """
    r, t = _pair(ref, test)
    mse = ((r - t) ** 2).reshape(r.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


def _gauss_filter(x: np.ndarray, sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """Separable Gaussian filter over the two spatial axes of [H, W] with 'reflect' borders
    (the definition scipy.ndimage.gaussian_filter uses; truncate=3.5 -> 11-tap window)."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = x
    for ax in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[ax] = (r, r)
        p = np.pad(out, pad, mode="symmetric")  # scipy 'reflect' == numpy 'symmetric'
        n = out.shape[ax]
        acc = np.zeros_like(out)
        for i, w in enumerate(k):
            acc += w * np.take(p, np.arange(i, i + n), axis=ax)
        out = acc
    return out


def _ssim_2d(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Gaussian-weighted SSIM (Wang et al. 2004, sigma=1.5, K1=0.01, K2=0.03, sample covariance)
    of two 2-D images, mean over the valid interior (crop of (win-1)/2)."""
    sigma, r = 1.5, int(3.5 * 1.5 + 0.5)
    win = 2 * r + 1
    npix = win * win
    cov_norm = npix / (npix - 1)
    ux, uy = _gauss_filter(a), _gauss_filter(b)
    uxx, uyy, uxy = _gauss_filter(a * a), _gauss_filter(b * b), _gauss_filter(a * b)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:s.shape[0] - pad, pad:s.shape[1] - pad].mean())


def ssim_per_frame(ref, test, data_range: float = 1.0) -> np.ndarray:
    """SSIM per frame (Gaussian window sigma 1.5, mean over channels), float64 ``[F]``.

    Same definition as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=True, channel_axis=-1, data_range=data_range)``; frames must be at
    least 11x11 pixels.
    """
    r, t = _pair(ref, test)
    if r.shape[1] < 11 or r.shape[2] < 11:
        raise ValueError(f"ssim needs frames of at least 11x11 pixels, got {r.shape[1]}x{r.shape[2]}")
    if r.ndim == 3:
        r, t = r[..., None], t[..., None]
    return np.array([np.mean([_ssim_2d(r[f, ..., c], t[f, ..., c], float(data_range)) for c in range(r.shape[-1])])
                     for f in range(r.shape[0])], dtype=np.float64)


def _capped_db(mse: float, data_range: float) -> float:
    if mse <= 0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10.0 * np.log10(float(data_range) ** 2 / mse)))


def psnr_video(ref, test, data_range: float = 1.0) -> float:
    """PSNR of the whole video: ``10 log10(data_range^2 / MSE)`` with the MSE over all frames and
    pixels (identical frames count with zero error). :data:`PSNR_CAP` when identical."""
    r, t = _pair(ref, test)
    return _capped_db(float(((r - t) ** 2).mean()), data_range)


def psnr(ref, test, data_range: float = 1.0) -> float:
    """The PSNR of a video: :func:`psnr_video` (MSE over all frames)."""
    return psnr_video(ref, test, data_range)


def psnr_frame_mean(ref, test, data_range: float = 1.0) -> float:
    """Mean over frames of the per-frame PSNR, identical frames counted at :data:`PSNR_CAP` (never
    dropped)."""
    p = np.minimum(psnr_per_frame(ref, test, data_range), PSNR_CAP)
    return float(p.mean())


def tensor_psnr(ref, test) -> float:
    """PSNR of any two equal-shape tensors (numpy/torch) with ``data_range = max(ref) - min(ref)``
    (the peak-to-peak of the reference), float64; :data:`PSNR_CAP` when identical."""
    r, t = (np.asarray(x.detach().cpu().double().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
            for x in (ref, test))
    if r.shape != t.shape:
        raise ValueError(f"ref and test must have the same shape, got {r.shape} and {t.shape}")
    rng = float(r.max() - r.min()) if r.size else 1.0
    return _capped_db(float(((r - t) ** 2).mean()) if r.size else 0.0, rng if rng > 0 else 1.0)


def ssim(ref, test, data_range: float = 1.0) -> float:
    """Mean over frames of :func:`ssim_per_frame`."""
    return float(ssim_per_frame(ref, test, data_range).mean())


def _gray_u8(frame: np.ndarray) -> np.ndarray:
    import cv2

    f = np.clip(frame, 0.0, 1.0)
    if f.ndim == 3 and f.shape[-1] == 3:
        f = cv2.cvtColor((f * 255).round().astype(np.uint8), cv2.COLOR_RGB2GRAY)
    elif f.ndim == 3:
        f = (f.mean(-1) * 255).round().astype(np.uint8)
    else:
        f = (f * 255).round().astype(np.uint8)
    return f


def temporal_warp_error(video) -> float:
    """Temporal consistency: mean absolute error between frame t+1 and frame t backward-warped
    by OpenCV Farneback optical flow (computed from t+1 to t on grayscale), averaged over pairs.

    Args: video ``[F,H,W,C]``/``[F,H,W]`` in [0,1] (or uint8). Returns float (0 = perfectly
    consistent); 0.0 for a single frame.
    """
    import cv2

    v = np.clip(to_video(video), 0.0, 1.0)
    if v.shape[0] < 2:
        return 0.0
    gray = [_gray_u8(f) for f in v]
    h, w = gray[0].shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    errs = []
    for i in range(v.shape[0] - 1):
        flow = cv2.calcOpticalFlowFarneback(gray[i + 1], gray[i], None, 0.5, 3, 9, 3, 5, 1.1, 0)
        mx, my = xx + flow[..., 0], yy + flow[..., 1]
        src = v[i].astype(np.float32)
        warped = cv2.remap(src, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if warped.ndim == 2 and v.ndim == 4:
            warped = warped[..., None]
        errs.append(float(np.abs(warped - v[i + 1]).mean()))
    return float(np.mean(errs))


def tensor_errors(ref, test) -> Dict[str, float]:
    """Errors of ``test`` against ``ref`` (any equal shapes, numpy or torch, computed in float64):
    ``mse`` = mean((t-r)^2), ``rel_l2`` = ||t-r|| / ||r|| (inf if ||r||=0 and t!=r),
    ``cosine`` = <t,r>/(||t|| ||r||) over the flattened tensors (1.0 if both are zero),
    ``max_abs`` = max |t-r|."""
    def _np(x, n):
        try:
            import torch

            if isinstance(x, torch.Tensor):
                return x.detach().cpu().double().numpy()
        except ImportError:  # pragma: no cover
            pass
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{n} must be a numpy array or torch tensor, got {type(x).__name__}")
        return x.astype(np.float64)

    r, t = _np(ref, "ref").ravel(), _np(test, "test").ravel()
    if r.shape != t.shape:
        raise ValueError(f"ref and test must have the same number of elements, got {r.size} and {t.size}")
    d = t - r
    nr, nt, nd = np.linalg.norm(r), np.linalg.norm(t), np.linalg.norm(d)
    rel = nd / nr if nr > 0 else (0.0 if nd == 0 else float("inf"))
    cos = float(np.dot(r, t) / (nr * nt)) if nr > 0 and nt > 0 else (1.0 if nr == nt == 0 else 0.0)
    return {"mse": float((d ** 2).mean()) if d.size else 0.0, "rel_l2": float(rel), "cosine": cos,
            "max_abs": float(np.abs(d).max()) if d.size else 0.0}


def lpips_available() -> Optional[str]:
    """Path to local LPIPS weights if usable, else None. Looks at $VIDATTN_LPIPS_WEIGHTS and the
    ``lpips`` package (its bundled linear layers need the torchvision backbone weights already cached).
    Never downloads."""
    p = os.environ.get("VIDATTN_LPIPS_WEIGHTS")
    if p and os.path.isfile(p):
        try:
            import lpips  # noqa: F401
            return p
        except ImportError:
            return None
    return None


def lpips_distance(ref, test) -> Dict[str, Any]:
    """LPIPS per frame if weights exist locally, else ``{"skipped": True, "reason": ...}``.

    Returns ``{"skipped": False, "per_frame": [F floats], "mean": float}`` when computed.
    """
    path = lpips_available()
    if path is None:
        return {"skipped": True, "reason": "LPIPS weights not available locally (set VIDATTN_LPIPS_WEIGHTS "
                                           "and install `lpips`); never downloaded"}
    import torch
    import lpips  # type: ignore

    r, t = _pair(ref, test)
    model = lpips.LPIPS(net="alex", pretrained=True, model_path=path, pnet_rand=True, verbose=False)
    with torch.no_grad():
        tr = torch.from_numpy(r).float().permute(0, 3, 1, 2) * 2 - 1
        tt = torch.from_numpy(t).float().permute(0, 3, 1, 2) * 2 - 1
        d = model(tr, tt).flatten().tolist()
    return {"skipped": False, "per_frame": d, "mean": float(np.mean(d))}


def video_metrics(ref, test, data_range: float = 1.0) -> Dict[str, Any]:
    """All video metrics of ``test`` vs ``ref``: psnr/ssim per frame and mean, temporal warp error of
    both, pixel tensor errors, LPIPS (or its skip reason)."""
    pf, sf = np.minimum(psnr_per_frame(ref, test, data_range), PSNR_CAP), ssim_per_frame(ref, test, data_range)
    whole = psnr_video(ref, test, data_range)
    return {
        "psnr_per_frame": [float(x) for x in pf],
        "psnr": whole, "psnr_video": whole, "psnr_frame_mean": float(pf.mean()),
        "ssim_per_frame": [float(x) for x in sf], "ssim": float(sf.mean()),
        "temporal_warp_error": temporal_warp_error(test), "temporal_warp_error_ref": temporal_warp_error(ref),
        "pixel_errors": tensor_errors(to_video(ref), to_video(test)), "lpips": lpips_distance(ref, test),
    }


def floor_videos(dense, unrelated=None) -> Dict[str, np.ndarray]:
    """Trivial stand-ins for ``dense`` ``[F,H,W,C]`` whose scores are the floors a sparse result
    must beat: ``flat`` (each frame replaced by its mean colour), ``frozen`` (the first frame held
    for the whole clip) and, when given, ``unrelated`` (a sample of another seed). float64."""
    d = to_video(dense, "dense")
    out = {"flat": np.broadcast_to(d.mean(axis=(1, 2), keepdims=True), d.shape).copy(),
           "frozen": np.broadcast_to(d[:1], d.shape).copy()}
    if unrelated is not None:
        out["unrelated"] = to_video(unrelated, "unrelated")
    return out


def floor_metrics(dense, unrelated=None, data_range: float = 1.0) -> Dict[str, Dict[str, float]]:
    """``{floor: {"psnr", "ssim"}}`` of each :func:`floor_videos` video against ``dense``."""
    return {k: {"psnr": psnr_video(dense, v, data_range), "ssim": float(ssim_per_frame(dense, v, data_range).mean())}
            for k, v in floor_videos(dense, unrelated).items()}


def aggregate(values) -> Dict[str, float]:
    """``{"mean", "std", "min", "max", "n"}`` of a list of floats (std: population, ddof 0)."""
    a = np.asarray([float(x) for x in values], dtype=np.float64)
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size)}

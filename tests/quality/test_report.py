import base64
import copy
import json
import re

import cv2
import numpy as np
import pytest

from vidattn.quality import metrics as M
from vidattn.quality.report import REPORT_SCHEMA_VERSION, validate_report, write_report


def _run(**kw):
    d = dict(wall_s=1.0, step_times_s=[0.5, 0.5], attention_s=0.4, attention_share=0.4, peak_memory_bytes=None,
             cached=False, temporal_warp_error=0.01)
    d.update(kw)
    return d


def make_report(dense, sparse):
    return {
        "schema_version": REPORT_SCHEMA_VERSION, "created_utc": "2026-11-22T00:00:00Z",
        "model": {"name": "toy", "class": "Toy", "fingerprint": "abc"},
        "settings": {"seed": 0, "seeds": [0], "device": "cpu", "dtype": "float32", "call_kwargs": {"num_frames": 4}},
        "environment": {}, "dense": _run(),
        "configs": [dict(_run(), name="nbr", pattern="Neighborhood()", density={"token": 0.3, "block": 0.5},
                         speedup=1.5, metrics=M.video_metrics(dense, sparse), latent_errors=None,
                         attention={"rel_l2": 0.1, "recall": 0.9, "per_layer": [{"layer": 0, "rel_l2": 0.1}]})],
        "lpips": {"skipped": True, "reason": "no weights"},
    }


@pytest.fixture
def videos():
    rng = np.random.default_rng(0)
    d = rng.random((5, 16, 24, 3)).astype(np.float32)
    return d, np.clip(d + 0.05 * rng.standard_normal(d.shape), 0, 1).astype(np.float32)


def test_write_report_files(tmp_path, videos):
    d, s = videos
    rep = make_report(d, s)
    paths = write_report(str(tmp_path), rep, {"dense": d, "nbr": s})
    back = json.loads(open(paths["json"]).read())
    validate_report(back)
    assert back["configs"][0]["metrics"]["psnr"] == pytest.approx(M.psnr(d, s))
    html = open(paths["html"]).read()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 5  # attention error, trajectory, psnr per frame, speed/quality, frames
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "http://" not in html and "https://" not in html.replace("https://json-schema.org", "")
    cap = cv2.VideoCapture(paths["mp4"])
    n, shape = 0, None
    while True:
        ok, fr = cap.read()
        if not ok:
            break
        n, shape = n + 1, fr.shape
    assert n == 5
    # one row (dense | sparse | diff), each 16 x 24 panel upscaled x16 to 256 px tall, a 25 px label bar on top
    # (281 rows, padded to an even 282)
    assert shape == (282, 24 * 3 * 16, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]


def test_validate_report_rejects(videos):
    d, s = videos
    good = make_report(d, s)
    validate_report(good)
    for mutate, msg in [
        (lambda r: r.pop("dense"), "missing required key 'dense'"),
        (lambda r: r.__setitem__("schema_version", 99), "schema_version"),
        (lambda r: r["configs"][0]["metrics"].__setitem__("psnr", "high"), r"configs\[0\]\.metrics\.psnr"),
        (lambda r: r["configs"][0]["density"].pop("token"), "token"),
        (lambda r: r["dense"].__setitem__("cached", 1), "cached"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(ValueError, match=msg):
            validate_report(bad)
    with pytest.raises(ValueError, match="dict"):
        validate_report([])

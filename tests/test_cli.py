"""`vidattn` CLI end to end, in-process through main([...]) on CPU with tiny sizes."""

import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn import cli
from vidattn.config import load_configs, pattern_from_dict, pattern_to_dict, save_config
from vidattn.pipelines.video_io import browser_video_ext, read_mp4

# the tiny random-weight Wan pipeline (CI speed); 9 frames 64x48 -> token grid (3, 4, 3) = 36 tokens;
# block 16 -> 3x3 blocks, so patterns are really sparse
SMALL = ["--model", "tiny", "--frames", "9", "--height", "64", "--width", "48", "--steps", "2", "--timing-steps", "0",
         "--block-size", "16"]
SMALL_DENSE = ["--model", "tiny", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2"]
VIDEO = "video" + browser_video_ext()  # video.mp4 (H.264) where OpenCV encodes it, else video.webm (VP8)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDATTN_CACHE_DIR", str(tmp_path / "dense-cache"))  # never the user's ~/.cache


TQDM = re.compile(r"(it/s|s/it|step/s|s/step)\]")  # a progress-bar redraw (fast or slow machine)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(argv, capsys, match):
    rc, out, err = run(argv, capsys)
    # ignore progress-bar redraws (tqdm writes "...it/s]" with carriage returns) if any ran before the error
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not TQDM.search(ln) and "\x1b[A" not in ln]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_generate_default_dense(tmp_path, capsys):
    out = tmp_path / "o"
    rc, stdout, err = run(["generate", "--out", str(out)] + SMALL_DENSE, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == sorted(["frames.png", "report.json", VIDEO])
    video = read_mp4(str(out / VIDEO))
    assert video.shape == (5, 32, 32, 3)
    import cv2

    assert cv2.imread(str(out / "frames.png")).shape == (2 * 32, 3 * 32, 3)  # ceil(sqrt 5) = 3 cols, 2 rows
    rep = json.loads((out / "report.json").read_text())
    # default pattern: neighborhood, kernel ~half of each token-grid axis (clamped to the axis)
    assert rep["config"]["pattern"] == "neighborhood" and rep["config"]["kernel_size"] == [2, 2, 2]
    assert rep["family"] == "wan" and rep["settings"]["token_grid"] == [2, 2, 2]
    (r,) = rep["runs"]
    assert r["plan_density"] == 1.0 and r["attention_calls"] > 0 and len(r["step_times_s"]) == 2
    assert "density" in stdout and "neighborhood" in stdout  # summary table


def test_generate_dense_pattern(tmp_path, capsys):
    out = tmp_path / "o"
    rc, stdout, err = run(["generate", "--pattern", "dense", "--compare", "dense", "--out", str(out)] + SMALL_DENSE,
                          capsys)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    (r,) = rep["runs"]  # comparing dense with itself: one run
    assert r["name"] == "dense" and r["attention_calls"] == 0 and r["plan_density"] == 1.0


@pytest.mark.parametrize("pattern,extra,sparse", [
    ("neighborhood", ["--kernel-size", "3,3,3"], True),
    ("radial", ["--decay-factor", "0.5"], True),
    ("grid", ["--recall", "0.5"], False),
    ("rectified", ["--keep", "0.34"], True),
])
def test_generate_every_pattern_compare_dense(tmp_path, capsys, pattern, extra, sparse):
    out = tmp_path / pattern
    rc, stdout, err = run(["generate", "--out", str(out), "--pattern", pattern, "--compare", "dense", "--quiet"]
                          + SMALL + extra, capsys)
    assert rc == 0, err
    assert stdout == ""  # --quiet
    video = read_mp4(str(out / VIDEO))
    assert video.shape == (9, 64, 48, 3)
    rep = json.loads((out / "report.json").read_text())
    gen = rep.get("generate", rep)  # with the harness, the CLI's own record is nested under "generate"
    assert gen["config"]["pattern"] == pattern and gen["config"]["block_size"] == 16
    sp = gen["runs"][-1]
    assert sp["name"] == pattern and sp["attention_calls"] > 0  # the sparse run went through vidattn
    if sparse:
        assert sp["plan_density"] < 0.95
    from vidattn.quality.report import validate_report

    if True:
        validate_report(rep)
        assert read_mp4(str(out / ("side_by_side" + browser_video_ext()))).shape[0] == 9
        assert (out / "report.html").read_text().lstrip().lower().startswith("<!doctype html")
        (c,) = rep["configs"]
        assert c["name"] == pattern and len(c["metrics"]["psnr_per_frame"]) == 9
        if sparse:
            assert c["density"]["token"] == pytest.approx(sp["plan_density"], abs=0.05)
        psnr = c["metrics"]["psnr"]
    if sparse:
        assert 5 < psnr < 200


def test_model_dir_roundtrip(tmp_path, capsys):
    from vidattn.pipelines.tiny import build_tiny_wan

    build_tiny_wan(seed=0).save_pretrained(str(tmp_path / "ckpt"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["generate", "--out", str(a), "--quiet"] + SMALL_DENSE, capsys)[0] == 0
    rc, _, err = run(["generate", "--out", str(b), "--quiet"] + SMALL_DENSE + ["--model", str(tmp_path / "ckpt")], capsys)
    assert rc == 0, err
    assert "Loading" not in err and "it/s" not in err, err  # --quiet: no diffusers loading/step bars
    va, vb = read_mp4(str(a / VIDEO)), read_mp4(str(b / VIDEO))
    assert np.abs(va.astype(int) - vb.astype(int)).max() <= 2  # same weights, same seed
    assert json.loads((b / "report.json").read_text())["family"] == "wan"


def test_config_file_and_json_output(tmp_path, capsys):
    cfg = tmp_path / "nb.yaml"
    cfg.write_text("pattern: neighborhood\nkernel_size: [3, 3, 1]\nblock_size: 16\n")
    out = tmp_path / "o"
    rc, stdout, err = run(["generate", "--config", str(cfg), "--out", str(out), "--json"] + SMALL[:-2], capsys)
    assert rc == 0, err
    printed = json.loads(stdout)
    assert printed == json.loads((out / "report.json").read_text())
    assert printed["config"]["kernel_size"] == [3, 3, 1] and printed["config"]["block_size"] == 16
    # flags override the file
    rc, stdout, err = run(["generate", "--config", str(cfg), "--kernel-size", "1,3,3", "--out", str(out),
                           "--overwrite", "--json"] + SMALL[:-2], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["config"]["kernel_size"] == [1, 3, 3]


CONFIG_EXAMPLES = [
    {"pattern": "dense"},
    {"pattern": "neighborhood", "kernel_size": [3, 5, 5], "dilation": [1, 2, 1], "stride": 1, "is_causal": False},
    {"pattern": "radial", "decay_factor": 0.95, "sink_frames": 0, "dense_near_frames": 1, "block_size": 64},
    {"pattern": "grid", "recall": 0.8, "spatial_frames": 2},
    {"pattern": "rectified", "keep": 0.1, "rectify": False, "mass": 0.9},
]


@pytest.mark.parametrize("cfg", CONFIG_EXAMPLES, ids=lambda c: c["pattern"])
@pytest.mark.parametrize("ext", [".json", ".yaml"])
def test_config_roundtrip(tmp_path, cfg, ext):
    p = pattern_from_dict(cfg)
    d = pattern_to_dict(p)
    for k, v in cfg.items():  # given fields survive (tuples as lists)
        assert d[k] == v
    path = str(tmp_path / ("c" + ext))
    save_config(p, path)
    (loaded,) = load_configs(path)
    assert loaded == d
    assert pattern_from_dict(loaded) == p


@settings(max_examples=20, deadline=None)
@given(k=st.lists(st.integers(1, 9), min_size=3, max_size=3), d=st.integers(1, 3), causal=st.booleans(),
       bs=st.sampled_from([None, 16, 64, 128]))
def test_config_roundtrip_neighborhood_property(k, d, causal, bs):
    import vidattn

    p = vidattn.Neighborhood(kernel_size=tuple(k), dilation=d, is_causal=causal, block_size=bs)
    d1 = pattern_to_dict(p)
    assert json.loads(json.dumps(d1)) == d1
    assert pattern_from_dict(json.loads(json.dumps(d1))) == p
    assert pattern_from_dict(pattern_to_dict(p, only_changed=True)) == p


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'kernel' for pattern 'neighborhood'"):
        pattern_from_dict({"pattern": "neighborhood", "kernel": 3})
    with pytest.raises(ValueError, match="pattern must be one of"):
        pattern_from_dict({"pattern": "sparse"})
    with pytest.raises(ValueError, match="needs a 'pattern' key"):
        pattern_from_dict({"kernel_size": 3})
    bad = tmp_path / "bad.json"
    bad.write_text('{"pattern": "radial", "decay_factor": -1}')
    with pytest.raises(ValueError, match="bad.json: config #0: decay_factor"):
        load_configs(str(bad))
    multi = tmp_path / "multi.yaml"
    multi.write_text("configs:\n  - {pattern: dense}\n  - {pattern: rectified, keep: 0.5}\n")
    assert [c["pattern"] for c in load_configs(str(multi))] == ["dense", "rectified"]


def _bad_args(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    badcfg = tmp_path / "bad.yaml"
    badcfg.write_text("pattern: radial\nwidth: 3\n")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    oq = ["--out", str(tmp_path / "new")]
    o = oq + ["--model", "tiny"]
    return [
        (["generate"], "--out"),
        (["generate", "--bogus-flag"] + o, "vidattn generate: unrecognized arguments: --bogus-flag"),
        (["generate", "--block-size", "-8"] + o, "--block-size must be a positive multiple of 16"),
        (["generate", "--timing-steps", "-1"] + o, "--timing-steps must be >= 0"),
        (["generate", "--out", "/proc/vidattn-x", "--model", "tiny"], "cannot write there"),
        (["generate", "--out", str(full / "x" / "y"), "--model", "tiny"], "is not a folder"),
        (["generate", "--frames", "6"] + o, "--frames must be 4k+1"),
        (["generate", "--height", "30"] + o, "--height must be a positive multiple of 16"),
        (["generate", "--steps", "0"] + o, "--steps must be >= 1"),
        (["generate", "--steps", "2", "--dense-steps", "3"] + o, "--dense-steps"),
        (["generate", "--pattern", "foo"] + o, "invalid choice: 'foo'"),
        (["generate", "--pattern", "neighborhood", "--kernel-size", "a,b"] + o, "--kernel-size must be an int"),
        (["generate", "--pattern", "neighborhood", "--kernel-size", "0"] + o, "kernel_size entries must be >= 1"),
        (["generate", "--pattern", "neighborhood", "--keep", "0.5"] + o, "--keep applies to --pattern rectified"),
        (["generate", "--pattern", "rectified", "--keep", "2"] + o, "keep must be a float in (0, 1]"),
        (["generate", "--pattern", "radial", "--set", "nope=1"] + o, "unknown option 'nope'"),
        (["generate", "--set", "novalue"] + o, "--set expects KEY=VALUE"),
        (["generate", "--config", str(tmp_path / "missing.json")] + o, "config file not found"),
        (["generate", "--config", str(badcfg)] + o, "unknown option 'width'"),
        (["generate", "--config", str(broken)] + o, "cannot parse config file"),
        (["generate", "--pattern", "dense", "--config", str(badcfg)] + o, "unknown option 'width'"),
        (["generate"] + o + ["--model", str(tmp_path / "nockpt")], "not reference, reference-v1, reference-v2, tiny, or an existing"),
        (["generate", "--out", str(full)], "is not empty (use --overwrite"),
        (["generate", "--device", "cuda:0"] + o, "--device cuda"),
        (["generate", "--dtype", "int8"] + o, "invalid choice: 'int8'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench", "kernels"], "choose one of attention, model, timm, parallel"),
        (["quality", "--patterns", "radial,foo"] + oq, "--patterns must be a comma-separated subset"),
        (["quality", "--sparsity", "1.5"] + oq, "--sparsity levels must be in (0, 1)"),
        (["quality", "--sparsity", "x"] + oq, "--sparsity must be a float"),
        (["quality", "--model", str(tmp_path / "nockpt")] + oq, "not reference, tiny-wan, or an existing"),
        (["quality", "--out", str(full)], "is not empty"),
    ]


def test_bad_arguments_exit_2_one_line(tmp_path, capsys):
    import torch

    for argv, match in _bad_args(tmp_path):
        if "--device" in argv and torch.cuda.is_available():
            continue
        assert_usage_error(argv, capsys, match)
    assert not (tmp_path / "new").exists()  # nothing written on bad arguments


def test_pattern_too_large_for_grid(tmp_path, capsys):
    # kernel 5 on a token grid of 2 frames: checked on the real grid after the (fast) tiny load
    assert_usage_error(["generate", "--pattern", "neighborhood", "--kernel-size", "5,1,1", "--out",
                        str(tmp_path / "o")] + SMALL_DENSE, capsys, "kernel_size")
    assert not (tmp_path / "o").exists()


def test_overwrite_and_interrupt(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert run(["generate", "--out", str(out), "--quiet"] + SMALL_DENSE, capsys)[0] == 0
    first = (out / "report.json").read_text()
    assert_usage_error(["generate", "--out", str(out)] + SMALL_DENSE, capsys, "not empty")
    assert (out / "report.json").read_text() == first

    import vidattn.pipelines.video_io as vio

    real = vio.write_png_grid

    def interrupted(frames, path, cols=0):  # Ctrl-C while writing the frame grid
        with vio.atomic_path(path) as tmp:
            open(tmp, "wb").write(b"\x89PNG half")
            raise KeyboardInterrupt

    monkeypatch.setattr(vio, "write_png_grid", interrupted)
    rc, _, err = run(["generate", "--out", str(out), "--overwrite", "--quiet", "--seed", "7"] + SMALL_DENSE, capsys)
    assert rc == 130 and "interrupted" in err
    assert (out / "report.json").read_text() == first  # the old report is untouched, not half-written
    assert sorted(os.listdir(out)) == sorted(["frames.png", "report.json", VIDEO])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".vidattn")]  # no staging folder left
    monkeypatch.setattr(vio, "write_png_grid", real)
    rc, _, err = run(["generate", "--out", str(out), "--overwrite", "--quiet", "--seed", "7"] + SMALL_DENSE, capsys)
    assert rc == 0, err
    assert json.loads((out / "report.json").read_text())["settings"]["seed"] == 7


def test_reference_model(tmp_path, capsys):
    from vidattn.quality.reference_model import model as ref

    argv = ["generate", "--model", "reference-v1", "--pattern", "radial", "--frames", "4", "--height", "16", "--width",
            "16", "--steps", "2", "--block-size", "16", "--quiet", "--out", str(tmp_path / "o")]
    if not os.path.isfile(ref.WEIGHTS_PATH):  # weights not trained yet: a friendly one-line error
        assert_usage_error(argv, capsys, "reference model weights not found")
        return
    rc, _, err = run(argv, capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["family"] == "reference" and rep["settings"]["token_grid"] == [4, 8, 8]
    assert read_mp4(str(tmp_path / "o" / VIDEO)).shape == (4, 16, 16, 3)


def test_quality_tiny(tmp_path, capsys):
    out = tmp_path / "q"
    # the harness fits each family's preset to the model's grid (issue 14): neighborhood runs on 2x2x2 tokens
    rc, _, err = run(["quality", "--model", "tiny-wan", "--patterns", "neighborhood", "--frames", "5", "--height",
                      "32", "--width", "32", "--steps", "2", "--seeds", "0", "--quiet", "--out", str(tmp_path / "n")],
                     capsys)
    assert rc == 0, err
    rc, stdout, err = run(["quality", "--model", "tiny-wan", "--patterns", "rectified", "--frames", "5", "--height",
                           "32", "--width", "32", "--steps", "2", "--out", str(out), "--json"], capsys)
    assert rc == 0, err
    rep = json.loads(stdout)
    from vidattn.quality.report import validate_report

    validate_report(rep)
    assert rep == json.loads((out / "report.json").read_text())
    assert [c["name"] for c in rep["configs"]][0].startswith("rectified")


def test_info(capsys):
    rc, out, err = run(["info"], capsys)
    assert rc == 0, err
    import torch

    assert f"torch       {torch.__version__}" in out
    for name in ("triton", "diffusers", "timm", "xformers", "natten", "reference", "flex"):
        assert name in out
    if not torch.cuda.is_available():
        assert "triton forward kernel: portable (the Gluon kernel needs a Hopper GPU, sm_90)" in out
    assert "triton precisions" in out
    for line in ("fp8        e4m3 Q.K^T, e4m3 P.V: ", "int8       int8 Q.K^T, 16-bit P.V: ",
                 "int8_fp8   int8 Q.K^T, e4m3 P.V: "):
        assert line in out, out


def test_bench_and_quality_dispatch(capsys, monkeypatch, tmp_path):
    import sys

    rc, out, err = run(["bench", "model", "--help"], capsys)
    assert rc == 0 and "vidattn bench model" in out  # the model benchmark's own argparse
    assert "vidattn.bench.model" in sys.modules  # imported as an installed module, not executed from a file
    rc, out, err = run([], capsys)
    assert rc == 0 and "generate" in out
    rc, out, err = run(["generate", "--help"], capsys)
    assert rc == 0 and "--kernel-size" in out and "--compare" in out
    rc, out, err = run(["bench", "--help"], capsys)
    assert rc == 0 and "attention" in out


@pytest.mark.parametrize("precision", ["fp8", "int8", "int8_fp8"])
def test_quality_fp8_needs_a_cuda_device(tmp_path, capsys, precision):
    assert_usage_error(["quality", "--model", "tiny-wan", "--precision", precision, "--device", "cpu",
                        "--out", str(tmp_path / "q")], capsys, f"--precision {precision} needs a CUDA GPU")
    assert not (tmp_path / "q").exists()

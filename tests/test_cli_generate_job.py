"""`vidattn generate` as a new user meets it (issue 20): output set, single sparse run, browser video,
backend that ran, quiet/version/help, cache and honest timing (issue 14 part 5), bench registry (issue 17).

All runs use the tiny random-weight pipeline (`--model tiny`) at 5 frames x 32 x 32 and 1-2 steps.
"""

import errno
import json
import os
import re
import sys

import pytest

import vidattn
from vidattn import cli
from vidattn.pipelines import generate as gen_mod
from vidattn.pipelines import video_io as vio
from vidattn.pipelines.video_io import browser_video_ext, read_video

EXT = browser_video_ext()
TINY = ["--model", "tiny", "--frames", "5", "--height", "32", "--width", "32", "--steps", "2"]
SPARSE = ["--pattern", "rectified", "--keep", "0.5", "--block-size", "16"]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDATTN_CACHE_DIR", str(tmp_path / "dense-cache"))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One `--compare dense` run (no timing, no cache), with every vidattn.apply call recorded."""
    base = tmp_path_factory.mktemp("compared")
    applied = []
    real = vidattn.apply

    def counting(pipe, pattern, **kw):
        applied.append(type(getattr(pattern, "pattern", pattern)).__name__)  # a pattern or a SparseAttentionConfig
        return real(pipe, pattern, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vidattn, "apply", counting)
        rc = cli.main(["generate", "--out", str(base / "o"), "--quiet", "--compare", "dense", "--timing-steps", "0",
                       "--no-cache", "--cache-dir", str(base / "cache")] + TINY + SPARSE)
    assert rc == 0
    return base, applied


@pytest.fixture(scope="module")
def timed_twice(tmp_path_factory):
    """Two identical `--compare dense --timing-steps 2` runs sharing a dense cache: (first, second) reports."""
    base = tmp_path_factory.mktemp("timed")
    argv = ["--quiet", "--compare", "dense", "--timing-steps", "2", "--cache-dir", str(base / "cache")] + TINY + SPARSE
    reps = []
    for name in ("a", "b"):
        assert cli.main(["generate", "--out", str(base / name)] + argv) == 0
        reps.append(json.loads((base / name / "report.json").read_text()))
    return base, reps


TQDM = re.compile(r"(it/s|s/it|step/s|s/step)\]")  # a progress-bar redraw (fast or slow machine)


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err):
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not TQDM.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(gen_mod, "load_pipeline", boom)


# ----------------------------------------------------------------------------- output folder
@pytest.mark.parametrize("where", ["proc", "file"])
def test_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, monkeypatch, where):
    no_model_load(monkeypatch)
    f = tmp_path / "a-file"
    f.write_text("x")
    out = "/proc/vidattn-out" if where == "proc" else str(f / "sub")
    rc, _, err = run(["generate", "--out", out] + TINY, capsys)
    assert rc == 2
    line = one_error_line(err)
    assert ("cannot write there" in line) if where == "proc" else ("is not a folder" in line)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vidattn")]


def test_overwrite_leaves_no_stale_file(tmp_path, capsys, compared):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(compared[0] / "o", out)
    assert {"report.html", "side_by_side" + EXT, "dense" + EXT} <= set(os.listdir(out))
    rc, _, err = run(["generate", "--out", str(out), "--quiet", "--overwrite"] + TINY, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == sorted(["frames.png", "report.json", "video" + EXT])  # nothing stale
    assert json.loads((out / "report.json").read_text())["compare"] is None


def test_overwrite_refuses_a_folder_with_other_files(tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = run(["generate", "--out", str(out), "--overwrite"] + TINY, capsys)
    assert rc == 2 and "not a vidattn generate output" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("failure", ["disk-full", "ctrl-c"])
def test_failed_write_leaves_no_partial_set(tmp_path, capsys, monkeypatch, failure):
    old = tmp_path / "old"
    assert run(["generate", "--out", str(old), "--quiet"] + TINY, capsys)[0] == 0
    before = {p: (old / p).read_bytes() for p in os.listdir(old)}

    def broken(frames, path, cols=0):  # the video is already staged when the frame grid fails
        if failure == "ctrl-c":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vio, "write_png_grid", broken)
    for out, extra in ((tmp_path / "new", []), (old, ["--overwrite"])):
        rc, _, err = run(["generate", "--out", str(out), "--quiet", "--seed", "3"] + extra + TINY, capsys)
        if failure == "ctrl-c":
            assert rc == 130 and "interrupted" in err
        else:
            assert rc == 2 and "No space left on device" in one_error_line(err)
    assert not (tmp_path / "new").exists()  # no partial set
    assert {p: (old / p).read_bytes() for p in os.listdir(old)} == before  # the earlier set is intact
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vidattn")]


def test_ctrl_c_during_compare_leaves_nothing(tmp_path, capsys, monkeypatch):
    import vidattn.quality.compare as qc

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "run_comparison", interrupted)
    rc, _, err = run(["generate", "--out", str(tmp_path / "o"), "--quiet", "--compare", "dense"] + TINY + SPARSE,
                     capsys)
    assert rc == 130 and not (tmp_path / "o").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".vidattn")]


# ----------------------------------------------------------------------------- one sparse run, browser video
def test_compare_runs_the_sparse_config_once(compared):
    base, applied = compared
    assert applied == ["RectifiedSparse"]  # once: the harness's sparse run also feeds the video
    rep = json.loads((base / "o" / "report.json").read_text())
    assert [r["name"] for r in rep["generate"]["runs"]] == ["dense", "rectified"]
    assert read_video(str(base / "o" / ("video" + EXT))).shape == (5, 32, 32, 3)
    assert not rep["dense"]["cached"] and not (base / "cache").exists()  # --no-cache: neither read nor written


def test_videos_play_in_a_browser_and_the_report_embeds_them(compared):
    out = compared[0] / "o"
    codec = vio.video_codec(EXT)
    assert (EXT, codec) in ((".mp4", "avc1"), (".webm", "VP80"))  # never mp4v
    assert not (out / "side_by_side.mp4").exists() or EXT == ".mp4"
    for name in ("video", "dense", "side_by_side"):
        with open(out / (name + EXT), "rb") as fh:
            head = fh.read(64)
        assert (head[:4] == b"\x1a\x45\xdf\xa3") if EXT == ".webm" else (b"ftyp" in head)  # EBML / ISO-BMFF
    html = (out / "report.html").read_text()
    mime = "video/webm" if EXT == ".webm" else "video/mp4"
    assert "<video" in html and f"data:{mime};base64," in html and f'href="side_by_side{EXT}"' in html


def test_write_video_by_extension(tmp_path):
    import numpy as np

    frames = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    assert vio.write_video(frames, str(tmp_path / "a.webm")) == "VP80"
    assert read_video(str(tmp_path / "a.webm")).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match=".mp4 or .webm"):
        vio.write_video(frames, str(tmp_path / "a.avi"))


# ----------------------------------------------------------------------------- backend, quiet, version, help
def test_report_names_the_backend_that_ran(tmp_path, capsys):
    out = tmp_path / "o"
    rc, stdout, err = run(["generate", "--out", str(out), "--backend", "flex"] + TINY + SPARSE, capsys)
    assert rc == 0, err
    b = json.loads((out / "report.json").read_text())["backend"]
    assert b["requested"] == "flex" and b["ran"] in ("flex", "reference") and b["calls"] > 0
    assert f"backend: {b['ran']} (requested flex)" in stdout
    rc, _, err = run(["generate", "--out", str(tmp_path / "d"), "--quiet", "--pattern", "dense"] + TINY, capsys)
    assert json.loads((tmp_path / "d" / "report.json").read_text())["backend"]["ran"] is None  # dense SDPA


def test_backend_recorder_reports_the_library_count():
    import torch

    from vidattn import backends
    from vidattn.pipelines.generate_job import BackendRecorder

    rec = BackendRecorder("triton", "cpu")
    with rec:
        rec._observe(None, None, None, None, None, None)
        backends.ran["flex"] = backends.ran.get("flex", 0) + 1  # what run_plan counts for the backend that ran
    s = rec.summary()
    assert s["ran"] == "flex" and s["source"] == "vidattn.backends.ran" and s["counts"] == {"flex": 1}
    rec = BackendRecorder("auto", torch.device("cpu"))
    with rec:
        pass
    assert rec.summary()["ran"] is None and rec.summary()["calls"] == 0


def test_quiet_prints_nothing_at_all(tmp_path, capfd):
    rc = cli.main(["generate", "--out", str(tmp_path / "o"), "--quiet"] + TINY)
    out, err = capfd.readouterr()  # file-descriptor level: diffusers' and tqdm's bars included
    assert rc == 0, err
    assert out == "" and "it/s" not in err and "%|" not in err, err


def test_version(capsys):
    rc, out, err = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"vidattn {vidattn.__version__}"


def test_every_flag_has_help():
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("generate", "bench", "info"):
        for act in sub.choices[name]._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            assert act.help and act.help.strip(), f"vidattn {name} {act.option_strings or act.dest}: no help text"
    for act in parser._actions:
        assert act.help, act


def test_cache_is_documented_and_never_times(capsys, timed_twice):
    rc, out, _ = run(["generate", "--help"], capsys)
    assert rc == 0 and "~/.cache/vidattn/dense" in out and "--no-cache" in out and "VIDATTN_CACHE_DIR" in out
    base, (first, second) = timed_twice
    assert os.listdir(base / "cache")
    assert not first["dense"]["cached"] and second["dense"]["cached"] and second["generate"]["runs"][0]["cached"]
    t = second["generate"]["timing"]  # measured in this run, whatever the cache held
    assert t["dense"]["steps_timed"] == 2 and t["dense"]["step_ms"] > 0 and t["sparse"]["step_ms"] > 0
    assert t["dense"]["step_ms_all"] != first["generate"]["timing"]["dense"]["step_ms_all"]
    assert second["configs"][0]["speedup"] == pytest.approx(t["step_speedup"])  # not cached dense wall / probed run


def test_speed_column_is_warm_and_amdahl_bounded(timed_twice, capsys):
    from vidattn.commands.generate import _print_table

    rep = timed_twice[1][1]
    t = rep["generate"]["timing"]
    for side in ("dense", "sparse"):
        assert t[side]["warmup_steps"] == 1 and t[side]["steps_timed"] == 2 and len(t[side]["step_ms_all"]) == 2
        assert 0 < t[side]["attention_ms"] < sum(t[side]["step_ms_all"])
    share = t["dense"]["attention_share"]
    assert 0 < share < 1 and t["amdahl_bound"] == pytest.approx(1 / (1 - share))
    assert t["step_speedup"] == pytest.approx(t["dense"]["step_ms"] / t["sparse"]["step_ms"])
    _print_table(rep)
    stdout = capsys.readouterr().out
    assert "Amdahl max" in stdout and "warm-up" in stdout and f"{t['step_speedup']:.2f}x" in stdout


# ----------------------------------------------------------------------------- default model, bench
def test_default_model_is_reference_v2(tmp_path, capsys, monkeypatch):
    from vidattn.quality.reference_model import model as ref

    assert ref.DEFAULT_VERSION == 2 and ref.latest_version() == 2
    assert gen_mod.reference_version("reference") == 2 and gen_mod.reference_version("reference-v1") == 1
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(model, **kw):
        seen["model"] = model
        raise Stop

    monkeypatch.setattr(gen_mod, "load_pipeline", fake_load)
    from vidattn.commands import generate as gen_cmd

    args = cli.build_parser().parse_args(["generate", "--out", str(tmp_path / "o"), "--device", "cpu"])
    with pytest.raises(Stop):
        gen_cmd.run(args)
    assert seen["model"] == "reference"
    cfg = ref.load_config(version=2)["sampling"]["cpu"]  # the CPU size of the v2 config
    assert (args.frames, args.height, args.width, args.steps) == (cfg["num_frames"], cfg["height"], cfg["width"],
                                                                  cfg["num_inference_steps"])
    assert args.prompt == "cat pan"


def test_bench_lists_and_imports_by_module_name(capsys, monkeypatch):
    from vidattn import bench

    rc, out, err = run(["bench"], capsys)
    assert rc == 0
    for name in ("attention", "model", "timm", "parallel"):
        assert f"  {name} " in out
    monkeypatch.setitem(bench.BENCHMARKS, "parallel", ("vidattn.benchmarks.no_such_module", "x"))
    rc, out, err = run(["bench", "parallel"], capsys)
    assert rc == 2 and "is not part of this installation" in one_error_line(err)
    rc, out, err = run(["bench", "model", "--help"], capsys)
    assert rc == 0 and "--tiny" in out and "vidattn.bench.model" in sys.modules


def test_generate_runs_a_plan_file(tmp_path, capsys):
    """`vidattn generate --config plan.yaml` runs a calibrate/save_plan plan file as written."""
    import vidattn
    from vidattn.pipelines.apply import SparseAttentionConfig

    plan = SparseAttentionConfig(vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=32), dense_steps=1,
                                 dense_layers=(0,))
    vidattn.save_plan(plan, str(tmp_path / "plan.yaml"))
    size = ["--height", "64", "--width", "64"]  # a 4 x 4 token grid fits the 3 x 3 window
    rc, _, err = run(["generate", "--out", str(tmp_path / "o"), "--quiet", "--config", str(tmp_path / "plan.yaml")]
                     + TINY + size, capsys)
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    g = rep.get("generate", rep)  # without --compare the generate record is the report itself
    assert g["config"]["pattern"] == "plan"
    assert vidattn.plan_file.config_from_dict(g["config"]["plan"]) == plan
    rc, _, err = run(["generate", "--out", str(tmp_path / "o2"), "--quiet", "--config", str(tmp_path / "plan.yaml"),
                      "--pattern", "radial"] + TINY, capsys)
    assert rc == 2 and "plan file" in err

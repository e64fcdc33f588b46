import pytest

from vidattn.quality.budget import default_grid, select_fastest


def _cfg(name, speedup, psnr, ssim=0.9, density=0.5):
    return {"name": name, "speedup": speedup, "density": {"token": density, "block": density},
            "metrics": {"psnr": psnr, "ssim": ssim}}


def test_select_fastest_meeting_target():
    rep = {"configs": [_cfg("a", 3.0, 25.0), _cfg("b", 2.0, 31.0), _cfg("c", 1.5, 40.0), _cfg("d", 2.0, 35.0, density=0.3)]}
    r = select_fastest(rep, target_psnr=30.0)
    assert r["met"] and r["best"] == "d" and r["beats_dense"]  # b and d tie on speed; d is sparser
    assert [c["name"] for c in r["candidates"]] == ["a", "d", "b", "c", "dense"]
    # nothing sparse meets the target: dense is the answer (it always meets it)
    assert select_fastest(rep, target_psnr=30.0, target_ssim=0.95)["best"] == "dense"
    r = select_fastest(rep, target_psnr=50.0)
    assert r["best"] == "dense" and not r["beats_dense"]


def test_default_grid_has_every_family_and_level():
    g = default_grid()
    assert len(g) == 12 and {n.split("@")[0] for n in g} == {"neighborhood", "radial", "grid", "rectified"}


def test_select_fastest_never_returns_a_plan_slower_than_dense():
    # issue 14: the only plans meeting the target were 11x slower than dense; select_fastest named one of
    # them "fastest". Dense is always a candidate: a plan must beat it, else the answer is dense.
    rep = {"configs": [_cfg("slow", 0.092, 35.0), _cfg("slower", 0.05, 40.0), _cfg("fast_bad", 2.0, 15.0)]}
    r = select_fastest(rep, target_psnr=30.0)
    assert r["best"] == "dense" and r["met"] and r["speedup"] == 1.0
    assert r["candidates"][0]["name"] == "fast_bad" and any(c["name"] == "dense" for c in r["candidates"])
    # unmeasured speed (None) never wins over dense either
    r = select_fastest({"configs": [_cfg("unmeasured", None, 40.0)]}, target_psnr=30.0)
    assert r["best"] == "dense"
    rep["configs"].append(_cfg("good", 1.7, 31.0))
    assert select_fastest(rep, target_psnr=30.0)["best"] == "good"

import pytest

from vidattn.quality.budget import default_grid, select_fastest


def _cfg(name, speedup, psnr, ssim=0.9, density=0.5):
    return {"name": name, "speedup": speedup, "density": {"token": density, "block": density},
            "metrics": {"psnr": psnr, "ssim": ssim}}


def test_select_fastest_meeting_target():
    rep = {"configs": [_cfg("a", 3.0, 25.0), _cfg("b", 2.0, 31.0), _cfg("c", 1.5, 40.0), _cfg("d", 2.0, 35.0, density=0.3)]}
    r = select_fastest(rep, target_psnr=30.0)
    assert r["met"] and r["best"] == "d"  # b and d tie on speed; d is sparser
    assert [c["name"] for c in r["candidates"]] == ["a", "d", "b", "c"]
    assert select_fastest(rep, target_psnr=30.0, target_ssim=0.95)["best"] is None
    assert select_fastest(rep, target_psnr=50.0) == dict(select_fastest(rep, 50.0), met=False, best=None)


def test_default_grid_has_every_family_and_level():
    g = default_grid()
    assert len(g) == 12 and {n.split("@")[0] for n in g} == {"neighborhood", "radial", "grid", "rectified"}

"""vidattn.quality: sparse-vs-dense quality harness (metrics, probes, comparison runner, reports).

Submodules: :mod:`.metrics`, :mod:`.probes`, :mod:`.compare` (``run_comparison``), :mod:`.report`
(schema + writers), :mod:`.budget` (quality-budget selection), :mod:`.calibration` (``calibrate``:
the fastest static plan meeting a quality target), :mod:`.presets` (family presets fitted to a grid),
:mod:`.timing` (in-process step/attention timings), :mod:`.pareto` (the Pareto table runner),
:mod:`.run` (``run_quality`` / ``cli_entry`` used by ``vidattn quality``), :mod:`.reference_model`.
"""

import importlib

_MODULES = ("metrics", "probes", "compare", "report", "budget", "run", "reference_model", "calibration", "presets",
            "timing", "pareto", "attention_stats")

__all__ = list(_MODULES) + ["run_quality", "run_comparison", "cli_entry", "calibrate"]


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in ("run_quality", "cli_entry"):
        return getattr(importlib.import_module(".run", __name__), name)
    if name == "calibrate":
        return importlib.import_module(".calibration", __name__).calibrate
    if name == "run_comparison":
        return importlib.import_module(".compare", __name__).run_comparison
    raise AttributeError(name)

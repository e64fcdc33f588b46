"""vidattn.quality: sparse-vs-dense quality harness (metrics, probes, comparison runner, reports).

Submodules: :mod:`.metrics`, :mod:`.probes`, :mod:`.compare` (``run_comparison``), :mod:`.report`
(schema + writers), :mod:`.budget` (quality-budget search), :mod:`.run` (``run_quality`` /
``cli_entry`` used by ``vidattn quality``), :mod:`.reference_model`.
"""

import importlib

__all__ = ["metrics", "probes", "compare", "report", "budget", "run", "reference_model", "run_quality",
           "run_comparison", "cli_entry"]


def __getattr__(name):
    if name in ("metrics", "probes", "compare", "report", "budget", "run", "reference_model"):
        return importlib.import_module(f".{name}", __name__)
    if name in ("run_quality", "cli_entry"):
        return getattr(importlib.import_module(".run", __name__), name)
    if name == "run_comparison":
        return importlib.import_module(".compare", __name__).run_comparison
    raise AttributeError(name)

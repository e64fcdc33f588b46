"""Benchmark result records: one JSON line per record on stdout, kept for the final JSON file."""

from __future__ import annotations

import json
from typing import Callable, List

__all__ = ["record_logger", "environment_record"]


def record_logger(records: List[dict]) -> Callable[[dict], None]:
    """``log(record)``: append ``record`` (a JSON-serialisable dict) to ``records`` and print it as one
    JSON line (flushed, so a long run can be followed)."""

    def log(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    return log


def environment_record() -> dict:
    """``{"gpu": CUDA device name, "torch": version, "triton": version}``, a benchmark's first record
    (needs a CUDA device and Triton)."""
    import torch
    import triton

    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)

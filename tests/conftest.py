import os
import warnings

import pytest
import torch
from hypothesis import settings

# CI runs the same hypothesis examples every time (no flaky first-seen failures); run with
# HYPOTHESIS_PROFILE=explore locally to draw fresh ones.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message=".*flex_attention.*")


from vidattn_testutils import dense_masked_attention  # noqa: E402,F401  (re-export)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)

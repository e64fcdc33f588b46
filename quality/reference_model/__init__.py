"""The project's small reference video DiT (pixel space, trained on procedural motion clips).

``load_reference_pipeline(device="cpu", dtype=torch.float32)`` returns the trained
:class:`~.model.ReferenceVideoPipeline`; see :mod:`.model` for the design and :mod:`.train` for the
training recipe (``config.json`` holds the exact config and seed).
"""

from .model import ReferenceVideoPipeline, load_reference_pipeline, load_config, build_transformer  # noqa: F401

__all__ = ["ReferenceVideoPipeline", "load_reference_pipeline", "load_config", "build_transformer"]

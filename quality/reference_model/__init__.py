"""The project's reference video DiTs (pixel space; v1 on procedural shapes, v2 on photographs in motion).

``load_reference_pipeline(device="cpu", dtype=torch.float32, version=None)`` returns a trained
:class:`~.model.ReferenceVideoPipeline` (the newest shipped version by default); see :mod:`.model`
for the designs, :mod:`.train` for the training recipe, :mod:`.data` / :mod:`.photo_motion` for the
training clips (``v*/config.json`` holds each version's exact config and seed).
"""

from .model import (ReferenceVideoPipeline, build_transformer, latest_version, load_config,  # noqa: F401
                    load_reference_pipeline)

__all__ = ["ReferenceVideoPipeline", "load_reference_pipeline", "load_config", "build_transformer", "latest_version"]

"""The reference video DiT and its diffusers pipeline.

Choice of pixel path: the model is trained directly in **pixel space** at low resolution
(8 frames x 32 x 32 RGB, values in [-1, 1]).  The "autoencoder" is therefore the identity: the
transformer's ``in_channels = out_channels = 3`` and its (1, 2, 2) patch embedding plays the role of
the VAE's spatial compression.  This keeps decoded frames exactly meaningful (no untrained or
lossy VAE between the model and the pixels), keeps the weights under 20 MB, and still gives a
token grid (8 x 16 x 16 = 2048 tokens) large enough for sparse attention to matter.

The model is unconditional: the cross-attention receives a single all-zero "text" token, so a
prompt is accepted (for CLI compatibility) and ignored.

``ReferenceVideoPipeline.__call__`` follows the diffusers video-pipeline conventions used by the
harness: ``num_frames``, ``height``, ``width``, ``num_inference_steps``, ``generator``,
``output_type`` ("np" -> ``frames`` float32 [B, F, H, W, 3] in [0, 1], "pt" -> [B, F, 3, H, W],
"latent" -> raw [B, 3, F, H, W] in [-1, 1]) and ``callback_on_step_end(pipe, step, t, kwargs)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(HERE, "config.json")
WEIGHTS_PATH = os.path.join(HERE, "reference_transformer.safetensors")

__all__ = ["CONFIG_PATH", "WEIGHTS_PATH", "load_config", "build_transformer", "build_scheduler",
           "ReferenceVideoPipeline", "ReferenceModelOutput", "load_reference_pipeline"]


def load_config(path: str = CONFIG_PATH) -> Dict[str, Any]:
    """The reference model's exact config (architecture, video size, training recipe, seed) as a dict."""
    with open(path) as f:
        return json.load(f)


def build_transformer(cfg: Optional[Dict[str, Any]] = None) -> WanTransformer3DModel:
    """A randomly initialised ``WanTransformer3DModel`` with the reference architecture."""
    cfg = cfg or load_config()
    t = dict(cfg["transformer"])
    t["patch_size"] = tuple(t["patch_size"])
    return WanTransformer3DModel(**t)


def build_scheduler(cfg: Optional[Dict[str, Any]] = None) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler matching the training objective (sigma=1 is pure noise)."""
    cfg = cfg or load_config()
    s = cfg["scheduler"]
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(s["num_train_timesteps"]), shift=float(s["shift"]))


@dataclass
class ReferenceModelOutput(BaseOutput):
    """``frames``: np.ndarray float32 [B, F, H, W, 3] in [0, 1] (output_type "np") or tensor."""
    frames: Union[np.ndarray, torch.Tensor]


class ReferenceVideoPipeline(DiffusionPipeline):
    """Pixel-space flow-matching sampler around the reference ``WanTransformer3DModel``."""

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: WanTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def _context(self, batch: int) -> torch.Tensor:
        p = next(self.transformer.parameters())
        return torch.zeros(batch, 1, self.transformer.config.text_dim, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, num_frames: int = 8, height: int = 32,
                 width: int = 32, num_inference_steps: int = 20, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "np", return_dict: bool = True,
                 num_videos_per_prompt: int = 1,
                 callback_on_step_end: Optional[Callable[..., Dict[str, Any]]] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, **unused: Any):
        """Sample videos. ``prompt`` only sets the batch size (model is unconditional).

        Returns ``ReferenceModelOutput(frames=...)``, see the module docstring for shapes.
        """
        ph, pw = self.transformer.config.patch_size[1:]
        if height % ph or width % pw or height <= 0 or width <= 0:
            raise ValueError(f"height/width must be positive multiples of the patch size {(ph, pw)}, got {height}x{width}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        batch = (len(prompt) if isinstance(prompt, list) else 1) * int(num_videos_per_prompt)
        p = next(self.transformer.parameters())
        device, dtype = p.device, p.dtype
        shape = (batch, self.transformer.config.in_channels, num_frames, height, width)
        if latents is None:
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=gen_dev, dtype=torch.float32).to(device)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        ctx = self._context(batch)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.scheduler.timesteps):
            v = self.transformer(hidden_states=latents.to(dtype), timestep=t.expand(batch).to(device),
                                 encoder_hidden_states=ctx, return_dict=False)[0]
            latents = self.scheduler.step(v.float(), t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                names = callback_on_step_end_tensor_inputs or []
                avail = {"latents": latents}
                out = callback_on_step_end(self, i, t, {k: avail[k] for k in names if k in avail})
                if out:
                    latents = out.pop("latents", latents)
        if output_type == "latent":
            video = latents
        else:
            video = ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
            if output_type == "np":
                video = video.permute(0, 1, 3, 4, 2).float().cpu().numpy()
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return ReferenceModelOutput(frames=video)


def load_reference_pipeline(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                            weights_path: Optional[str] = None) -> ReferenceVideoPipeline:
    """Load the trained reference pipeline (weights shipped in ``quality/reference_model/``).

    Raises:
        FileNotFoundError: with instructions when the weights file does not exist yet.
    """
    from safetensors.torch import load_file

    path = weights_path or WEIGHTS_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"reference model weights not found at {path}. Train them with "
            "`python -m vidattn.quality.reference_model.train --out DIR` (GPU, ~8 min) and copy "
            "DIR/reference_transformer.safetensors there.")
    cfg = load_config()
    transformer = build_transformer(cfg)
    state = load_file(path)
    missing, unexpected = transformer.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference weights do not match the config: missing={missing[:5]}, unexpected={unexpected[:5]}")
    transformer.eval().to(device=device, dtype=dtype)
    pipe = ReferenceVideoPipeline(transformer=transformer, scheduler=build_scheduler(cfg))
    return pipe

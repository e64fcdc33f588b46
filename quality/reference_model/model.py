"""The reference video DiTs and their diffusers pipeline.

Two versions ship, each in its own folder (``v1/``, ``v2/``: ``config.json``, the fp16 weights
``reference_transformer.safetensors``, ``train_log.json``, ``samples.png``):

* **v1** (4.3 M parameters): 4 layers, 8 heads x 32, pixel space at 8 frames x 32 x 32 RGB with
  (1, 2, 2) patches (8 x 16 x 16 = 2,048 tokens), unconditional, trained on procedural shapes
  (:mod:`.data`). Small enough for CPU smoke tests and CI.
* **v2** (7.0 M parameters): 6 layers, 4 heads x 64, pixel space at 16 frames x 96 x 96 RGB with
  (1, 4, 4) patches (16 x 24 x 24 = 9,216 tokens), class-prompt conditioned (``"<scene> <motion>"``,
  :mod:`.photo_motion`) with classifier-free guidance, trained on real photographs under camera
  motion with occluding objects. The fidelity testbed: its attention is meant to be local/temporal
  like a production video DiT's (measure it: :mod:`vidattn.quality.attention_stats`).

Both are diffusers ``WanTransformer3DModel`` (3-D RoPE, text cross-attention) in pixel space: the
"autoencoder" is the identity (``in_channels = out_channels = 3``; the patch embedding plays the
VAE's spatial compression), so decoded frames are exactly meaningful. Prompts become
``encoder_hidden_states`` through a fixed (seeded, untrained) token-embedding table over
:data:`.photo_motion.VOCAB`; the transformer's own text projection learns from it. v1 ignores the
prompt (one all-zero text token).

``ReferenceVideoPipeline.__call__`` follows the diffusers video-pipeline conventions used by the
harness: ``prompt``, ``negative_prompt``, ``guidance_scale`` (v2; cond and uncond run as one batch
of 2B, like a CFG batch), ``num_frames``, ``height``, ``width``, ``num_inference_steps``,
``generator``, ``latents``, ``output_type`` ("np" -> ``frames`` float32 [B, F, H, W, 3] in [0, 1],
"pt" -> [B, F, 3, H, W], "latent" -> raw [B, 3, F, H, W] in [-1, 1]) and
``callback_on_step_end(pipe, step, t, kwargs)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput

HERE = os.path.dirname(os.path.abspath(__file__))
VERSIONS = (1, 2)

__all__ = ["VERSIONS", "DEFAULT_VERSION", "CONFIG_PATH", "WEIGHTS_PATH", "config_file", "weights_file", "latest_version",
           "load_config", "build_transformer", "build_scheduler", "text_table", "ReferenceVideoPipeline",
           "ReferenceModelOutput", "load_reference_pipeline"]


def _check_version(version) -> int:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    return int(version)


def config_file(version: int) -> str:
    """Path of ``v{version}/config.json``."""
    return os.path.join(HERE, f"v{_check_version(version)}", "config.json")


def weights_file(version: int) -> str:
    """Path of ``v{version}/reference_transformer.safetensors`` (may not exist before training)."""
    return os.path.join(HERE, f"v{_check_version(version)}", "reference_transformer.safetensors")


# the version loaded when none is named (v2: the fidelity testbed; v1 stays for CPU smoke tests and CI)
DEFAULT_VERSION = 2


def latest_version() -> int:
    """The version loaded when none is named: :data:`DEFAULT_VERSION` if its weights are shipped,
    else the newest version whose weights are (1 when none are)."""
    if os.path.isfile(weights_file(DEFAULT_VERSION)):
        return DEFAULT_VERSION
    have = [v for v in VERSIONS if os.path.isfile(weights_file(v))]
    return max(have) if have else 1


CONFIG_PATH = config_file(latest_version())
WEIGHTS_PATH = weights_file(latest_version())


def load_config(path: Optional[str] = None, version: Optional[int] = None) -> Dict[str, Any]:
    """A reference model's exact config (architecture, video size, text conditioning, training recipe,
    seed) as a dict: ``path`` if given, else version ``version`` (None: :func:`latest_version`)."""
    if path is None:
        path = config_file(latest_version() if version is None else version)
    with open(path) as f:
        cfg = json.load(f)
    cfg.setdefault("version", 1)
    return cfg


def text_table(cfg: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The fixed token-embedding table of a prompt-conditioned config: float32 ``[len(VOCAB), text_dim]``
    (seeded normal / sqrt(text_dim)); None for an unconditional config (v1)."""
    text = cfg.get("text")
    if not text:
        return None
    from .photo_motion import VOCAB

    dim = int(cfg["transformer"]["text_dim"])
    g = torch.Generator().manual_seed(int(text["embed_seed"]))
    return torch.randn(len(VOCAB), dim, generator=g) / dim ** 0.5


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


class ReferenceVideoPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    """Pixel-space flow-matching sampler around a reference ``WanTransformer3DModel``.

    Args:
        transformer, scheduler: the model and its ``FlowMatchEulerDiscreteScheduler``.
        text_table: float32 ``[len(VOCAB), text_dim]`` prompt-token embeddings (v2), or None for an
            unconditional model (v1: one all-zero text token, prompts only set the batch size).
        default_guidance: guidance scale used when a call gives none (1.0 = no CFG).

    LoRA adapters (``vidattn finetune``) load with ``pipe.load_lora_weights(dir)`` (WanLoraLoaderMixin).
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: WanTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_table: Optional[torch.Tensor] = None, default_guidance: float = 1.0):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.text_table = text_table
        self.default_guidance = float(default_guidance)

    def encode_prompt(self, prompts: List[str]) -> torch.Tensor:
        """``encoder_hidden_states`` for ``prompts``: ``[len(prompts), L, text_dim]`` in the
        transformer's dtype (L = 2 prompt tokens for v2, 1 zero token for v1)."""
        p = next(self.transformer.parameters())
        if self.text_table is None:
            return torch.zeros(len(prompts), 1, self.transformer.config.text_dim, device=p.device, dtype=p.dtype)
        from .photo_motion import tokenize

        ids = torch.tensor([tokenize(x) for x in prompts], dtype=torch.long)
        return self.text_table[ids].to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str], None] = None, num_frames: int = 8, height: int = 32,
                 width: int = 32, num_inference_steps: int = 20, generator: Optional[torch.Generator] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "np", return_dict: bool = True,
                 num_videos_per_prompt: int = 1, guidance_scale: Optional[float] = None,
                 negative_prompt: Union[str, List[str], None] = None,
                 callback_on_step_end: Optional[Callable[..., Dict[str, Any]]] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, **unused: Any):
        """Sample videos. ``prompt`` (a string or a list: the batch) conditions v2 and sets the batch
        size; ``guidance_scale > 1`` runs classifier-free guidance against ``negative_prompt``
        (default: the empty, unconditional prompt) in one transformer call of batch 2B.

        Returns ``ReferenceModelOutput(frames=...)``, see the module docstring for shapes.
        """
        ph, pw = self.transformer.config.patch_size[1:]
        if height % ph or width % pw or height <= 0 or width <= 0:
            raise ValueError(f"height/width must be positive multiples of the patch size {(ph, pw)}, got {height}x{width}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt or ""]
        prompts = [p for p in prompts for _ in range(int(num_videos_per_prompt))]
        batch = len(prompts)
        gs = self.default_guidance if guidance_scale is None else float(guidance_scale)
        cfg = gs > 1.0 and self.text_table is not None
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
        ctx = self.encode_prompt(prompts)
        if cfg:
            neg = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else [negative_prompt or ""] * batch
            if len(neg) != batch:
                raise ValueError(f"negative_prompt must be a string or a list of {batch}, got {len(neg)} entries")
            ctx = torch.cat([ctx, self.encode_prompt(neg)])
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.scheduler.timesteps):
            x = latents.to(dtype)
            if cfg:
                x = torch.cat([x, x])
            v = self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]).to(device),
                                 encoder_hidden_states=ctx, return_dict=False)[0].float()
            if cfg:
                v_c, v_u = v.chunk(2)
                v = v_u + gs * (v_c - v_u)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]
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
                            weights_path: Optional[str] = None, version: Optional[int] = None) -> ReferenceVideoPipeline:
    """Load a trained reference pipeline (weights shipped in ``quality/reference_model/v*/``).

    Args:
        version: 1 or 2 (None: :func:`latest_version`, the newest shipped).
        weights_path: load these weights instead of the shipped ones (same version's config).

    Raises:
        FileNotFoundError: with instructions when the weights file does not exist yet.
    """
    from safetensors.torch import load_file

    version = latest_version() if version is None else _check_version(version)
    path = weights_path or weights_file(version)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"reference model weights not found at {path}. Train them with "
            f"`python -m vidattn.quality.reference_model.train --version {version} --out DIR` (GPU) and copy "
            "DIR/reference_transformer.safetensors there.")
    cfg = load_config(version=version)
    transformer = build_transformer(cfg)
    state = load_file(path)
    missing, unexpected = transformer.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference weights do not match the config: missing={missing[:5]}, unexpected={unexpected[:5]}")
    transformer.eval().to(device=device, dtype=dtype)
    pipe = ReferenceVideoPipeline(transformer=transformer, scheduler=build_scheduler(cfg), text_table=text_table(cfg),
                                  default_guidance=float(cfg.get("sampling", {}).get("guidance_scale", 1.0)))
    pipe.reference_version = version
    return pipe

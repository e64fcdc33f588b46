"""LoRA fine-tuning of a diffusers video transformer with sparse attention in the loop.

Training-free sparsity loses quality at high sparsity; a few hundred steps of low-rank adaptation
of the attention projections with the sparse pattern active win much of it back (the recipe of
VSA / SLA / Radial Attention's LoRA). This module is that recipe for any pipeline vidattn can patch:

* adapters: ``peft`` LoRA (rank ``lora_rank``, ``lora_alpha = lora_rank``) on the attention
  projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of every attention module; everything else
  frozen;
* sparse attention in the loop: :func:`vidattn.apply` on the pipeline (its backend computes the
  gradient: reference autograd on CPU, the Triton backward on CUDA);
* objective, flow matching with the pipeline's own ``FlowMatchEulerDiscreteScheduler`` convention:
  ``x_t = (1 - sigma) x0 + sigma * noise`` with ``sigma`` drawn from the scheduler's inference sigmas
  (``scheduler.set_timesteps(num_inference_steps)``; ``timestep = scheduler.timesteps``), and either

  - ``loss="distill"`` (default): MSE between the sparse student's prediction and the *dense*,
    un-adapted model's prediction on the same ``x_t`` (a frozen copy of the transformer is the
    teacher); this targets exactly the error sparsity introduces, and is what the measured numbers
    in the report use;
  - ``loss="flow"``: MSE to the data velocity ``noise - x0``;
* data ``x0``: the reference model's own generator (``data="reference"``: the procedural clips of
  :mod:`vidattn.quality.reference_model.data` for v1, the photo-motion clips for v2) or a folder of
  ``.mp4`` files read with OpenCV (``data="/path/to/folder"``), resized to the training size and
  mapped to [-1, 1]. Pixel-space models only (the reference models): for a latent model the clips
  would need its VAE, which this recipe does not run (``loss="distill"`` with
  ``data="noise"`` needs no data at all: ``x0`` is then drawn as Gaussian noise).

The adapter is saved in the diffusers/peft format (``pytorch_lora_weights.safetensors``) that
``pipe.load_lora_weights(out_dir)`` loads (the pipeline class needs a diffusers LoRA loader mixin:
``ReferenceVideoPipeline`` has ``WanLoraLoaderMixin``, as do diffusers' Wan pipelines).

Dynamic patterns' block *selection* (RectifiedSparse, PermutedGrid, Clustered) is not
differentiable: gradients flow through the attention over the selected blocks (and through the
rectification terms) with the selection held fixed.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .video_io import iter_video_frames

__all__ = ["finetune", "FinetuneResult", "add_lora", "save_adapter", "evaluate_psnr", "reference_clips",
           "video_folder_clips", "LORA_TARGETS"]

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: ``losses`` per step, ``steps`` run, ``wall_s`` of the training
    loop, ``psnr_before`` / ``psnr_after`` (mean over ``eval_seeds`` of PSNR vs the dense model, dB;
    None when not evaluated) with the per-seed lists, and ``adapter_dir`` (None if not saved)."""

    losses: List[float] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0
    psnr_before: Optional[float] = None
    psnr_after: Optional[float] = None
    psnr_before_per_seed: List[float] = field(default_factory=list)
    psnr_after_per_seed: List[float] = field(default_factory=list)
    adapter_dir: Optional[str] = None
    config: Dict = field(default_factory=dict)

    def as_dict(self) -> Dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------ data
def reference_clips(version: int, batch_size: int, frames: int, height: int, width: int,
                    seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless float32 ``[batch_size, 3, frames, height, width]`` clips in [-1, 1] from the reference
    model's data generator (v1: procedural shapes; v2: photographs under camera motion)."""
    rng = np.random.default_rng(seed)
    while True:
        if int(version) >= 2:
            from vidattn.quality.reference_model.photo_motion import make_batch

            x, _ = make_batch(rng, batch_size, frames, height, width)
        else:
            from vidattn.quality.reference_model.data import make_batch

            x = make_batch(rng, batch_size, frames, height, width)
        yield torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3).mul(2).sub(1)


def _read_mp4(path: str, frames: int, height: int, width: int, rng: np.random.Generator) -> Optional[np.ndarray]:
    import cv2

    out = [cv2.resize(fr, (width, height), interpolation=cv2.INTER_AREA) for fr in iter_video_frames(path)]
    if len(out) < frames:
        return None
    s = int(rng.integers(0, len(out) - frames + 1))
    return np.stack(out[s:s + frames]).astype(np.float32) / 255.0


def video_folder_clips(folder: str, batch_size: int, frames: int, height: int, width: int,
                       seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless float32 ``[batch_size, 3, frames, height, width]`` clips in [-1, 1]: random windows of
    ``frames`` consecutive frames from the ``.mp4`` files in ``folder`` (OpenCV, resized to
    ``height`` x ``width``).

    Raises:
        ValueError: no ``.mp4`` in ``folder`` has at least ``frames`` frames.
    """
    files = sorted(glob.glob(os.path.join(folder, "**", "*.mp4"), recursive=True))
    if not files:
        raise ValueError(f"data folder {folder!r} holds no .mp4 files")
    rng = np.random.default_rng(seed)
    usable = [f for f in files if _read_mp4(f, frames, height, width, rng) is not None]
    if not usable:
        raise ValueError(f"no .mp4 in {folder!r} has at least {frames} frames")
    while True:
        clips = [_read_mp4(usable[int(rng.integers(len(usable)))], frames, height, width, rng) for _ in range(batch_size)]
        x = torch.from_numpy(np.stack(clips))  # [B, F, H, W, 3]
        yield x.permute(0, 4, 1, 2, 3).mul(2).sub(1)


def _noise_clips(batch_size, channels, frames, height, width, seed) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(batch_size, channels, frames, height, width, generator=g)


# ------------------------------------------------------------------------------------------ LoRA
def add_lora(transformer, rank: int, targets: Sequence[str] = LORA_TARGETS, adapter_name: str = "default") -> int:
    """Add a peft LoRA adapter (rank ``rank``, alpha = rank, B initialised to 0 so the model is
    unchanged) on the ``targets`` linear layers of every attention module of ``transformer`` and
    freeze everything else. Returns the number of trainable parameters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank must be an int >= 1, got {rank!r}")
    from peft import LoraConfig

    transformer.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(targets))
    transformer.add_adapter(cfg, adapter_name=adapter_name)
    n = 0
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            n += p.numel()
    if n == 0:
        raise ValueError(f"no linear layer named {list(targets)} found in {type(transformer).__name__}")
    return n


def save_adapter(pipe, out_dir: str) -> str:
    """Save the transformer's LoRA adapter as ``out_dir/pytorch_lora_weights.safetensors`` in the
    diffusers format ``pipe.load_lora_weights(out_dir)`` reads. Returns ``out_dir``.

    Raises:
        TypeError: the pipeline class has no diffusers LoRA loader mixin (``save_lora_weights``).
    """
    from peft.utils import get_peft_model_state_dict

    if not hasattr(type(pipe), "save_lora_weights"):
        raise TypeError(f"{type(pipe).__name__} has no save_lora_weights/load_lora_weights (add a diffusers "
                        "LoRA loader mixin such as WanLoraLoaderMixin to the pipeline class)")
    state = get_peft_model_state_dict(pipe.transformer)
    os.makedirs(out_dir, exist_ok=True)
    type(pipe).save_lora_weights(out_dir, transformer_lora_layers=state, safe_serialization=True)
    return out_dir


# ------------------------------------------------------------------------------------------ eval
def _seed_latents(pipe, seeds, frames, height, width) -> torch.Tensor:
    c = pipe.transformer.config.in_channels
    return torch.cat([torch.randn(1, c, frames, height, width, generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds])


def _sample(pipe, latents, steps, frames, height, width) -> np.ndarray:
    out = pipe(prompt=[""] * latents.shape[0], num_frames=frames, height=height, width=width,
               num_inference_steps=steps, latents=latents, output_type="np")
    return np.asarray(out.frames)


def evaluate_psnr(pipe, pattern, dense_frames: np.ndarray, latents: torch.Tensor, *, num_inference_steps: int,
                  frames: int, height: int, width: int, backend: str = "auto") -> List[float]:
    """PSNR (dB) per sample of ``pipe`` sampled with ``pattern`` (current adapters) against
    ``dense_frames`` (float32 ``[N, F, H, W, 3]`` in [0, 1], the dense model from the same
    ``latents`` ``[N, C, F, H, W]``)."""
    import vidattn
    from vidattn.quality.metrics import psnr

    h = vidattn.apply(pipe, pattern, backend=backend)
    try:
        test = _sample(pipe, latents, num_inference_steps, frames, height, width)
    finally:
        h.remove()
    return [psnr(dense_frames[i], test[i]) for i in range(len(test))]


# ------------------------------------------------------------------------------------------ train
def _video_size(pipe, num_frames, height, width):
    ver = getattr(pipe, "reference_version", None)
    if ver is not None:
        from vidattn.quality.reference_model.model import load_config

        vid = load_config(version=ver)["video"]
        return num_frames or vid["frames"], height or vid["height"], width or vid["width"]
    if not (num_frames and height and width):
        raise ValueError("num_frames, height and width are required for a non-reference pipeline")
    return num_frames, height, width


def _data_iter(pipe, data, batch_size, frames, height, width, seed):
    if isinstance(data, str) and data == "reference":
        ver = getattr(pipe, "reference_version", None)
        if ver is None:
            raise ValueError("data='reference' needs a reference-model pipeline; pass a folder of .mp4 files")
        return reference_clips(ver, batch_size, frames, height, width, seed)
    if isinstance(data, str) and data == "noise":
        return _noise_clips(batch_size, pipe.transformer.config.in_channels, frames, height, width, seed)
    if isinstance(data, str) and os.path.isdir(data):
        return video_folder_clips(data, batch_size, frames, height, width, seed)
    if callable(data):
        return iter(data())
    raise ValueError(f"data must be 'reference', 'noise', a folder of .mp4 files or a callable, got {data!r}")


def finetune(pipe, pattern, *, lora_rank: int = 8, steps: int = 100, lr: float = 1e-3, data="reference",
             batch_size: int = 2, loss: str = "distill", num_frames: Optional[int] = None,
             height: Optional[int] = None, width: Optional[int] = None, num_inference_steps: Optional[int] = None,
             time_budget_s: Optional[float] = None, eval_seeds: Sequence[int] = (), out_dir: Optional[str] = None,
             backend: str = "auto", seed: int = 0, grad_clip: float = 1.0, targets: Sequence[str] = LORA_TARGETS,
             log: Optional[Callable[[str], None]] = None) -> FinetuneResult:
    """Fine-tune LoRA adapters of ``pipe.transformer`` with ``pattern`` active (see module docstring).

    Args:
        pipe: a diffusers pipeline with ``.transformer`` and a ``FlowMatchEulerDiscreteScheduler``
            (e.g. :func:`vidattn.quality.reference_model.load_reference_pipeline`); modified in
            place (adapters added and left enabled; sparse attention removed at the end).
        pattern: a vidattn pattern (the sparse attention trained with).
        lora_rank: LoRA rank (alpha = rank). steps: optimizer steps (upper bound with ``time_budget_s``).
        lr: AdamW learning rate (cosine decay to 10% over ``steps``).
        data: ``"reference"``, ``"noise"`` (distillation only), a folder of ``.mp4``, or a callable
            returning an iterator of float ``[B, C, F, H, W]`` clips in [-1, 1].
        batch_size: clips per step. loss: ``"distill"`` (dense teacher) or ``"flow"`` (data velocity).
        num_frames, height, width: training / evaluation video size (reference models: their config).
        num_inference_steps: the scheduler's inference steps whose sigmas training samples
            (default: the reference config's sampling steps, else 20) and the evaluation uses.
        time_budget_s: stop training after this many seconds (checked every step).
        eval_seeds: if given, PSNR vs dense of the sparse pipeline before and after, over these seeds.
        out_dir: if given, the adapter is saved there (:func:`save_adapter`).
        backend: vidattn backend for the sparse attention.
        log: optional ``print``-like callback for progress lines.
    Returns:
        :class:`FinetuneResult`.
    """
    import vidattn

    if loss not in ("distill", "flow"):
        raise ValueError(f"loss must be 'distill' or 'flow', got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if loss == "flow" and isinstance(data, str) and data == "noise":
        raise ValueError("data='noise' only makes sense with loss='distill'")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"lora_rank must be an int >= 1, got {lora_rank!r}")
    log = log or (lambda s: None)
    frames, height, width = _video_size(pipe, num_frames, height, width)
    if num_inference_steps is None:
        ver = getattr(pipe, "reference_version", None)
        num_inference_steps = 20
        if ver is not None:
            from vidattn.quality.reference_model.model import load_config

            num_inference_steps = int(load_config(version=ver).get("sampling", {}).get("num_inference_steps", 20))
    tr = pipe.transformer
    device = next(tr.parameters()).device
    dtype = next(tr.parameters()).dtype
    res = FinetuneResult(config=dict(lora_rank=lora_rank, steps=steps, lr=lr, batch_size=batch_size, loss=loss,
                                     frames=frames, height=height, width=width,
                                     num_inference_steps=num_inference_steps, pattern=repr(pattern),
                                     data=data if isinstance(data, str) else "callable", seed=seed))
    it = _data_iter(pipe, data, batch_size, frames, height, width, seed)  # validates ``data`` before any work
    vidattn.remove(pipe)
    latents = dense = None
    if eval_seeds:
        latents = _seed_latents(pipe, eval_seeds, frames, height, width)
        t_eval = time.time()
        dense = _sample(pipe, latents, num_inference_steps, frames, height, width)
        log(f"dense reference sampled ({time.time() - t_eval:.0f} s)")
        res.psnr_before_per_seed = evaluate_psnr(pipe, pattern, dense, latents, num_inference_steps=num_inference_steps,
                                                 frames=frames, height=height, width=width, backend=backend)
        res.psnr_before = float(np.mean(res.psnr_before_per_seed))
        log(f"before: PSNR vs dense {res.psnr_before:.2f} dB {['%.2f' % p for p in res.psnr_before_per_seed]}")

    teacher = None
    if loss == "distill":
        teacher = copy.deepcopy(tr).eval().requires_grad_(False)
    ntrain = add_lora(tr, lora_rank, targets)
    log(f"LoRA rank {lora_rank}: {ntrain} trainable parameters")
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, max(steps, 1)) / max(steps, 1))))
    fm = copy.deepcopy(pipe.scheduler)
    fm.set_timesteps(num_inference_steps)
    sigmas = fm.sigmas[:-1].float()  # the inference trajectory's noise levels (last = 0 is the end point)
    timesteps = fm.timesteps.float()
    gen = torch.Generator().manual_seed(seed + 1)
    ctx = pipe.encode_prompt([""] * batch_size) if hasattr(pipe, "encode_prompt") else None
    handle = vidattn.apply(pipe, pattern, backend=backend)
    tr.train()
    t0 = time.time()
    try:
        for step in range(steps):
            if time_budget_s is not None and time.time() - t0 > time_budget_s:
                log(f"time budget {time_budget_s:.0f} s reached after {step} steps")
                break
            x0 = next(it).to(device, torch.float32)
            b = x0.shape[0]
            idx = torch.randint(0, len(sigmas), (b,), generator=gen)
            sig = sigmas[idx].to(device)[:, None, None, None, None]
            noise = torch.randn(x0.shape, generator=gen).to(device)
            xt = (1 - sig) * x0 + sig * noise
            t = timesteps[idx].to(device)
            c = ctx if ctx is not None and ctx.shape[0] == b else pipe.encode_prompt([""] * b)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(hidden_states=xt.to(dtype), timestep=t, encoder_hidden_states=c,
                                     return_dict=False)[0].float()
            else:
                target = noise - x0
            pred = tr(hidden_states=xt.to(dtype), timestep=t, encoder_hidden_states=c, return_dict=False)[0].float()
            lval = torch.nn.functional.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            lval.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            res.losses.append(float(lval.detach()))
            res.steps = step + 1
            if step % 10 == 0 or step == steps - 1:
                log(f"step {step}: loss {res.losses[-1]:.5f} ({time.time() - t0:.0f} s)")
    finally:
        res.wall_s = time.time() - t0
        handle.remove()
        tr.eval()
        del teacher
    if out_dir:
        res.adapter_dir = save_adapter(pipe, out_dir)
    if eval_seeds:
        res.psnr_after_per_seed = evaluate_psnr(pipe, pattern, dense, latents, num_inference_steps=num_inference_steps,
                                                frames=frames, height=height, width=width, backend=backend)
        res.psnr_after = float(np.mean(res.psnr_after_per_seed))
        log(f"after: PSNR vs dense {res.psnr_after:.2f} dB {['%.2f' % p for p in res.psnr_after_per_seed]}")
    return res

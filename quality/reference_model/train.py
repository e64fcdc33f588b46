"""Train a reference video DiT with flow matching (v1: procedural shapes; v2: photographs under camera motion).

Usage (GPU)::

    python -m vidattn.quality.reference_model.train --version 2 --out DIR [--time-budget S]
        [--resume CKPT_DIR] [--max-steps N]

Objective (rectified flow, same convention as diffusers' FlowMatchEulerDiscreteScheduler):
``x_t = (1 - s) x0 + s eps`` with ``s ~ sigmoid(N(0, std))``; the model gets ``timestep = 1000 s``
and regresses the velocity ``eps - x0`` (MSE). Clips ``x0`` are drawn on the fly in DataLoader
workers (:mod:`.data` for v1, :mod:`.photo_motion` for v2, which also gives each clip its prompt)
and mapped to [-1, 1]. v2 trains with class prompts and drops them (the unconditional branch of
classifier-free guidance) with probability ``cond_dropout``; a fraction ``small_size_fraction`` of
the steps use ``small_size`` clips so the model also serves the smaller CPU default size.

Writes into ``DIR``: ``reference_transformer.safetensors`` (weights in the config's
``weights_dtype``), ``train_log.json`` (loss curve, steps, wall time, resumed segments),
``samples.png`` (sampled clips) and a resumable checkpoint ``ckpt/`` (fp32 weights and AdamW state
in shards of at most 15 MB, moments in bfloat16: about 56 MB in 4 files for v2, so a checkpoint
travels back from a time-limited GPU machine).
The learning-rate schedule runs over the *total* planned time (``--total-budget``, default the
config's ``time_budget_s``), so a run split over several calls follows one schedule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .model import ReferenceVideoPipeline, build_scheduler, build_transformer, load_config, text_table

SHARD_BYTES = 15 << 20


class _Clips(IterableDataset):
    """Endless batches ``(x0 [B, 3, F, H, W] in [-1, 1], token ids [B, L] int64 or None)``."""

    def __init__(self, cfg: dict, seed: int):
        self.cfg, self.seed = cfg, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid])
        tc, vid = self.cfg["train"], self.cfg["video"]
        small = tc.get("small_size")
        v2 = bool(self.cfg.get("text"))
        while True:
            size = vid
            if small and rng.random() < float(tc.get("small_size_fraction", 0.0)):
                size = small
            f, h, w = size["frames"], size["height"], size["width"]
            if v2:
                from .photo_motion import make_batch, tokenize

                x, prompts = make_batch(rng, tc["batch_size"], f, h, w)
                ids = torch.tensor([tokenize(p) for p in prompts], dtype=torch.long)
            else:
                from .data import make_batch

                x, ids = make_batch(rng, tc["batch_size"], f, h, w), None
            x = torch.from_numpy(x).permute(0, 4, 1, 2, 3).mul_(2).sub_(1)  # [B,3,F,H,W] in [-1,1]
            yield (x, ids) if ids is not None else (x, torch.zeros(0))


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    """Write fp32 weights and AdamW state into ``folder`` as safetensors shards of at most 15 MB
    (``shard_*.safetensors``; moments in bfloat16) plus ``meta.json`` (step, elapsed time, log)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.startswith("shard_"):
            os.remove(os.path.join(folder, f))
    flat: Dict[str, torch.Tensor] = {f"model.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq"):  # bf16 moments: the checkpoint stays under 64 MB
                    flat[f"opt.{names[id(p)]}.{k}"] = st[k].detach().to(torch.bfloat16).cpu().contiguous()
                flat[f"opt.{names[id(p)]}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
    shard, size, idx = {}, 0, 0
    for k in sorted(flat):
        t = flat[k]
        if shard and size + t.numel() * t.element_size() > SHARD_BYTES:
            save_file(shard, os.path.join(folder, f"shard_{idx:02d}.safetensors"))
            shard, size, idx = {}, 0, idx + 1
        shard[k] = t
        size += t.numel() * t.element_size()
    if shard:
        save_file(shard, os.path.join(folder, f"shard_{idx:02d}.safetensors"))
    with open(os.path.join(folder, "meta.json"), "w") as fh:
        json.dump(meta, fh)


def load_checkpoint(folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Inverse of :func:`save_checkpoint`; returns its ``meta`` dict."""
    from safetensors.torch import load_file

    flat = {}
    for f in sorted(os.listdir(folder)):
        if f.startswith("shard_") and f.endswith(".safetensors"):
            flat.update(load_file(os.path.join(folder, f)))
    dev = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
    for n, p in model.named_parameters():
        if f"opt.{n}.exp_avg" in flat:
            opt.state[p] = {"exp_avg": flat[f"opt.{n}.exp_avg"].to(dev, torch.float32),
                            "exp_avg_sq": flat[f"opt.{n}.exp_avg_sq"].to(dev, torch.float32),
                            "step": flat[f"opt.{n}.step"].reshape(()).to(torch.float32)}
    with open(os.path.join(folder, "meta.json")) as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------ samples
def write_samples(pipe: ReferenceVideoPipeline, cfg: dict, path: str, device: str, frames_shown: int = 8) -> list:
    """Sample one clip per prompt of a fixed list (v2) or 4 unconditional clips (v1) with the
    config's sampling settings and write a frame grid PNG (one row per clip). Returns the prompts."""
    import cv2

    vid, samp = cfg["video"], cfg.get("sampling", {})
    if cfg.get("text"):
        prompts = ["astronaut pan", "cat zoom", "coffee rotate", "galaxy pan", "motorcycle zoom", "shapes still"]
    else:
        prompts = [""] * 4
    frames = pipe(prompt=prompts, num_frames=vid["frames"], height=vid["height"], width=vid["width"],
                  num_inference_steps=int(samp.get("num_inference_steps", 20)),
                  generator=torch.Generator(device).manual_seed(0)).frames  # [N, F, H, W, 3]
    step = max(1, frames.shape[1] // frames_shown)
    grid = np.concatenate([np.concatenate(list(v[::step][:frames_shown]), axis=1) for v in frames], axis=0)
    cv2.imwrite(path, (grid[..., ::-1] * 255).round().astype(np.uint8))
    return prompts


# ------------------------------------------------------------------------------------ training
def train(out_dir: str, version: int = 2, time_budget: Optional[float] = None, total_budget: Optional[float] = None,
          max_steps: Optional[int] = None, device: Optional[str] = None, num_workers: Optional[int] = None,
          resume: Optional[str] = None, samples: bool = True, batch_size: Optional[int] = None,
          video: Optional[dict] = None, init: Optional[str] = None, lr: Optional[float] = None) -> dict:
    """Run (or continue) training; returns the log dict. See the module docstring for the files written.

    Args:
        time_budget: seconds of training in this call (default: the config's ``time_budget_s``).
        total_budget: seconds the learning-rate schedule spans over all calls (default: the config's).
        resume: a checkpoint folder written by an earlier call (``DIR/ckpt``).
        batch_size, video: override the config's batch size / clip size (smoke tests).
        init: a folder holding shipped weights (``reference_transformer.safetensors``) and their
            ``train_log.json``: continue training from those weights with a fresh optimizer and a
            new warm-up + cosine schedule spanning this call (used when the optimizer state of
            the earlier segment is gone); the log keeps the earlier segments.
        lr: peak learning rate for this call (default: the config's).
    """
    cfg = load_config(version=version)
    if batch_size is not None:
        cfg["train"]["batch_size"] = int(batch_size)
    if video is not None:
        cfg["video"] = dict(video)
        cfg["train"].pop("small_size", None)
    tc = cfg["train"]
    total_budget = float(tc["time_budget_s"] if total_budget is None else total_budget)
    time_budget = float(total_budget if time_budget is None else time_budget)
    max_steps = int(tc["max_steps"] if max_steps is None else max_steps)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    nw = int(tc["num_workers"] if num_workers is None else num_workers)
    torch.manual_seed(cfg["seed"])
    os.makedirs(out_dir, exist_ok=True)
    model = build_transformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], betas=(0.9, 0.99),
                            fused=device.startswith("cuda"))
    log = {"loss": [], "step": [], "lr": [], "segments": []}
    step, elapsed0 = 0, 0.0
    if resume and init:
        raise ValueError("resume and init are exclusive: resume continues a checkpoint, init restarts from weights")
    if lr is not None:
        tc["lr"] = float(lr)
    if resume:
        meta = load_checkpoint(resume, model, opt)
        step, elapsed0, log = int(meta["step"]), float(meta["elapsed_s"]), meta["log"]
    warm_from = 0
    if init:
        from safetensors.torch import load_file

        sd = load_file(os.path.join(init, "reference_transformer.safetensors"))
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        with open(os.path.join(init, "train_log.json")) as fh:
            log = json.load(fh)
        log.pop("sample_prompts", None)
        step = warm_from = int(log.get("steps", 0))
        total_budget = time_budget  # a fresh schedule over this call only
    amp = getattr(torch, tc["amp_dtype"]) if device.startswith("cuda") else None
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    seed = int(cfg["seed"]) + 1000 * len(log["segments"])  # a resumed segment draws new clips
    dl = DataLoader(_Clips(cfg, seed), batch_size=None, num_workers=nw, persistent_workers=nw > 0,
                    prefetch_factor=4 if nw > 0 else None, pin_memory=device.startswith("cuda"))
    gen = torch.Generator(device=device).manual_seed(seed)
    table = text_table(cfg)
    table = table.to(device) if table is not None else None
    drop = float(tc.get("cond_dropout", 0.0))
    t0 = time.time()
    ema = None
    step0 = step
    for x0, ids in dl:
        if step >= max_steps or time.time() - t0 > time_budget:
            break
        x0 = x0.to(device, non_blocking=True)
        b = x0.shape[0]
        if table is not None:
            ids = ids.to(device)
            keep = torch.rand(b, 1, device=device, generator=gen) >= drop
            ctx = table[torch.where(keep, ids, torch.zeros_like(ids))]  # id 0 = <null>: unconditional
        else:
            ctx = torch.zeros(b, 1, cfg["transformer"]["text_dim"], device=device)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        s = torch.sigmoid(torch.randn(b, device=device, generator=gen) * tc["logit_normal_std"])
        sv = s.view(b, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * eps
        # linear warm-up, then cosine decay over the total planned time (all segments together)
        frac = min(1.0, (elapsed0 + time.time() - t0) / total_budget)
        lr = tc["lr"] * min(1.0, (step - warm_from + 1) / tc["warmup_steps"]) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
            v = model(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        if step % 25 == 0:
            li = float(loss.detach())
            ema = li if ema is None else 0.9 * ema + 0.1 * li
            log["loss"].append(li), log["step"].append(step), log["lr"].append(lr)
            if step % 100 == 0:
                print(f"step {step} loss {li:.4f} ema {ema:.4f} lr {lr:.2e} t {time.time() - t0:.0f}s", flush=True)
        step += 1
    wall = time.time() - t0
    log["segments"].append(dict(steps=step - step0, wall_s=wall, device=str(device), peak_lr=tc["lr"],
                                start="init from shipped weights, fresh optimizer" if init else
                                ("resume checkpoint" if resume else "scratch"),
                                gpu=torch.cuda.get_device_name() if device.startswith("cuda") else None))
    log.update(steps=step, wall_s=sum(float(g["wall_s"]) for g in log["segments"]), final_loss_ema=ema, clips_seen=step * tc["batch_size"],
               seed=cfg["seed"], version=version)
    model.eval()
    save_checkpoint(os.path.join(out_dir, "ckpt"), model, opt, dict(step=step, elapsed_s=elapsed0 + wall, log=log))
    from safetensors.torch import save_file

    wdt = getattr(torch, tc["weights_dtype"])
    save_file({k: v.detach().to("cpu", wdt).contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "reference_transformer.safetensors"))
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump(log, f)
    if samples:
        # sample with the weights as saved (rounded to weights_dtype), for a visual check
        model.load_state_dict({k: v.to(wdt).float() for k, v in model.state_dict().items()})
        pipe = ReferenceVideoPipeline(model.float(), build_scheduler(cfg), text_table=text_table(cfg),
                                      default_guidance=float(cfg.get("sampling", {}).get("guidance_scale", 1.0)))
        log["sample_prompts"] = write_samples(pipe, cfg, os.path.join(out_dir, "samples.png"), device)
        with open(os.path.join(out_dir, "train_log.json"), "w") as f:
            json.dump(log, f)
    return log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", type=int, default=2, choices=[1, 2])
    ap.add_argument("--time-budget", type=float, default=None, help="seconds of training in this call")
    ap.add_argument("--total-budget", type=float, default=None, help="seconds the LR schedule spans over all calls")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--resume", default=None, help="checkpoint folder of an earlier call (OUT/ckpt)")
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--init", default=None, help="folder with shipped weights + train_log.json to continue from (fresh optimizer)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of this call")
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--size", default=None, help="override the clip size: FRAMES,HEIGHT,WIDTH")
    a = ap.parse_args(argv)
    video = None
    if a.size:
        f, h, w = (int(x) for x in a.size.split(","))
        video = dict(frames=f, height=h, width=w)
    log = train(a.out, a.version, a.time_budget, a.total_budget, a.max_steps, a.device, a.num_workers, a.resume,
                samples=not a.no_samples, batch_size=a.batch_size, video=video, init=a.init, lr=a.lr)
    print(json.dumps({k: log[k] for k in ("steps", "wall_s", "final_loss_ema", "clips_seen")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

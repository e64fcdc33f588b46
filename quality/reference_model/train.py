"""Train the reference video DiT with flow matching on procedural motion clips.

Usage (GPU, ~8 minutes with the shipped config)::

    python -m vidattn.quality.reference_model.train --out DIR [--time-budget 420] [--max-steps N]

Objective (rectified flow, same convention as diffusers' FlowMatchEulerDiscreteScheduler):
``x_t = (1 - s) x0 + s eps`` with ``s ~ sigmoid(N(0, std))``, the model gets ``timestep = 1000 s`` and
regresses the velocity ``eps - x0`` (MSE).  Clips ``x0`` are drawn on the fly by
:mod:`.data` in DataLoader workers and mapped to [-1, 1].  Writes
``DIR/reference_transformer.safetensors`` (weights in the config's ``weights_dtype``),
``DIR/train_log.json`` (loss curve, steps, wall time) and ``DIR/samples.png`` (a few sampled clips).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .data import make_batch
from .model import build_scheduler, build_transformer, load_config, ReferenceVideoPipeline


class _Clips(IterableDataset):
    def __init__(self, seed: int, batch: int, frames: int, height: int, width: int):
        self.seed, self.batch, self.f, self.h, self.w = seed, batch, frames, height, width

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid])
        while True:
            x = make_batch(rng, self.batch, self.f, self.h, self.w)  # [B,F,H,W,3]
            yield torch.from_numpy(x).permute(0, 4, 1, 2, 3).mul_(2).sub_(1)  # [B,3,F,H,W] in [-1,1]


def train(out_dir: str, time_budget: float = None, max_steps: int = None, device: str = None,
          num_workers: int = None) -> dict:
    """Run training; returns the log dict. See module docstring for the files written."""
    cfg = load_config()
    tc = cfg["train"]
    vid = cfg["video"]
    time_budget = float(tc["time_budget_s"] if time_budget is None else time_budget)
    max_steps = int(tc["max_steps"] if max_steps is None else max_steps)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    nw = int(tc["num_workers"] if num_workers is None else num_workers)
    torch.manual_seed(cfg["seed"])
    os.makedirs(out_dir, exist_ok=True)
    model = build_transformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"], betas=(0.9, 0.99))
    amp = getattr(torch, tc["amp_dtype"]) if device.startswith("cuda") else None
    ds = _Clips(cfg["seed"], tc["batch_size"], vid["frames"], vid["height"], vid["width"])
    dl = DataLoader(ds, batch_size=None, num_workers=nw, persistent_workers=nw > 0,
                    prefetch_factor=4 if nw > 0 else None, pin_memory=device.startswith("cuda"))
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    ctx = torch.zeros(tc["batch_size"], 1, cfg["transformer"]["text_dim"], device=device)
    log = {"loss": [], "step": [], "lr": []}
    t0 = time.time()
    ema = None
    step = 0
    for x0 in dl:
        if step >= max_steps or time.time() - t0 > time_budget:
            break
        x0 = x0.to(device, non_blocking=True)
        b = x0.shape[0]
        eps = torch.randn(x0.shape, device=device, generator=gen)
        s = torch.sigmoid(torch.randn(b, device=device, generator=gen) * tc["logit_normal_std"])
        sv = s.view(b, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * eps
        # cosine decay after warmup, scaled by the expected number of steps (time budget dominates)
        lr = tc["lr"] * min(1.0, (step + 1) / tc["warmup_steps"])
        frac = min(1.0, (time.time() - t0) / time_budget)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda", dtype=amp, enabled=amp is not None):
            v = model(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=ctx[:b], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        opt.step()
        li = float(loss.detach()) if step % 25 == 0 else None
        if li is not None:
            ema = li if ema is None else 0.9 * ema + 0.1 * li
            log["loss"].append(li), log["step"].append(step), log["lr"].append(lr)
            if step % 250 == 0:
                print(f"step {step} loss {li:.4f} ema {ema:.4f} lr {lr:.2e} t {time.time() - t0:.0f}s", flush=True)
        step += 1
    log.update(steps=step, wall_s=time.time() - t0, device=str(device), final_loss_ema=ema,
               clips_seen=step * tc["batch_size"], seed=cfg["seed"])
    model.eval()
    from safetensors.torch import save_file

    wdt = getattr(torch, tc["weights_dtype"])
    save_file({k: v.detach().to("cpu", wdt).contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "reference_transformer.safetensors"))
    # sample a few clips with the weights as saved (rounded to weights_dtype) for a visual check
    model.load_state_dict({k: v.to(wdt).float() for k, v in model.state_dict().items()})
    pipe = ReferenceVideoPipeline(model.float(), build_scheduler(cfg))
    frames = pipe(prompt=[""] * 4, num_frames=vid["frames"], height=vid["height"], width=vid["width"],
                  num_inference_steps=cfg["sampling"]["num_inference_steps"],
                  generator=torch.Generator(device).manual_seed(0)).frames  # [4,F,H,W,3]
    import cv2

    grid = np.concatenate([np.concatenate(list(v), axis=1) for v in frames], axis=0)
    cv2.imwrite(os.path.join(out_dir, "samples.png"), (grid[..., ::-1] * 255).round().astype(np.uint8))
    with open(os.path.join(out_dir, "train_log.json"), "w") as f:
        json.dump(log, f)
    return log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    a = ap.parse_args(argv)
    log = train(a.out, a.time_budget, a.max_steps, a.device, a.num_workers)
    print(json.dumps({k: log[k] for k in ("steps", "wall_s", "final_loss_ema", "clips_seen")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

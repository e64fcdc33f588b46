"""CPU path benchmark: a sparse call on the ``cpu`` backend (per-query-block SDPA over gathered key
blocks) against dense SDPA on the same tensors, and against the ``reference`` backend.

Two plan kinds per (sequence length, density):

* ``block``: every query block keeps ``round(density * NKB)`` random key blocks (its own diagonal
  block among them), all full (no token mask);
* ``window``: a 3-D Neighborhood pattern on a ``(T, 16, 16)`` grid whose kernel gives about the
  requested block density (partial blocks evaluated with the token rule).

Dense SDPA and the cpu backend run with the same torch thread count (``--threads``; on a shared,
oversubscribed machine use ``--threads 1``: OpenMP barriers then dominate every multi-threaded op).

Usage::

    python benchmarks/cpu_path.py                       # S 4096 8192, density 0.1 0.25
    python benchmarks/cpu_path.py --seq 4096 --density 0.25 --heads 2 --json out.json

Prints one table row per case (times are medians in ms of dense SDPA and the cpu backend timed
alternately; ``speedup`` = dense / cpu backend).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import vidattn
from vidattn import Neighborhood, TokenLayout
from vidattn.plan import FULL, plan_from_block_mask


def _time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` calls after one warm-up call."""
    return _time_pair(fn, None, reps)[0]


def _time_pair(fa, fb, reps: int):
    """Median ms of ``fa`` and ``fb`` timed alternately (a shared, noisy machine biases both alike)."""
    fa()
    if fb is not None:
        fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            if f is None:
                continue
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, (statistics.median(tb) * 1e3 if tb else None)


def block_plan(S: int, density: float, block: int, seed: int = 0):
    """Random full-block plan: each query block keeps ``round(density * NKB)`` key blocks."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-S // block)
    keep = max(1, round(density * nb))
    cls = torch.zeros(1, 1, nb, nb, dtype=torch.int8)
    for i in range(nb):
        others = torch.randperm(nb, generator=g)
        chosen = [i] + [int(j) for j in others if int(j) != i][: keep - 1]
        cls[0, 0, i, chosen] = FULL
    return plan_from_block_mask(cls, seq_len=S, block_q=block, block_k=block, rule=None, token_density=keep / nb)


def window_plan(S: int, density: float, heads: int):
    """Neighborhood plan on a (S // 256, 16, 16) grid whose kernel's token density is closest to
    ``density / 1.6`` (64-token blocks on this grid keep about 1.6x the token density; the row
    reports the plan's actual block density)."""
    T = S // 256
    lay = TokenLayout((T, 16, 16))
    best = None
    for kt in range(1, T + 1):
        for ks in range(3, 17, 2):
            d = (kt / T) * (ks / 16) ** 2
            if best is None or abs(d - density / 1.6) < abs(best[0] - density / 1.6):
                best = (d, kt, ks)
    _, kt, ks = best
    pat = Neighborhood(kernel_size=(kt, ks, ks))
    return pat.plan(lay, num_heads=heads), f"na({kt},{ks},{ks})"


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192], help="sequence lengths (multiples of 256)")
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.25], help="target block densities")
    ap.add_argument("--heads", type=int, default=1, help="query heads (= key/value heads)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    ap.add_argument("--block", type=int, default=128, help="block size of the random block plans")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    ap.add_argument("--kinds", nargs="+", default=["block", "window"], choices=["block", "window"],
                    help="plan kinds to run")
    ap.add_argument("--reference", action="store_true", help="also time the reference backend (slow)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the rows as JSON to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'S':>6} {'kind':>14} {'density':>8} {'dense ms':>9} {'cpu ms':>8} {'speedup':>8} {'ref ms':>8} {'max err':>9}")
    for S in args.seq:
        g = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(1, S, args.heads, args.head_dim, generator=g) for _ in range(3))
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        dense = lambda: F.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
        for dens in args.density:
            for kind in args.kinds:
                if kind == "block":
                    plan, name = block_plan(S, dens, args.block), f"block{args.block}"
                else:
                    plan, name = window_plan(S, dens, args.heads)
                dense_ms, cpu_ms = _time_pair(dense, lambda: vidattn.run_plan(q, k, v, plan, backend="cpu"), args.reps)
                ref_ms, err = None, None
                if args.reference:
                    ref_ms = _time(lambda: vidattn.run_plan(q, k, v, plan, backend="reference"), max(1, args.reps // 2))
                    err = float((vidattn.run_plan(q, k, v, plan, backend="cpu")
                                 - vidattn.run_plan(q, k, v, plan, backend="reference")).abs().max())
                row = dict(seq_len=S, kind=name, target_density=dens, block_density=round(plan.block_density, 4),
                           heads=args.heads, head_dim=args.head_dim, dense_sdpa_ms=round(dense_ms, 2),
                           cpu_ms=round(cpu_ms, 2), speedup_vs_dense=round(dense_ms / cpu_ms, 2),
                           reference_ms=None if ref_ms is None else round(ref_ms, 2), max_abs_err_vs_reference=err,
                           threads=torch.get_num_threads())
                rows.append(row)
                print(f"{S:>6} {name:>14} {row['block_density']:>8.3f} {dense_ms:>9.1f} {cpu_ms:>8.1f} "
                      f"{row['speedup_vs_dense']:>8.2f} {'' if ref_ms is None else f'{ref_ms:.1f}':>8} "
                      f"{'' if err is None else f'{err:.1e}':>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

"""Attention-level probes: sparse output vs dense attention on the same inputs, sampled.

:class:`AttentionProbe` registers an observer with :func:`vidattn.attention.add_observer`; after
every sparse ``run_plan`` it takes the call's ``q [B,S,H,D]``, ``k/v [B,S,Hk,D]``, ``plan`` and
``out [B,S,H,D]``, samples up to ``max_queries`` query rows and ``sample_heads`` heads, and computes
for those rows only (memory ``O(max_queries * S)``, never ``S x S``):

* the exact dense softmax attention output (float64 logits, GQA head mapping ``h // (H // Hk)``);
* ``rel_l2`` = ||out_sparse - out_dense|| / ||out_dense|| and ``cosine`` over the sampled rows;
* ``recall`` = mean over sampled (row, head) of the dense attention probability mass on the keys the
  plan allows (plan block classes + token rule, mapped back through ``plan.perm`` to original
  token order, exactly like :meth:`BlockPlan.token_mask` restricted to the rows).

Layers are identified by the model's self-attention layer index (the index ``vidattn.apply`` uses
for ``dense_layers``), read from the processor running the call, so layers kept dense do not
renumber the others. Outside a vidattn processor (a bare ``run_plan``), the call order within a
denoising step is used instead: the runner calls :meth:`AttentionProbe.start_step` before each
step, so the ``i``-th sparse attention call of a step is layer ``i``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["AttentionProbe", "allowed_rows", "dense_rows"]

_FULL, _PARTIAL = 2, 1


def allowed_rows(plan, rows: torch.Tensor, head: int, batch: int = 0) -> torch.Tensor:
    """Bool ``[len(rows), S]``: which keys (original order) the plan lets query ``rows`` (original
    token indices, LongTensor ``[n]``) attend for query head ``head`` and batch element ``batch``."""
    S = plan.seq_len
    dev = plan.device
    rows = rows.to(dev).long()
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= S):
        raise ValueError(f"rows must be in [0, {S}), got range [{int(rows.min())}, {int(rows.max())}]")
    bp, hp = plan.plan_batch, plan.plan_heads
    b, h = (batch if bp > 1 else 0), (head if hp > 1 else 0)
    cls = plan.block_classes()[b, h]  # [NQB, NKB] int8
    pos = torch.arange(S, device=dev)
    perm = plan.perm[h if plan.perm.shape[0] > 1 else 0].to(dev) if plan.perm is not None else pos
    inv = torch.empty_like(perm)
    inv[perm] = pos  # original index -> plan position
    qb = inv[rows] // plan.block_q  # [n]
    kb = inv // plan.block_k  # [S] plan block of each original key
    c = cls[qb][:, kb]  # [n, S]
    allowed = c == _FULL
    if plan.rule is not None:
        r = plan.rule(torch.tensor(h, device=dev), rows[:, None], pos[None, :])
        allowed = allowed | ((c == _PARTIAL) & r.to(dev))
    return allowed


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, head: int, batch: int,
               scale: float):
    """Dense softmax attention for query ``rows`` of one (batch, head).

    q ``[B,S,H,D]``, k/v ``[B,S,Hk,D]``. Returns (probs float64 ``[n, S]``, out float64 ``[n, D]``).
    """
    H, Hk = q.shape[2], k.shape[2]
    hk = head // (H // Hk)
    qr = q[batch, rows.to(q.device), head].double()
    logits = (qr @ k[batch, :, hk].double().T) * scale
    p = torch.softmax(logits, dim=-1)
    return p, p @ v[batch, :, hk].double()


def _current_layer() -> Optional[int]:
    """The self-attention layer index of the vidattn processor call running now, or None."""
    try:
        from vidattn.pipelines import processors
    except ImportError:  # pragma: no cover
        return None
    layer = processors.current_layer()
    return int(layer) if layer is not None else None


class AttentionProbe:
    """Context manager sampling sparse-vs-dense attention errors during a run.

    Args:
        sample_layers: None = every layer, an int n = the first n layers, or an iterable of layer ids.
        sample_heads: None = every head, an int n = n heads evenly spread, or an iterable of head ids.
        max_queries: query rows sampled per call (random, seeded), per batch element 0.
        sample_steps: None = every step, or an iterable of step indices.
        seed: RNG seed for the row sampling.
    Records (``self.records``): list of dicts ``{step, layer, head, rel_l2, cosine, recall,
    token_density}``; :meth:`summary` aggregates them.
    """

    def __init__(self, sample_layers: Union[None, int, Iterable[int]] = None,
                 sample_heads: Union[None, int, Iterable[int]] = 2, max_queries: int = 64,
                 sample_steps: Optional[Iterable[int]] = None, seed: int = 0):
        if max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.sample_layers = sample_layers if (sample_layers is None or isinstance(sample_layers, int)) else set(sample_layers)
        self.sample_heads = sample_heads
        self.max_queries = int(max_queries)
        self.sample_steps = None if sample_steps is None else set(sample_steps)
        self.records: List[Dict] = []
        self._gen = torch.Generator().manual_seed(seed)
        self._step = 0
        self._call = 0
        self._handle = None
        self.enabled = True

    # --------------------------------------------------------------- lifecycle
    def __enter__(self):
        from vidattn.attention import add_observer

        self._handle = add_observer(self._observe)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False

    def start_step(self, step: int) -> None:
        """Mark the start of denoising step ``step`` (resets the layer counter)."""
        self._step = int(step)
        self._call = 0

    # --------------------------------------------------------------- sampling
    def _layer_ok(self, layer: int) -> bool:
        if self.sample_layers is None:
            return True
        if isinstance(self.sample_layers, int):
            return layer < self.sample_layers
        return layer in self.sample_layers

    def _heads(self, H: int) -> List[int]:
        sh = self.sample_heads
        if sh is None:
            return list(range(H))
        if isinstance(sh, int):
            n = max(1, min(sh, H))
            return sorted({int(round(i * (H - 1) / max(n - 1, 1))) for i in range(n)}) if n > 1 else [0]
        return [h for h in sh if 0 <= h < H]

    @torch.no_grad()
    def _observe(self, q, k, v, plan, out, scale):
        layer = _current_layer()
        if layer is None:
            layer = self._call
        self._call += 1
        if not self.enabled or not self._layer_ok(layer):
            return
        if self.sample_steps is not None and self._step not in self.sample_steps:
            return
        B, S, H, D = q.shape
        scale = float(scale) if scale is not None else 1.0 / math.sqrt(D)
        n = min(self.max_queries, S)
        rows = torch.randperm(S, generator=self._gen)[:n].sort().values
        for h in self._heads(H):
            p, dense = dense_rows(q, k, v, rows, h, 0, scale)
            sparse = out[0, rows.to(out.device), h].double()
            allowed = allowed_rows(plan, rows, h, 0).to(p.device)
            diff = (sparse - dense).norm()
            dn, sn = dense.norm(), sparse.norm()
            self.records.append(dict(
                step=self._step, layer=layer, head=h,
                rel_l2=float(diff / dn) if dn > 0 else 0.0,
                cosine=float((sparse * dense).sum() / (sn * dn)) if sn > 0 and dn > 0 else 1.0,
                recall=float((p * allowed).sum(-1).mean()),
                token_density=float(plan.token_density)))

    # --------------------------------------------------------------- results
    def summary(self) -> Dict:
        """``{"num_records", "rel_l2", "cosine", "recall" (means), "per_layer": [{layer, rel_l2, cosine,
        recall, n}]}`` over all records (empty lists/None if nothing was sampled)."""
        if not self.records:
            return {"num_records": 0, "rel_l2": None, "cosine": None, "recall": None, "per_layer": []}
        per = {}
        for r in self.records:
            per.setdefault(r["layer"], []).append(r)
        mean = lambda rs, key: float(np.mean([x[key] for x in rs]))  # noqa: E731
        return {
            "num_records": len(self.records),
            "rel_l2": mean(self.records, "rel_l2"), "cosine": mean(self.records, "cosine"),
            "recall": mean(self.records, "recall"),
            "per_layer": [dict(layer=l, n=len(rs), rel_l2=mean(rs, "rel_l2"), cosine=mean(rs, "cosine"),
                               recall=mean(rs, "recall")) for l, rs in sorted(per.items())],
        }

"""Clustered: semantic-aware permutation (Sparse VideoGen 2: Yang et al., "Sparse VideoGen2:
Accelerate Video Generation with Sparse Attention via Semantic-Aware Permutation",
arXiv:2505.18875). Follows ``svg/models/wan/attention.py`` (``WanAttn_SAPAttn_Processor``) and
``svg/kmeans_utils.py`` (``batch_kmeans_Euclid``, ``identify_dynamic_map``, ``weighted_softmax``)
of svg-project/Sparse-VideoGen at commit ``5ce7b0127c0d44383ee8b9e5512431feb625f621``;
re-implemented from those definitions, no code copied.

Per call, per head ``h`` (grid tokens only):

1. k-means (squared Euclidean, :func:`vidattn.kernels.kmeans.batched_kmeans`) of the queries
   into ``Kq = q_clusters`` and of the keys into ``Kk = k_clusters`` centroids: ``iters_first``
   iterations on the first call, then ``iters_step`` iterations warm-started from the previous
   call's centroids with the same ``state_key`` (pass the layer index: one state per layer).
   Without a ``state_key`` every call is a cold start (a pattern object is shared by all layers,
   and another layer's centroids are not a valid warm start).
2. Centroid scores ``s_ab = scale * cq_a . ck_b``; size-weighted softmax over key clusters
   ``P_ab = n_b exp(s_ab) / sum_b' n_b' exp(s_ab')``.
3. Per query cluster, key clusters sorted by ``P`` descending are kept while the cumulative mass
   *before* them is ``<= top_p`` (so the cluster that crosses ``top_p`` is kept), and at least the
   first ``int(min_fraction * Kk)``. ``top_p >= 1`` keeps every cluster (dense).
4. Queries are sorted by query-cluster label, keys by key-cluster label (stable sorts), and
   attention runs block-sparse over those orders; the output returns in the original order.

Text / prefix / suffix (non-grid) tokens form one extra cluster on each side, placed last, that
attends every key and is attended by every query.

Execution (a :class:`~vidattn.plan.BlockPlan` with ``perm`` = query order and ``kv_perm`` = key
order, ``[H, S]``; Bp = batch, Hp = heads): clusters are **not padded** and blocks are **not
variable**: the plan cuts both orders into fixed blocks of ``block_size`` tokens, and a (query
block, key block) pair runs iff some (query cluster, key cluster) pair inside it is kept
(2-D prefix sums over the cluster map, no host sync).

* ``exact=False`` (default): such blocks run in full, so the executed mask is a *superset* of the
  cluster mask (never less accurate; ``plan.meta["cluster_density"]`` is the cluster mask's
  density, ``plan.token_density`` what runs; the ratio is the block-rounding cost), and the plan
  is built without any host synchronisation.
* ``exact=True``: blocks not entirely kept are partial blocks evaluated by
  :class:`ClusterRule`, so the executed mask is exactly the cluster mask (for batch > 1: the union
  over the batch of the per-sample maps inside partial blocks).

Deliberate differences from the authors' code: (a) fixed iteration counts (no tolerance test:
that would need a host sync per iteration); (b) deterministic evenly spaced initial centroids
instead of ``torch.randint`` picks; (c) with batch > 1 (e.g. CFG) one clustering per head is
shared by the batch (k-means on the batch-concatenated features ``[q_b0 | q_b1 | ...]``, whose
centroids are the concatenated per-sample centroids), the cluster selection is per sample; their
code asserts batch 1; (d) fixed-size blocks over the cluster orders instead of FlashInfer's
variable-size blocks (see above); (e) ``scale`` is the attention's scale (theirs ``D**-0.5``, the
default); (f) dense warm-up steps / layers come from the pipeline schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import TokenLayout
from ..plan import EMPTY, FULL, PARTIAL, BlockPlan, TokenRule, plan_from_block_mask
from .base import Pattern

__all__ = ["Clustered", "ClusterRule", "default_cluster_counts", "cluster_keep_map", "quality_presets"]


def default_cluster_counts(num_tokens: int) -> Tuple[int, int]:
    """``(q_clusters, k_clusters)`` for ``num_tokens`` grid tokens, scaled from the authors'
    scripts (Wan 480p, 32,760 tokens: 200 / 1000; 720p, 75,600: 300 / 1000): ``q = 200 *
    sqrt(N / 32760)`` (at most ``N / 16``), ``k = min(1000, N / 32)``; both at least 1."""
    n = int(num_tokens)
    q = max(1, min(n // 16, round(200 * math.sqrt(n / 32760))))
    k = max(1, min(1000, n // 32))
    return q, k


def cluster_keep_map(q_centroids: torch.Tensor, k_centroids: torch.Tensor, k_sizes: torch.Tensor, top_p: float,
                     min_fraction: float, scale: float) -> torch.Tensor:
    """Key clusters kept per query cluster (module docstring, steps 2-3).

    Args:
        q_centroids: float ``[B, H, Kq, D]``; k_centroids: float ``[B, H, Kk, D]``.
        k_sizes: ``[B or 1, H, Kk]`` tokens per key cluster (the softmax weights).
        top_p: cumulative mass; min_fraction: at least ``int(min_fraction * Kk)`` clusters.
        scale: logit scale.
    Returns:
        BoolTensor ``[B, H, Kq, Kk]``.
    """
    Kk = k_centroids.shape[-2]
    s = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2)) * scale
    w = k_sizes.float()[..., None, :]
    e = torch.exp(s - s.amax(-1, keepdim=True)) * w
    p = e / e.sum(-1, keepdim=True).clamp(min=1e-12)
    if top_p >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.nn.functional.pad(torch.cumsum(sp, -1)[..., :-1], (1, 0))  # mass of the clusters ranked above
    keep_sorted = before <= top_p
    keep_sorted[..., : int(min_fraction * Kk)] = True
    keep_sorted[..., 0] = True
    out = torch.zeros_like(keep_sorted)
    return out.scatter_(-1, order, keep_sorted)


class ClusterRule(TokenRule):
    """Token rule of ``Clustered(exact=True)``: ``keep[h, lq[h, q], lk[h, k]]``.

    Fields: ``q_labels``/``k_labels`` int64 ``[H, S]`` cluster of every original token (non-grid
    tokens: the extra cluster ``Kq`` / ``Kk``), ``keep`` BoolTensor ``[H, Kq + 1, Kk + 1]``.
    """

    def __init__(self, q_labels: torch.Tensor, k_labels: torch.Tensor, keep: torch.Tensor):
        self.q_labels, self.k_labels, self.keep = q_labels, k_labels, keep

    def __call__(self, h, q_idx, k_idx):
        """Bool tensor of the broadcast shape of ``h``, ``q_idx``, ``k_idx``."""
        h = torch.as_tensor(h, device=q_idx.device)
        if h.dim() == 0:
            h = h.expand(())
        lq = self.q_labels.to(q_idx.device)[h, q_idx]
        lk = self.k_labels.to(q_idx.device)[h, k_idx]
        return self.keep.to(q_idx.device)[h, lq, lk]

    def cache_key(self):
        return ("ClusterRule", id(self))


@dataclass(frozen=True)
class Clustered(Pattern):
    """Semantic-aware permutation (module docstring).

    Args:
        q_clusters, k_clusters: centroids per head; None = :func:`default_cluster_counts` of the
            grid token count (capped at the grid token count).
        top_p: cumulative centroid mass kept per query cluster (authors 0.9); ``>= 1`` dense.
        min_fraction: at least this fraction of key clusters kept (authors ``min_kc_ratio`` 0.1).
        iters_first: k-means iterations on a cold start (authors 50).
        iters_step: iterations when warm-started from the previous call (authors 2).
        block_size: plan query block (tokens) over the query-cluster order.
        exact: run exactly the cluster mask (partial blocks) instead of its block superset.
        warm_start: reuse the previous call's centroids (per layout / heads / ``state_key``; calls
            without a ``state_key`` always start cold).
        block_k: plan key block over the key-cluster order (None = ``block_size``); key clusters
            are the smaller ones (about 33 tokens at Wan 480p), so a smaller key block cuts most
            of the block-rounding cost.
    """

    q_clusters: Optional[int] = None
    k_clusters: Optional[int] = None
    top_p: float = 0.9
    min_fraction: float = 0.1
    iters_first: int = 50
    iters_step: int = 2
    block_size: int = 64
    exact: bool = False
    warm_start: bool = True
    block_k: Optional[int] = None

    is_dynamic = True
    uses_state_key = True  # processors should pass plan(..., state_key=<layer index>) for warm starts

    def __post_init__(self):
        for name in ("q_clusters", "k_clusters"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if self.block_k is not None and (isinstance(self.block_k, bool) or not isinstance(self.block_k, int)
                                         or self.block_k < 1):
            raise ValueError(f"block_k must be None or an int >= 1, got {self.block_k!r}")
        for name in ("iters_first", "iters_step", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p:
            raise ValueError(f"top_p must be a float > 0, got {self.top_p!r}")
        if isinstance(self.min_fraction, bool) or not isinstance(self.min_fraction, (int, float)) \
                or not 0 <= self.min_fraction <= 1:
            raise ValueError(f"min_fraction must be a float in [0, 1], got {self.min_fraction!r}")

    @classmethod
    def from_authors(cls, resolution: str = "480p", model: str = "wan") -> "Clustered":
        """The authors' script settings (``scripts/*/*_sap.sh`` @ 5ce7b01): top_p 0.9, min ratio
        0.1, 50 / 2 iterations; q/k clusters 200/1000 at 480p, 300/1000 (Wan) or 400/1000
        (HunyuanVideo) at 720p."""
        if resolution not in ("480p", "720p") or model not in ("wan", "hunyuan"):
            raise ValueError(f"resolution must be '480p'|'720p' and model 'wan'|'hunyuan', got {resolution!r}, {model!r}")
        qc = 200 if resolution == "480p" else (300 if model == "wan" else 400)
        return cls(q_clusters=qc, k_clusters=1000, top_p=0.9, min_fraction=0.1, iters_first=50, iters_step=2)

    def validate(self, layout: TokenLayout) -> None:
        """Raise unless ``layout`` is a TokenLayout with at least one grid token."""
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")

    def cluster_counts(self, layout: TokenLayout) -> Tuple[int, int]:
        """``(Kq, Kk)`` used on ``layout``."""
        dq, dk = default_cluster_counts(layout.num_grid_tokens)
        n = layout.num_grid_tokens
        return min(n, self.q_clusters or dq), min(n, self.k_clusters or dk)

    def reset(self) -> None:
        """Forget the warm-start centroids (e.g. at the start of a new video)."""
        self.__dict__.setdefault("_state", {}).clear()

    # ---------------------------------------------------------------- clustering
    def cluster(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, state_key=None):
        """k-means of the grid queries and keys, warm-started when state exists.

        Args:
            q: ``[B, S, H, D]``; k: ``[B, S, Hk, D]`` (Hk divides H; key heads are repeated).
        Returns:
            dict with ``q_labels``/``k_labels`` int64 ``[H, N]``, ``q_centroids``/``k_centroids``
            float32 ``[B, H, K, D]``, ``q_sizes``/``k_sizes`` int64 ``[H, K]``, ``iters`` (int).
        """
        from vidattn.kernels.kmeans import batched_kmeans

        B, S, H, D = q.shape
        if k.shape[2] != H:
            k = k.repeat_interleave(H // k.shape[2], dim=2)
        g = layout.grid_slice
        Kq, Kk = self.cluster_counts(layout)
        xq = q[:, g].permute(2, 1, 0, 3).reshape(H, -1, B * D)  # batch-concatenated features
        xk = k[:, g].permute(2, 1, 0, 3).reshape(H, -1, B * D)
        state = self.__dict__.setdefault("_state", {})
        skey = (layout, B, H, D, str(q.device), state_key)
        keyed = self.warm_start and state_key is not None  # one state per layer: never share across layers
        prev = state.get(skey) if keyed else None
        iters = self.iters_step if prev is not None else self.iters_first
        lq, cq, nq = batched_kmeans(xq, Kq, iters, init=None if prev is None else prev[0])
        lk, ck, nk = batched_kmeans(xk, Kk, iters, init=None if prev is None else prev[1])
        if keyed:
            if len(state) > 256:
                state.clear()
            state[skey] = (cq, ck)
        split = lambda c: c.view(H, c.shape[1], B, D).permute(2, 0, 1, 3)  # noqa: E731  [B, H, K, D]
        return dict(q_labels=lq, k_labels=lk, q_centroids=split(cq), k_centroids=split(ck), q_sizes=nq,
                    k_sizes=nk, iters=iters)

    # ---------------------------------------------------------------- plan
    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             v: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, num_heads: int = 1, device=None,
             state_key=None) -> BlockPlan:
        """Cluster ``q``/``k`` (``[B, S, H, D]`` / ``[B, S, Hk, D]``) and return the plan
        (Bp = B, Hp = H, ``perm`` query order, ``kv_perm`` key order). With ``exact=False`` no
        host synchronisation happens."""
        if q is None or k is None:
            raise ValueError("Clustered is dynamic: plan() needs q [B, S, H, D] and k [B, S, Hk, D]")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError("q and k must be tensors [B, S, heads, D]")
        self.validate(layout)
        layout.check_seq_len(q.shape[1], "q")
        B, S, H, D = q.shape
        if H % k.shape[2]:
            raise ValueError(f"key heads {k.shape[2]} must divide query heads {H}")
        dev = torch.device(device) if device is not None else q.device
        scale = D ** -0.5 if scale is None else float(scale)
        c = self.cluster(layout, q, k, state_key=state_key)
        Kq, Kk = c["q_centroids"].shape[2], c["k_centroids"].shape[2]
        keep = cluster_keep_map(c["q_centroids"], c["k_centroids"], c["k_sizes"][None], float(self.top_p),
                                float(self.min_fraction), scale)  # [B, H, Kq, Kk]
        return self._plan_from_clusters(layout, c["q_labels"], c["k_labels"], keep, dev,
                                        meta=dict(kmeans_iters=c["iters"]))

    def _plan_from_clusters(self, layout: TokenLayout, lq: torch.Tensor, lk: torch.Tensor, keep: torch.Tensor, dev,
                            meta=None) -> BlockPlan:
        """Plan from grid labels ``lq``/``lk`` int64 ``[H, N]`` and ``keep`` ``[B, H, Kq, Kk]``."""
        B, H, Kq, Kk = keep.shape
        S, bs = layout.seq_len, self.block_size
        lq, lk, keep = lq.to(dev), lk.to(dev), keep.to(dev)
        g = layout.grid_slice
        n_text = S - layout.num_grid_tokens
        full_q = torch.full((H, S), Kq, dtype=torch.long, device=dev)
        full_q[:, g] = lq
        full_k = torch.full((H, S), Kk, dtype=torch.long, device=dev)
        full_k[:, g] = lk
        perm_q = torch.argsort(full_q, dim=-1, stable=True)
        perm_k = torch.argsort(full_k, dim=-1, stable=True)
        sq = torch.gather(full_q, 1, perm_q)  # ascending cluster id in plan order
        sk = torch.gather(full_k, 1, perm_k)
        ones = torch.ones(H, S, dtype=torch.long, device=dev)
        nq = torch.zeros(H, Kq + 1, dtype=torch.long, device=dev).scatter_add_(1, full_q, ones)
        nk = torch.zeros(H, Kk + 1, dtype=torch.long, device=dev).scatter_add_(1, full_k, ones)
        ext = torch.ones(B, H, Kq + 1, Kk + 1, dtype=torch.bool, device=dev)  # text row/col: dense
        ext[:, :, :Kq, :Kk] = keep
        pres = (nq > 0)[:, :, None] & (nk > 0)[:, None, :]  # [H, Kq+1, Kk+1]
        ext = ext & pres[None]
        # token density of the cluster mask itself (the authors' density, text dense)
        pair_tokens = (nq[:, :, None] * nk[:, None, :]).double()
        cluster_density = (ext.double() * pair_tokens[None]).sum() / (B * H * S * S)

        def prefix2d(m):  # [.., R, C] -> [.., R+1, C+1] inclusive prefix sums with a zero border
            m = torch.nn.functional.pad(m.to(torch.int32).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
            return m

        bk = self.block_k or bs

        def cuts(b):
            st = torch.arange(-(-S // b), device=dev) * b
            return st, torch.clamp(st + b, max=S) - 1

        q_st, q_en = cuts(bs)
        k_st, k_en = cuts(bk)
        qlo, qhi = sq[:, q_st], sq[:, q_en]  # [H, NQB]
        klo, khi = sk[:, k_st], sk[:, k_en]  # [H, NKB]

        def rect(P):  # P [..., H, R+1, C+1] (leading dim broadcast) -> [.., H, NB, NB]
            hi_r, lo_r = (qhi + 1)[:, :, None], qlo[:, :, None]
            hi_c, lo_c = (khi + 1)[:, None, :], klo[:, None, :]
            hh = torch.arange(H, device=dev)[:, None, None]
            return (P[..., hh, hi_r, hi_c] - P[..., hh, lo_r, hi_c] - P[..., hh, hi_r, lo_c] + P[..., hh, lo_r, lo_c])

        kept_cnt = rect(prefix2d(ext))  # [B, H, NB, NB]
        active = kept_cnt > 0
        area = (q_en - q_st + 1).double()[:, None] * (k_en - k_st + 1).double()[None, :]
        m = dict(pattern="clustered", q_clusters=Kq, k_clusters=Kk, top_p=float(self.top_p),
                 cluster_density=cluster_density, text_tokens=n_text)
        m.update(meta or {})
        if not self.exact:
            cls_ = torch.where(active, FULL, EMPTY).to(torch.int8)
            density = (active.double() * area).sum() / (B * H * S * S)
            return plan_from_block_mask(cls_, seq_len=S, block_q=bs, block_k=bk, rule=None, perm=perm_q,
                                        kv_perm=perm_k, token_density=density, meta=m, full_only=True)
        full = kept_cnt == rect(prefix2d(pres))[None]
        cls_ = torch.where(active, torch.where(full, FULL, PARTIAL), EMPTY).to(torch.int8)
        rule = ClusterRule(full_q, full_k, ext.any(0))
        return plan_from_block_mask(cls_, seq_len=S, block_q=bs, block_k=bk, rule=rule, perm=perm_q, kv_perm=perm_k,
                                    token_density=cluster_density, meta=m)


def quality_presets():
    """Constructor calls for the quality harness: ``{name: pattern}``, the authors' presets
    (``radial_authors``, ``svg``, ``mminference``, ``rectified_authors``) and Clustered at about
    50 / 75 / 90% sparsity (``top_p`` / ``block_size`` are the knobs; the sparsity reached depends
    on the content, so the harness should report the achieved density)."""
    from .grid import PermutedGrid
    from .radial import Radial
    from .rectified import RectifiedSparse

    out = {
        # measured on the benchmark's structured inputs at the reference grid 8 x 16 x 16 (executed
        # token density 0.46 / 0.24 / 0.09); the reference model's own densities are what count
        "clustered_s50": Clustered(top_p=0.9, min_fraction=0.1, block_size=32),
        "clustered_s75": Clustered(top_p=0.8, min_fraction=0.1, block_size=16),
        "clustered_s90": Clustered(top_p=0.5, min_fraction=0.02, block_size=16),
        "radial_authors": Radial.from_authors("wan"),
        "rectified_authors": RectifiedSparse.from_authors("wan21"),
    }
    for name in ("svg", "mminference"):
        try:
            out[name] = PermutedGrid.from_authors(name)
        except AttributeError:  # pragma: no cover - older grid.py
            pass
    return out

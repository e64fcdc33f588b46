"""PermutedGrid: per-head choice of a structured video pattern, executed in a permuted token order.

Candidates per head (grid ``(T, H, W)``, ``tpf = H * W``, grid token ``g`` in frame ``g // tpf`` at
in-frame position ``g % tpf``; prefix/suffix text tokens are always dense both ways):

* ``spatial``: keys in nearby frames, ``|f_q - f_k| <= spatial_frames`` (Sparse VideoGen's
  spatial head); natural (frame-major) order is already block-dense.
* ``temporal``: keys at the same spatial position in every frame, ``p_q == p_k`` (Sparse
  VideoGen's temporal head); executed in position-major order (``t = f*tpf + p -> p*T + f``),
  which makes it block-diagonal.
* ``grid(stride, phase)`` (MMInference's Grid head): every query attends the "vertical line"
  keys ``g_k % stride == phase`` and the line queries ``g_q % stride == phase`` attend every
  key; executed with the line tokens moved to the front, which makes both full block stripes.
* ``dense``.

Classification (Sparse VideoGen style, online): ``num_samples`` evenly spaced grid query rows are
scored exactly against all keys (``num_samples * S`` work, never ``S x S``); each candidate's
recall is the attention mass of those rows inside its mask (mean over rows and batch; the best
phase per stride is found from per-phase mass sums). Each head takes the cheapest (lowest token
density) candidate whose recall is ``>= recall``, else ``dense``. The choice is reused for
``profile_every`` calls per (layout, heads, device) (diffusion steps change attention slowly),
and the plan is cached per choice. Choices are recorded in ``plan.meta["head_patterns"]``.

The plan has Hp = heads, a per-head ``perm`` ``[H, S]``, and blocks classified analytically from
per-block frame/position/phase ranges in plan order (``O(S + H (S/B)^2)``), with partial blocks
evaluated exactly by :class:`GridHeadRule`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import TokenLayout
from ..plan import EMPTY, FULL, PARTIAL, BlockPlan, TokenRule, plan_from_block_mask
from .base import Pattern

__all__ = ["PermutedGrid", "MMInferenceGrid", "GridHeadRule", "DENSE", "SPATIAL", "TEMPORAL", "GRID"]

DENSE, SPATIAL, TEMPORAL, GRID = 0, 1, 2, 3
_NAMES = {DENSE: "dense", SPATIAL: "spatial", TEMPORAL: "temporal", GRID: "grid"}


@dataclass(frozen=True)
class GridHeadRule(TokenRule):
    """Per-head token rule of :class:`PermutedGrid` (plain fields, usable by a kernel).

    ``kinds``/``strides``/``phases``: one entry per head (kind codes DENSE=0, SPATIAL=1,
    TEMPORAL=2, GRID=3; stride/phase used by GRID only).
    """

    prefix: int
    num_frames: int
    tokens_per_frame: int
    spatial_frames: int
    kinds: Tuple[int, ...]
    strides: Tuple[int, ...]
    phases: Tuple[int, ...]

    def __post_init__(self):
        # CPU lookup tables built once; other devices get cached copies (never created while traced)
        object.__setattr__(self, "_dev_tables", {"cpu": tuple(torch.tensor(t, dtype=torch.long) for t in (self.kinds, self.strides, self.phases))})

    def _tables(self, device):
        cache = self.__dict__["_dev_tables"]
        hit = cache.get(str(device))
        if hit is not None:
            return hit
        tabs = tuple(t.to(device) for t in cache["cpu"])
        if not torch.compiler.is_compiling():
            cache[str(device)] = tabs
        return tabs

    def warm(self, device) -> "TokenRule":
        """Create the device lookup tables now (call before tracing the rule); returns self."""
        self._tables(torch.device(device))
        return self

    def __call__(self, h, q_idx, k_idx):
        """Bool tensor of the broadcast shape of ``h``, ``q_idx``, ``k_idx`` (original indices)."""
        n = self.num_frames * self.tokens_per_frame
        gq, gk = q_idx - self.prefix, k_idx - self.prefix
        q_in = (gq >= 0) & (gq < n)
        k_in = (gk >= 0) & (gk < n)
        gq, gk = gq.clamp(0, n - 1), gk.clamp(0, n - 1)
        kinds, strides, phases = self._tables(q_idx.device)
        h = torch.as_tensor(h, device=q_idx.device)
        kind, stride, phase = kinds[h], strides[h], phases[h]
        spatial = (gq // self.tokens_per_frame - gk // self.tokens_per_frame).abs() <= self.spatial_frames
        temporal = (gq % self.tokens_per_frame) == (gk % self.tokens_per_frame)
        grid = ((gk % stride) == phase) | ((gq % stride) == phase)
        ok = torch.where(kind == SPATIAL, spatial, torch.where(kind == TEMPORAL, temporal, grid))
        ok = (ok | (kind == DENSE)) & q_in & k_in
        return ok | ~q_in | ~k_in

    def cache_key(self):
        return ("GridHeadRule", self.prefix, self.num_frames, self.tokens_per_frame, self.spatial_frames,
                self.kinds, self.strides, self.phases)


def _block_stats(vals: torch.Tensor, valid: torch.Tensor, block: int):
    """Per-block (min, max) of ``vals`` over ``valid`` tokens: int64 ``[H, NB]`` each
    (min = +big, max = -big for blocks without valid tokens)."""
    H, S = vals.shape
    nb = -(-S // block)
    pad = nb * block - S
    big = 1 << 40
    vmin = torch.nn.functional.pad(torch.where(valid, vals, big), (0, pad), value=big).view(H, nb, block)
    vmax = torch.nn.functional.pad(torch.where(valid, vals, -big), (0, pad), value=-big).view(H, nb, block)
    return vmin.amin(-1), vmax.amax(-1)


def _block_any_all(flag: torch.Tensor, block: int):
    """Per-block any / all of BoolTensor ``[H, S]`` (padding ignored). Returns two ``[H, NB]``."""
    H, S = flag.shape
    nb = -(-S // block)
    pad = nb * block - S
    anyf = torch.nn.functional.pad(flag, (0, pad), value=False).view(H, nb, block).any(-1)
    allf = torch.nn.functional.pad(flag, (0, pad), value=True).view(H, nb, block).all(-1)
    return anyf, allf


@dataclass(frozen=True)
class PermutedGrid(Pattern):
    """Per-head spatial / temporal / grid / dense attention chosen online (module docstring).

    Args:
        recall: minimum sampled attention-mass recall for a sparse candidate (0 < recall <= 1).
        spatial_frames: frame radius of the spatial candidate.
        grid_strides: strides tried for the grid candidate (None: ``(W, H*W)``).
        num_samples: query rows sampled per call for profiling.
        block_size: block of the plan (default 128).
        profile_every: reuse the head classification for this many calls per (layout, heads, device).
    """

    recall: float = 0.9
    spatial_frames: int = 1
    grid_strides: Optional[Tuple[int, ...]] = None
    num_samples: int = 32
    block_size: int = 128
    profile_every: int = 1

    is_dynamic = True
    needs_frames = True
    candidate_kinds = None  # None: spatial, temporal and grid (subclasses restrict)
    phase_by_recall = False

    @classmethod
    def from_authors(cls, method: str = "svg", **kwargs):
        """The authors' own method of this family.

        * ``"svg"``: :class:`~vidattn.patterns.svg.SparseVideoGen` (Sparse VideoGen 1's spatial /
          temporal masks and MSE profiling as svg-project/Sparse-VideoGen @ 5ce7b01 defines them;
          see its module docstring for every deliberate difference).
        * ``"mminference"``: :class:`MMInferenceGrid` (MMInference's grid head, stride = tokens
          per frame, phase by recall).

        ``kwargs`` go to the constructor (e.g. ``sparsity=0.25`` for svg, ``recall=0.9``)."""
        if method == "svg":
            from .svg import SparseVideoGen

            return SparseVideoGen(**kwargs)
        if method == "mminference":
            return MMInferenceGrid(**kwargs)
        raise ValueError(f"method must be 'svg' or 'mminference', got {method!r}")

    def __post_init__(self):
        if isinstance(self.recall, bool) or not isinstance(self.recall, (int, float)) or not 0 < self.recall <= 1:
            raise ValueError(f"recall must be a float in (0, 1], got {self.recall!r}")
        for name, lo in (("spatial_frames", 0), ("num_samples", 1), ("block_size", 1), ("profile_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.grid_strides is not None:
            gs = tuple(self.grid_strides)
            if not gs or any(isinstance(s, bool) or not isinstance(s, int) or s < 2 for s in gs):
                raise ValueError(f"grid_strides must be a non-empty tuple of ints >= 2, got {self.grid_strides!r}")
            object.__setattr__(self, "grid_strides", gs)

    def validate(self, layout: TokenLayout) -> None:
        """Raise ``ValueError`` unless ``layout.grid`` is ``(T, H, W)``."""
        if not isinstance(layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
        if layout.ndim != 3:
            raise ValueError(f"PermutedGrid needs a (T, H, W) video grid (frames first), got grid={layout.grid}")

    def _strides(self, layout):
        T, H, W = layout.grid
        gs = self.grid_strides if self.grid_strides is not None else (W, H * W)
        return tuple(sorted({s for s in gs if s <= layout.num_grid_tokens}))

    # ------------------------------------------------------------ densities
    @staticmethod
    def _densities(layout, spatial_frames, strides):
        """Token densities of the candidates: dict with 'spatial', 'temporal' floats and
        'grid' float64 tensor ``[len(strides), max_stride]`` (inf for unused phases)."""
        T, Hh, W = layout.grid
        tpf, N, S = Hh * W, layout.num_grid_tokens, layout.seq_len
        text = S * S - N * N
        fr = torch.arange(T)
        near = int(((fr[:, None] - fr[None, :]).abs() <= spatial_frames).sum())
        out = dict(spatial=(near * tpf * tpf + text) / S ** 2, temporal=(N * T + text) / S ** 2)
        ms = max(strides) if strides else 1
        grid = torch.full((len(strides), ms), float("inf"), dtype=torch.float64)
        for i, s in enumerate(strides):
            ph = torch.arange(s)
            nph = ((N - 1 - ph) // s + 1).double()  # tokens g in [0, N) with g % s == ph
            grid[i, :s] = (nph * N + (N - nph) * nph + text) / S ** 2
        out["grid"] = grid
        return out

    # ------------------------------------------------------------ profiling
    def classify(self, layout: TokenLayout, q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None):
        """Choose a candidate per head from sampled exact attention rows.

        Args:
            q: ``[B, S, H, D]``; k: ``[B, S, Hk, D]`` (Hk divides H).
        Returns:
            ``(kinds, strides, phases, recalls)``: Python tuples of length H (recall of the choice).
        """
        self.validate(layout)
        B, S, H, D = q.shape
        layout.check_seq_len(S, name="q")
        T, Hh, W = layout.grid
        tpf, N, P = Hh * W, layout.num_grid_tokens, layout.prefix
        s = D ** -0.5 if scale is None else scale
        n = min(self.num_samples, N)
        rows_g = torch.linspace(0, N - 1, n, device=q.device).round().long()
        with torch.no_grad():
            qs = q[:, P + rows_g].float()  # [B, n, H, D]
            kk = k.float().repeat_interleave(H // k.shape[2], 2)  # [B, S, H, D]
            probs = torch.softmax(torch.einsum("bnhd,bshd->bhns", qs, kk) * s, -1)  # [B, H, n, S]
            pg = probs[..., P:P + N]  # grid keys
            m_text = probs.sum(-1) - pg.sum(-1)  # [B, H, n]
            g = torch.arange(N, device=q.device)
            f_r, p_r = rows_g // tpf, rows_g % tpf
            sp_mask = (f_r[:, None] - (g // tpf)[None]).abs() <= self.spatial_frames  # [n, N]
            tp_mask = p_r[:, None] == (g % tpf)[None]
            rec = {SPATIAL: ((pg * sp_mask).sum(-1) + m_text).mean((0, 2)),
                   TEMPORAL: ((pg * tp_mask).sum(-1) + m_text).mean((0, 2))}
            dens = self._densities(layout, self.spatial_frames, self._strides(layout))
            cands = [(torch.full((H,), dens["spatial"], dtype=torch.float64), SPATIAL, 0, 0, rec[SPATIAL]),
                     (torch.full((H,), dens["temporal"], dtype=torch.float64), TEMPORAL, 0, 0, rec[TEMPORAL])]
            for i, st in enumerate(self._strides(layout)):
                mph = torch.zeros(B, H, n, st, device=q.device)
                mph.index_add_(3, g % st, pg)  # mass per phase
                line_row = (rows_g % st)[:, None] == torch.arange(st, device=q.device)[None]  # [n, st]
                r = torch.where(line_row, torch.ones_like(mph), mph + m_text[..., None]).mean((0, 2))  # [H, st]
                d = dens["grid"][i, :st].to(q.device)
                if self.phase_by_recall:  # MMInference: the phase with the highest recall
                    ph = r.argmax(-1)
                else:
                    # best phase per head: the cheapest among those above the threshold, else the max recall
                    ok = r >= self.recall
                    score = torch.where(ok, -d.float()[None].expand_as(r) + 2.0, r - 2.0)
                    ph = score.argmax(-1)  # first index on ties (deterministic)
                cands.append((d[ph].double().cpu(), GRID, st, ph, r.gather(-1, ph[:, None])[:, 0]))
        if self.candidate_kinds is not None:
            cands = [c for c in cands if c[1] in self.candidate_kinds]
        # one host transfer for all candidates, then a tiny per-head choice on the CPU
        cands = [(d.cpu(), kind, st, ph.cpu() if torch.is_tensor(ph) else ph, rc.cpu()) for d, kind, st, ph, rc in cands]
        kinds, strides, phases, recalls = [], [], [], []
        for h in range(H):
            best = (1.0, DENSE, 1, 0, 1.0)
            for dens_h, kind, st, ph, rc in cands:
                dh = float(dens_h[h])
                rh = float(rc[h])
                if rh >= self.recall and dh < best[0]:
                    best = (dh, kind, st if kind == GRID else 1, int(ph[h]) if kind == GRID else 0, rh)
            kinds.append(best[1])
            strides.append(best[2])
            phases.append(best[3])
            recalls.append(best[4])
        return tuple(kinds), tuple(strides), tuple(phases), tuple(recalls)

    # ------------------------------------------------------------ plan
    def head_permutation(self, layout: TokenLayout, kind: int, stride: int, phase: int, device=None) -> torch.Tensor:
        """LongTensor ``[S]``: token order in which a head of this kind is block-dense."""
        if kind == TEMPORAL:
            return layout.transpose_permutation((1, 2, 0), device=device)
        if kind == GRID:
            g = torch.arange(layout.num_grid_tokens, device=device)
            key = (g % stride != phase).long() * layout.num_grid_tokens + g
            return layout.custom_permutation(torch.argsort(key))
        return layout.identity_permutation(device)

    def plan_for(self, layout: TokenLayout, kinds, strides, phases, device=None, meta=None) -> BlockPlan:
        """Plan for fixed per-head choices (tuples of length H); Bp = 1, Hp = H, perm ``[H, S]``."""
        self.validate(layout)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        T, Hh, W = layout.grid
        tpf, N, S, P, bs = Hh * W, layout.num_grid_tokens, layout.seq_len, layout.prefix, self.block_size
        H = len(kinds)
        rule = GridHeadRule(prefix=P, num_frames=T, tokens_per_frame=tpf, spatial_frames=self.spatial_frames,
                            kinds=tuple(int(x) for x in kinds), strides=tuple(int(x) for x in strides),
                            phases=tuple(int(x) for x in phases)).warm(dev)
        perm = torch.stack([self.head_permutation(layout, kd, st, ph, dev) for kd, st, ph in zip(kinds, strides, phases)])
        g = perm - P
        ng = (g < 0) | (g >= N)
        gc = g.clamp(0, N - 1)
        grid_tok = ~ng
        ng_any, ng_all = _block_any_all(ng, bs)
        fmin, fmax = _block_stats(gc // tpf, grid_tok, bs)
        pmin, pmax = _block_stats(gc % tpf, grid_tok, bs)
        st_t = torch.tensor(strides, device=dev)[:, None]
        ph_t = torch.tensor(phases, device=dev)[:, None]
        line_any, line_all = _block_any_all(ng | (gc % st_t == ph_t), bs)
        A = lambda t: t[:, :, None]  # noqa: E731  query block axis
        C = lambda t: t[:, None, :]  # noqa: E731  key block axis
        text_full = A(ng_all) | C(ng_all)
        text_any = A(ng_any) | C(ng_any)
        # spatial: frame ranges
        maxd = torch.maximum(A(fmax) - C(fmin), C(fmax) - A(fmin))
        mind = torch.maximum(torch.maximum(A(fmin) - C(fmax), C(fmin) - A(fmax)), torch.zeros_like(maxd))
        sf = self.spatial_frames
        sp_cls = torch.where(text_full | (maxd <= sf), FULL, torch.where(~text_any & (mind > sf), EMPTY, PARTIAL))
        # temporal: position ranges
        single = A((pmin == pmax)) & C((pmin == pmax)) & (A(pmin) == C(pmin))
        disjoint = (A(pmax) < C(pmin)) | (C(pmax) < A(pmin))
        tp_cls = torch.where(text_full | single, FULL, torch.where(~text_any & disjoint, EMPTY, PARTIAL))
        # grid: line tokens (or text) in query rows / key columns
        gr_cls = torch.where(A(line_all) | C(line_all), FULL, torch.where(~A(line_any) & ~C(line_any), EMPTY, PARTIAL))
        kind_t = torch.tensor(kinds, device=dev)[:, None, None]
        cls = torch.where(kind_t == SPATIAL, sp_cls, torch.where(kind_t == TEMPORAL, tp_cls,
                                                                 torch.where(kind_t == GRID, gr_cls, FULL)))
        dens = self._densities(layout, sf, tuple(sorted(set(int(s) for s in strides))))
        per_head = []
        for kd, st, ph in zip(kinds, strides, phases):
            if kd == SPATIAL:
                per_head.append(dens["spatial"])
            elif kd == TEMPORAL:
                per_head.append(dens["temporal"])
            elif kd == GRID:
                i = sorted(set(int(s) for s in strides)).index(int(st))
                per_head.append(float(dens["grid"][i, ph]))
            else:
                per_head.append(1.0)
        m = dict(pattern="permuted_grid", head_patterns=[_NAMES[kd] if kd != GRID else f"grid(stride={st},phase={ph})"
                                                          for kd, st, ph in zip(kinds, strides, phases)],
                 head_densities=per_head)
        m.update(meta or {})
        return plan_from_block_mask(cls[None].to(torch.int8), seq_len=S, block_q=bs, block_k=bs, rule=rule, perm=perm,
                                    token_density=sum(per_head) / H, meta=m)

    def plan(self, layout: TokenLayout, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None,
             v: Optional[torch.Tensor] = None, *, scale: Optional[float] = None, num_heads: int = 1,
             device=None) -> BlockPlan:
        """Classify heads from ``q``/``k`` (``[B, S, H, D]``/``[B, S, Hk, D]``), reusing the last
        classification for ``profile_every`` calls, and return the per-head permuted plan."""
        if q is None or k is None:
            raise ValueError("PermutedGrid is dynamic: plan() needs q [B, S, H, D] and k [B, S, Hk, D]")
        if not isinstance(q, torch.Tensor) or q.dim() != 4 or not isinstance(k, torch.Tensor) or k.dim() != 4:
            raise ValueError("q and k must be tensors [B, S, heads, D]")
        self.validate(layout)
        dev = torch.device(device) if device is not None else q.device
        cache = self.__dict__.setdefault("_state", {})
        key = (layout, q.shape[2], str(dev))
        ent = cache.get(key)
        if ent is None or ent["calls"] >= self.profile_every:
            kinds, strides, phases, recalls = self.classify(layout, q, k)
            choice = (kinds, strides, phases)
            if ent is not None and ent["choice"] == choice:
                plan = ent["plan"]
            else:
                plan = self.plan_for(layout, kinds, strides, phases, device=dev, meta=dict(head_recalls=list(recalls)))
            if len(cache) > 16:
                cache.clear()
            ent = cache[key] = dict(choice=choice, plan=plan, calls=0)
        ent["calls"] += 1
        return ent["plan"]


@dataclass(frozen=True)
class MMInferenceGrid(PermutedGrid):
    """MMInference's grid head for video (Li et al., "MMInference: Accelerating Pre-filling for
    Long-Context VLMs via Modality-Aware Permutation Sparse Attention", arXiv:2504.16083).

    Written from the paper: microsoft/MInference at commit
    ``fb56c917f618e8645f1cfc37535afd7424d78f0d`` ships only the README entry for MMInference (no
    grid-head code), so there is no code to follow. Per head: stride = tokens per frame
    (``H * W``), keys with ``g % stride == phase`` (vertical lines) visible to every query, line
    queries attend every key (horizontal lines), executed with the line tokens permuted to the
    front (the paper's permutation, here a plan order instead of strided loads). The phase is the
    one with the highest attention-mass recall on ``num_samples`` evenly spaced sampled query rows
    (the paper searches it offline by recall; here online, reused for ``profile_every`` calls);
    a head whose best recall is below ``recall`` runs dense. Deliberate differences: no local
    window / slash lines and no A-shape / vertical-slash head types (the paper assigns those to
    other heads offline); text tokens dense both ways.
    """

    candidate_kinds = (GRID,)
    phase_by_recall = True

    def _strides(self, layout):
        T, H, W = layout.grid
        return (H * W,) if H * W <= layout.num_grid_tokens and H * W >= 2 else ()

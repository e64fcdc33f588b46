"""Sparse attention under diffusers context parallelism (Ulysses, Ring, and both).

The ``"vidattn"`` diffusers backend declares ``supports_context_parallel=True``; for a sparse
self-attention call under ``transformer.enable_parallelism(config=ContextParallelConfig(...))`` it
calls diffusers' context-parallel template (through :mod:`vidattn.pipelines.diffusers_compat`)
with the forward op below. diffusers does
the communication; this module makes the sparse computation equal to the single-process one:

* **Token order.** Each rank holds a contiguous shard of every sequence diffusers' ``_cp_plan``
  splits. For Wan / LTX (video tokens only) the gathered sequence is the single-process order. For
  FLUX the text is split too, so rank ``r``'s joint sequence is ``[text_r, image_r]`` and the
  gathered one ``[text_0, image_0, text_1, image_1, ...]``; :func:`cp_order` maps it to the
  canonical ``[text, image]`` order the pattern's layout describes (a gather before, a scatter
  after).
* **Ulysses** (``ulysses_degree = U``): after diffusers' all-to-all each rank has the full
  sequence for heads ``u * H/U .. (u + 1) * H/U - 1``. Static per-head plans (and ``heads=``
  subsets) are indexed by these *global* head ids (:func:`slice_plan_heads`); dynamic patterns
  (PermutedGrid, RectifiedSparse, ...) classify each head from that head's own full-sequence
  q/k, which is what the single process does.
* **Ring** (``ring_degree = R``): diffusers' ``TemplatedRingAttention`` all-gathers the K/V
  chunks and calls the forward op once per ring step ``i`` with the chunk of ring rank
  ``(r + i) % R`` (step 0: its own), asking for the LSE, and merges the partial outputs by LSE.
  vidattn's op (:class:`_CpOp`) counts the steps and runs, per step, the *global* plan sliced to
  that (query chunk, key chunk) pair in global block coordinates (:func:`shard_plan`): the query
  blocks and key blocks the two chunks are made of (in the plan's token order: tiled / permuted
  orders included), the key-block tables remapped to the chunk, fused rectification terms
  sliced, the token rule mapped back to global token ids (:class:`ShardRule`). It returns the
  kernel's LSE; rows with no key in a chunk get LSE ``-inf`` and output 0 (a no-op in the merge).
  Static plans are built from the layout and sliced once (cached per plan); dynamic ones
  (RectifiedSparse, PermutedGrid, ...) are planned from q/k/v gathered over the ring group, so the
  block statistics are pooled over the full sequence and every rank selects the same blocks.
  A chunk that cuts plan blocks is re-blocked (:func:`reblocked_shard_plan`: its own tokens cut
  into blocks, listed where they cover a listed global block pair, partial under
  :class:`ListedShardRule`). When the plan has an output epilogue (Rectified
  ``method="authors"``: ``out * scale + shift`` is not mergeable by LSE), fused rectification
  terms or a per-batch plan on chunks that cut blocks, ``heads=`` mixes dense heads, or a query
  row might attend no key of its own chunk (diffusers' merge starts from step 0
  and would produce NaN), the decision - taken from every chunk, so every rank takes it alike -
  is the all-gather path instead, with one warning: K/V (and Q for dynamic patterns) gathered,
  the global plan restricted to the local query blocks, the whole answer on step 0 and LSE
  ``-inf`` on the later steps. ``stats.ring_shard_calls`` / ``ring_gathered_calls`` count both.
  Ring backward raises ``NotImplementedError``.
* **Both** (``ring_degree > 1`` and ``ulysses_degree > 1``): diffusers' unified attention does
  the Ulysses all-to-all inside each ring group and then Ring; the same op handles it (head
  offset from the Ulysses rank, rows from the ring rank).

Head load balance: :func:`head_balance` reports, for per-head plan densities, the work of each
Ulysses rank and the imbalance (max / mean), and a balanced head order (greedy) - applying it
means permuting the attention heads of the QKV / output projections, which vidattn does not do
to a model by itself.

The multi-process benchmark worker lives here too (:func:`bench_worker`), so
``torch.multiprocessing.spawn`` can import it by module name (``benchmarks/parallel.py`` and
``vidattn bench parallel`` drive it).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .backends import warn_once

__all__ = ["cp_order", "slice_plan_heads", "restrict_plan_rows", "shard_plan", "reblocked_shard_plan",
           "rows_attend_own_shard", "RingShards",
           "ring_shards", "sparse_attention_cp", "head_balance", "cp_degrees", "bench_worker"]


def _compat():
    from vidattn.pipelines import diffusers_compat

    return diffusers_compat


# =============================================================================== geometry
def cp_degrees(parallel_config) -> Tuple[int, int]:
    """``(ring_degree, ulysses_degree)`` of a diffusers ``ParallelConfig``."""
    cp = parallel_config.context_parallel_config
    return int(cp.ring_degree), int(cp.ulysses_degree)


@functools.lru_cache(maxsize=64)
def _cp_order_cached(seq_len: int, text: int, text_pos: Optional[str], world: int, text_split: bool):
    if world == 1 or not text or not text_split:
        return None
    if seq_len % world or text % world:
        raise ValueError(f"context parallelism needs the {seq_len}-token sequence and its {text} text tokens "
                         f"divisible by the world size {world}")
    n = seq_len - text
    tl, nl = text // world, n // world
    canon = []
    for r in range(world):
        t_idx = list(range(r * tl, (r + 1) * tl))
        i_idx = list(range(text + r * nl, text + (r + 1) * nl)) if text_pos == "prefix" else \
            list(range(r * nl, (r + 1) * nl))
        if text_pos == "prefix":
            canon += t_idx + i_idx
        else:  # suffix: text after the grid, per shard [image_r, text_r]
            canon += i_idx + [n + i for i in t_idx]
    canon_of_cp = torch.tensor(canon, dtype=torch.long)
    cp_of_canon = torch.empty_like(canon_of_cp)
    cp_of_canon[canon_of_cp] = torch.arange(seq_len)
    return canon_of_cp, cp_of_canon


def cp_order(layout, world: int, text_split: bool, device=None):
    """Index maps between the gathered context-parallel token order and the canonical one.

    Args:
        layout: the canonical :class:`~vidattn.TokenLayout` (``seq_len`` tokens, text
            ``prefix``/``suffix``).
        world: number of sequence shards.
        text_split: whether each shard carries its slice of the text (FLUX) or no text.
    Returns:
        None when the orders agree, else ``(canon_of_cp, cp_of_canon)``: LongTensors ``[S]`` with
        ``x_canon = x_cp[:, cp_of_canon]`` and ``x_cp = x_canon[:, canon_of_cp]``.
    """
    text = int(layout.prefix + layout.suffix)
    pos = "prefix" if layout.prefix else ("suffix" if layout.suffix else None)
    res = _cp_order_cached(int(layout.seq_len), text, pos, int(world), bool(text_split))
    if res is None or device is None:
        return res
    return tuple(t.to(device) for t in res)


def slice_plan_heads(plan, head_ids: Sequence[int], total_heads: int):
    """The plan of heads ``head_ids`` (global ids) of a plan built for ``total_heads`` heads.
    Plans shared by all heads (``plan_heads == 1``) are returned as they are."""
    if plan.plan_heads == 1:
        return plan
    if plan.plan_heads != total_heads:
        raise ValueError(f"plan has {plan.plan_heads} heads, expected 1 or {total_heads}")
    if plan.rectification is not None:
        raise ValueError("cannot slice the heads of a plan with rectification terms; build it from the local heads")
    idx = torch.as_tensor(list(head_ids), dtype=torch.long, device=plan.kv_num_blocks.device)
    perm = plan.perm
    if perm is not None and perm.shape[0] > 1:
        perm = perm.index_select(0, idx.to(perm.device))
    sl = {f: getattr(plan, f).index_select(1, idx) for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                               "full_kv_indices")}
    return _replace(plan, perm=perm, **sl)


def _replace(plan, **fields):
    new = dataclasses.replace(plan, **fields)
    for k in ("block_density", "has_partial"):
        new.__dict__.pop(k, None)
    return new


def restrict_plan_rows(plan, rows: torch.Tensor):
    """The plan with only the query blocks that contain a token of ``rows`` (bool ``[S]``,
    canonical token order) kept; the other query blocks list no key block. With a per-head token
    permutation the blocks are taken in plan order, per head."""
    S = plan.seq_len
    bq = plan.block_q
    nqb = plan.num_q_blocks
    rows = rows.to(plan.kv_num_blocks.device)
    if plan.perm is None:
        pad = torch.zeros(nqb * bq, dtype=torch.bool, device=rows.device)
        pad[:S] = rows
        keep = pad.view(nqb, bq).any(1)[None, None]  # [1, 1, NQB]
    else:
        perm = plan.perm.to(rows.device)
        tok = rows[perm]  # [Hp, S] in plan order
        pad = torch.zeros(perm.shape[0], nqb * bq, dtype=torch.bool, device=rows.device)
        pad[:, :S] = tok
        keep = pad.view(perm.shape[0], nqb, bq).any(2)[None]  # [1, Hp, NQB]
    keep = keep.to(plan.kv_num_blocks.dtype)
    return _replace(plan, kv_num_blocks=plan.kv_num_blocks * keep, full_kv_num_blocks=plan.full_kv_num_blocks * keep)



# =============================================================================== Ring: per-shard plans
class ShardRule:
    """A plan's token rule on a shard pair: local query / key index ``i`` is global token
    ``q_tokens[i]`` / ``k_tokens[i]`` (LongTensors ``[s]``, canonical order). No kernel form:
    kernels evaluate it as per-block masks."""

    def __init__(self, rule, q_tokens: torch.Tensor, k_tokens: torch.Tensor):
        self.rule, self.q_tokens, self.k_tokens = rule, q_tokens, k_tokens

    def __call__(self, h, q_idx, k_idx):
        return self.rule(h, self.q_tokens[q_idx], self.k_tokens[k_idx])

    def kernel_form(self):
        return None


def _local_blocks(perm: Optional[torch.Tensor], tokens: torch.Tensor, block: int, S: int):
    """For a shard of canonical tokens ``tokens [s]`` and a plan order ``perm [Hp, S]`` (None =
    identity): ``(blocks [Hp, s/block]`` the global plan-block ids the shard is made of, ascending;
    ``local_perm [Hp, s]`` the shard's local indices in that plan order``)``, or None when the
    shard is not exactly a union of whole plan blocks (for every head)."""
    s = tokens.numel()
    if s % block:
        return None
    dev = tokens.device
    perm = torch.arange(S, device=dev)[None] if perm is None else perm.to(dev)
    hp = perm.shape[0]
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(S, device=dev).expand(hp, S).contiguous())
    pos, local_perm = inv[:, tokens].sort(dim=1)  # plan positions of the shard's tokens, ascending
    chunks = pos.view(hp, s // block, block)
    start = chunks[:, :, :1]
    if bool((start % block != 0).any()) or not bool((chunks == start + torch.arange(block, device=dev)).all()):
        return None
    return start[:, :, 0] // block, local_perm


def _take(t: torch.Tensor, dim: int, ix: torch.Tensor, heads: int) -> torch.Tensor:
    """``t [Bp, Hx, ...]`` (Hx = 1 or ``heads``) gathered along ``dim`` with per-head ``ix [heads, n]``."""
    shape = list(t.shape)
    shape[1] = heads
    t = t.expand(shape)
    view = [1] * t.dim()
    view[1], view[dim] = heads, ix.shape[1]
    out_shape = list(shape)
    out_shape[dim] = ix.shape[1]
    return t.gather(dim, ix.view(view).expand(out_shape))


def _perm_or_none(local_perm: torch.Tensor) -> Optional[torch.Tensor]:
    return None if _identity_perm(local_perm) else local_perm


class ListedShardRule(ShardRule):
    """:class:`ShardRule` for a re-blocked shard pair: a (query, key) pair is allowed when its
    global block pair is full, or partial and the plan's rule admits it (``classes [Hp, NQB,
    NKB]`` int8: 0 skip, 1 partial, 2 full; ``q_blocks`` / ``k_blocks [Hp, s]``: global plan block
    of each local token)."""

    def __init__(self, rule, q_tokens, k_tokens, classes, q_blocks, k_blocks):
        super().__init__(rule, q_tokens, k_tokens)
        self.classes, self.q_blocks, self.k_blocks = classes, q_blocks, k_blocks

    def __call__(self, h, q_idx, k_idx):
        hh = h if self.classes.shape[0] > 1 else torch.zeros_like(h)
        cls = self.classes[hh, self.q_blocks[hh, q_idx], self.k_blocks[hh, k_idx]]
        allowed = cls == 2
        if self.rule is not None:
            allowed = allowed | ((cls == 1) & self.rule(h, self.q_tokens[q_idx], self.k_tokens[k_idx]))
        return allowed


def _global_classes(plan, heads: int) -> torch.Tensor:
    """int8 ``[heads, NQB, NKB]`` block classes of a ``Bp = 1`` plan (0 skip, 1 partial, 2 full)."""
    dev = plan.kv_num_blocks.device
    cls = torch.zeros(heads, plan.num_q_blocks, plan.num_k_blocks + 1, dtype=torch.int8, device=dev)
    for num, idx, val in ((plan.kv_num_blocks, plan.kv_indices, 1), (plan.full_kv_num_blocks, plan.full_kv_indices, 2)):
        num, idx = num[0].expand(heads, -1), idx[0].expand(heads, -1, -1).long()
        listed = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        cls.scatter_(2, torch.where(listed, idx, plan.num_k_blocks), torch.full_like(idx, val, dtype=torch.int8))
    return cls[..., :-1]


def _local_order(perm: Optional[torch.Tensor], tokens: torch.Tensor, block: int, S: int):
    """``(local_perm [Hp, s], global_block [Hp, s])``: the shard's local indices sorted by plan
    position, and the global plan block of each local token."""
    dev = tokens.device
    perm = torch.arange(S, device=dev)[None] if perm is None else perm.to(dev)
    hp = perm.shape[0]
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(S, device=dev).expand(hp, S).contiguous())
    pos = inv[:, tokens]
    return pos.argsort(dim=1), pos // block


def reblocked_shard_plan(plan, q_tokens: torch.Tensor, k_tokens: torch.Tensor):
    """Like :func:`shard_plan` for shards that are not whole plan blocks: the shard's own tokens,
    in plan order, are cut into blocks of the plan's size; a local block pair is listed when it
    covers a listed global block pair, full when every pair it covers is full and it has no
    padding, else partial with :class:`ListedShardRule` (the global block classes plus the
    plan's rule). Returns the plan or why not (plans per batch element, fused rectification
    terms: both need whole blocks)."""
    if plan.plan_batch != 1:
        return "the plan differs per batch element and the shards are not whole blocks"
    rect = plan.rectification
    if rect is not None:
        return "the plan has rectification terms and the shards are not whole blocks"
    dev = plan.kv_num_blocks.device
    q_tokens, k_tokens = q_tokens.to(dev), k_tokens.to(dev)
    s, bq, bk = int(q_tokens.numel()), plan.block_q, plan.block_k
    qperm, qglob = _local_order(plan.perm, q_tokens, bq, plan.seq_len)
    kperm, kglob = _local_order(plan.key_perm, k_tokens, bk, plan.seq_len)
    he = max(plan.plan_heads, qperm.shape[0], kperm.shape[0])
    qperm, kperm = qperm.expand(he, s), kperm.expand(he, s)
    qglob, kglob = qglob.expand(he, s), kglob.expand(he, s)
    gcls = _global_classes(plan, he)  # [He, NQB, NKB]
    nql, nkl = -(-s // bq), -(-s // bk)

    def cover(perm_l, glob, block, nl, ng):  # [He, nl, ng]: local block l holds tokens of global block g
        gb = glob.gather(1, perm_l)  # global block of each local token in local plan order
        if nl * block > s:  # ragged last local block: repeat its last token (same set of blocks)
            gb = torch.cat([gb, gb[:, -1:].expand(he, nl * block - s)], dim=1)
        m = torch.zeros(he, nl, ng, device=dev)
        return m.scatter_(2, gb.view(he, nl, block), 1.0)

    mq = cover(qperm, qglob, bq, nql, plan.num_q_blocks)
    mk = cover(kperm, kglob, bk, nkl, plan.num_k_blocks)
    listed = torch.einsum("hiq,hqk,hjk->hij", mq, (gcls > 0).float(), mk) > 0
    nfull = torch.einsum("hiq,hqk,hjk->hij", mq, (gcls == 2).float(), mk)
    npairs = mq.sum(-1)[:, :, None] * mk.sum(-1)[:, None, :]
    whole_q = torch.arange(nql, device=dev) < s // bq
    whole_k = torch.arange(nkl, device=dev) < s // bk
    full = listed & (nfull == npairs) & whole_q[None, :, None] & whole_k[None, None, :]
    classes = torch.where(full, 2, torch.where(listed, 1, 0)).to(torch.int8)[None]
    qp = None if _identity_perm(qperm) else qperm
    kp = None if _identity_perm(kperm) else kperm
    if (qp is None) != (kp is None) or (qp is not None and not torch.equal(qp, kp)):
        ident = torch.arange(s, device=dev)[None].expand(he, s)
        qp, kp = (ident if qp is None else qp), (ident if kp is None else kp)
    else:
        kp = None
    rule = ListedShardRule(plan.rule, q_tokens, k_tokens, gcls, qglob, kglob)
    from vidattn.plan import plan_from_block_mask

    return plan_from_block_mask(classes, seq_len=s, block_q=bq, block_k=bk, rule=rule, perm=qp, kv_perm=kp,
                                token_density=plan.token_density, meta=dict(plan.meta, ring_reblocked=True))


def shard_plan(plan, q_tokens: torch.Tensor, k_tokens: torch.Tensor):
    """The global ``plan`` sliced to one (query shard, key shard) pair in global block
    coordinates: a plan of ``s = len(q_tokens)`` tokens (local indices into the shards) whose
    query blocks are the global plan blocks the query shard is made of and whose key blocks the
    key shard's, listing only the global plan's (query block, key block) pairs inside the pair;
    its token order (``perm`` / ``kv_perm``) is the global plan order restricted to the shards.
    Returns the plan, or a string saying why the pair cannot be sliced (the caller falls back to
    the all-gather path): a shard that is not a union of whole plan blocks, an output epilogue."""
    rect = plan.rectification
    if rect is not None and rect.has_epilogue:
        return "the plan has an output epilogue (not mergeable by LSE)"
    if q_tokens.numel() != k_tokens.numel():
        return "query and key shards differ in length"
    dev = plan.kv_num_blocks.device
    q_tokens, k_tokens = q_tokens.to(dev), k_tokens.to(dev)
    ql = _local_blocks(plan.perm, q_tokens, plan.block_q, plan.seq_len)
    kl = _local_blocks(plan.key_perm, k_tokens, plan.block_k, plan.seq_len)
    if ql is None or kl is None:  # shards cut plan blocks: re-block the shards' own tokens
        return reblocked_shard_plan(plan, q_tokens, k_tokens)
    (qb, qperm), (kb, kperm) = ql, kl
    he = max(plan.plan_heads, qb.shape[0], kb.shape[0])
    qb, kb = qb.expand(he, -1), kb.expand(he, -1)
    nk = kb.shape[1]
    kmap = torch.full((he, plan.num_k_blocks), -1, dtype=torch.long, device=dev)
    kmap.scatter_(1, kb, torch.arange(nk, device=dev).expand(he, nk).contiguous())

    def sub(num, idx):
        num, idx = _take(num, 2, qb, he), _take(idx, 2, qb, he)
        bp, m = idx.shape[0], idx.shape[-1]
        loc = kmap[None].expand(bp, he, -1).gather(2, idx.long().reshape(bp, he, -1)).view(idx.shape)
        keep = (torch.arange(m, device=dev) < num[..., None]) & (loc >= 0)
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
        loc, keep = loc.gather(-1, order), keep.gather(-1, order)
        return keep.sum(-1).to(num.dtype), torch.where(keep, loc, 0).to(idx.dtype)

    kvn, kvi = sub(plan.kv_num_blocks, plan.kv_indices)
    fn, fi = sub(plan.full_kv_num_blocks, plan.full_kv_indices)
    if rect is not None:
        pick = lambda t: None if t is None else _take(_take(t, 2, qb, he), 3, kb, he)  # noqa: E731
        pool = lambda t: None if t is None else _take(t, 2, kb, he)  # noqa: E731
        rect = dataclasses.replace(rect, kept_log_scale=pick(rect.kept_log_scale),
                                   pooled_log_weight=pick(rect.pooled_log_weight), pooled_k=pool(rect.pooled_k),
                                   pooled_v=pool(rect.pooled_v))
    qp, kp = _perm_or_none(qperm), _perm_or_none(kperm)
    if qp is not None or kp is not None:
        s = q_tokens.numel()
        ident = torch.arange(s, device=dev)[None]
        qp = (ident if qp is None else qp).expand(he, s)
        kp = (ident if kp is None else kp).expand(he, s)
        if torch.equal(qp, kp):  # both shards in the same local order: keys follow perm
            kp = None
    rule = None if plan.rule is None else ShardRule(plan.rule, q_tokens, k_tokens)
    return _replace(plan, seq_len=int(q_tokens.numel()), kv_num_blocks=kvn, kv_indices=kvi, full_kv_num_blocks=fn,
                    full_kv_indices=fi, rule=rule, perm=qp, kv_perm=kp, rectification=rect)


def _identity_perm(perm: torch.Tensor) -> bool:
    return bool((perm == torch.arange(perm.shape[-1], device=perm.device)).all())


_EXACT_CHECK_BLOCKS = 4096  # query blocks the exact own-shard check may evaluate token by token


def rows_attend_own_shard(sub) -> bool:
    """Whether every query row of a (shard, same shard) plan attends at least one key.
    diffusers' Ring merge starts from the own-shard result, and a row with LSE ``-inf`` there
    would turn the merge into NaN. Cheap first: a full block, or the diagonal block listed as
    partial with the rule admitting each token itself; the query blocks that leaves open are
    checked token by token over their listed partial blocks (up to ``_EXACT_CHECK_BLOCKS`` of
    them; more counts as not shown)."""
    ok = sub.full_kv_num_blocks > 0  # [Bp, Hp, NQB]
    if sub.rule is None:
        return bool(ok.all())
    dev = ok.device
    S, nq, bq, bk = sub.seq_len, sub.num_q_blocks, sub.block_q, sub.block_k
    hp = max(sub.kv_num_blocks.shape[1], 1 if sub.perm is None else sub.perm.shape[0])
    listed = torch.arange(sub.kv_indices.shape[-1], device=dev) < sub.kv_num_blocks[..., None]
    if bq == bk:
        j = torch.arange(nq, device=dev)
        diag = ((sub.kv_indices == j[:, None]) & listed).any(-1)
        t = torch.arange(S, device=dev)
        selfok = sub.rule(torch.arange(hp, device=dev)[:, None], t[None], t[None]).expand(hp, S)
        if sub.perm is not None:  # token -> plan order
            selfok = selfok.gather(1, sub.perm.to(dev).expand(hp, S))
        pad = torch.ones(hp, nq * bq, dtype=torch.bool, device=dev)
        pad[:, :S] = selfok
        ok = ok | (diag & pad.view(hp, nq, bq).all(-1)[None])
    open_blocks = (~ok).nonzero().tolist()
    if len(open_blocks) > _EXACT_CHECK_BLOCKS:
        return False
    qperm = None if sub.perm is None else sub.perm.to(dev)
    kperm = None if sub.key_perm is None else sub.key_perm.to(dev)

    def tokens(perm, h, blk, size):
        pos = torch.arange(blk * size, min((blk + 1) * size, S), device=dev)
        return pos if perm is None else perm[min(h, perm.shape[0] - 1), pos]

    for b, h, jq in open_blocks:
        hb = min(h, sub.kv_indices.shape[1] - 1)
        blocks = sub.kv_indices[min(b, sub.kv_indices.shape[0] - 1), hb, jq][listed[b, hb, jq]].tolist()
        if not blocks:
            return False
        rows = tokens(qperm, h, jq, bq)
        keys = torch.cat([tokens(kperm, h, kb, bk) for kb in blocks])
        hit = sub.rule(torch.tensor(h, device=dev), rows[:, None], keys[None, :])
        if not bool(hit.expand(rows.numel(), keys.numel()).any(1).all()):
            return False
    return True


class RingShards:
    """The per-(query shard, key shard) plans of one global plan on a ring of ``R`` chunks of
    ``s`` tokens (``tokens[r]``: canonical ids of chunk ``r``), built lazily; ``reason`` is None
    when every pair slices and every chunk's rows attend inside their own chunk, else why not
    (then the all-gather path runs). The decision uses every chunk, so every rank takes it alike."""

    def __init__(self, plan, tokens: List[torch.Tensor]):
        self.plan, self.tokens = plan, tokens
        self._subs: Dict[Tuple[int, int], object] = {}
        self.reason = None
        for r in range(len(tokens)):
            sub = self.sub(r, r)
            if isinstance(sub, str):
                self.reason = sub
                break
            if not rows_attend_own_shard(sub):
                self.reason = "a query row attends no key of its own shard (diffusers' LSE merge needs one)"
                break

    def sub(self, r: int, c: int):
        key = (r, c)
        if key not in self._subs:
            self._subs[key] = shard_plan(self.plan, self.tokens[r], self.tokens[c])
        return self._subs[key]


_ring_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def ring_shards(plan, layout, R: int, world: int, text_split: bool, device) -> RingShards:
    """:class:`RingShards` of ``plan`` (cached per static plan object)."""
    key = (R, world, text_split)
    per = _ring_cache.get(plan)
    if per is not None and key in per:
        return per[key]
    S = int(layout.seq_len)
    order = cp_order(layout, world, text_split, device=device)
    canon = order[0] if order is not None else torch.arange(S, device=device)
    s = S // R
    res = RingShards(plan, [canon[r * s:(r + 1) * s] for r in range(R)])
    try:
        _ring_cache.setdefault(plan, {})[key] = res
    except TypeError:  # pragma: no cover - plan type without weak references
        pass
    return res


# =============================================================================== the forward op
def _all_gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``[B, s, H, D]`` along the sequence over ``group`` (rank order)."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


class _CpOp:
    """diffusers templated-CP forward op for one sparse attention call (``[B, s, h, D]`` in and
    out, LSE ``[B, s, h]``). diffusers' Ring calls it once per ring step ``i`` with the key/value
    chunk of ring rank ``(r + i) % R`` (step 0: its own); the call count gives ``i``."""

    def __init__(self, proc, layout, state, layer):
        self.proc, self.layout, self.state, self.layer = proc, layout, state, layer
        self.calls = 0
        self.shards = None
        self.gathered = False

    def __call__(self, ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        proc, layout, state, layer = self.proc, self.layout, self.state, self.layer
        cp = _parallel_config.context_parallel_config
        R, U = int(cp.ring_degree), int(cp.ulysses_degree)
        world = R * U
        H_loc = query.shape[2]
        mesh = _compat().cp_mesh(cp)
        head_off = int(mesh["ulysses"].get_local_rank()) * H_loc if U > 1 else 0
        total = H_loc * U
        text_split = state.info.cp_text_split
        if R == 1:  # Ulysses: the full sequence, a slice of the heads
            if _save_ctx:
                ctx.save_for_backward(query, key, value)
                ctx.vidattn = (proc, layout, state, layer, scale, head_off, total, world, text_split)
            out, lse = _ulysses_compute(proc, query, key, value, layout, scale, head_off, total, world, text_split,
                                        return_lse, state, layer)
            return (out, lse) if return_lse else out
        step = self.calls
        self.calls += 1
        ring = mesh["ring"]
        r = int(ring.get_local_rank())
        if step == 0:
            ctx.save_for_backward(query, key, value)
            plan, why = _ring_plan(proc, query, key, value, layout, scale, head_off, total, R, world, text_split,
                                   ring.get_group())
            if why is None:
                self.shards = ring_shards(plan, layout, R, world, text_split, query.device)
                why = self.shards.reason
            if why is not None:
                warn_once(f"ring:{type(proc.pattern).__name__}:{why}",
                           f"vidattn Ring: {why}; {type(proc.pattern).__name__} runs on all-gathered K/V instead of "
                           f"per-shard plans")
                self.gathered = True
                _count(state, "ring_gathered_calls")
                return _ring_gathered(proc, query, key, value, layout, scale, head_off, total, R, r, world,
                                      text_split, ring.get_group(), state, layer)
            _record(proc, state, layout, layer, plan, head_off, H_loc)
        if self.gathered:  # the whole answer came on step 0: an exact no-op in diffusers' merge
            return torch.zeros_like(query), torch.full(query.shape[:3], float("-inf"), dtype=torch.float32,
                                                       device=query.device)
        sub = self.shards.sub(r, (r + step) % R)
        from vidattn.attention import run_plan

        out, lse = run_plan(query, key, value, sub, backend=proc.backend, scale=scale, return_lse=True)
        lse = lse.transpose(1, 2).contiguous()  # [B, s, h]
        out = torch.where(torch.isfinite(lse)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        _count(state, "ring_shard_calls")
        return out, lse


def _count(state, name: str) -> None:
    if not torch.compiler.is_compiling():
        setattr(state.stats, name, getattr(state.stats, name) + 1)


def _ring_plan(proc, query, key, value, layout, scale, head_off, total, R, world, text_split, group):
    """The global plan of this call's heads for the per-shard Ring path, or ``(None, reason)``.
    Static patterns plan from the layout alone; dynamic ones from q/k/v gathered over the ring
    group (so the block statistics are pooled over the full sequence and every rank selects the
    same blocks)."""
    p = proc.pattern
    if proc.heads is not None:
        return None, "heads= subsets mix sparse and dense heads"
    H = query.shape[2]
    ids = None if (head_off == 0 and total == H) else list(range(head_off, head_off + H))
    if not p.is_dynamic:
        p.validate(layout)
        plan = p.plan(layout, num_heads=total, device=query.device)
        return (plan if ids is None else slice_plan_heads(plan, ids, total)), None
    q_all, k_all, v_all = (_all_gather_seq(t, group) for t in (query, key, value))
    order = cp_order(layout, world, text_split, device=query.device)
    if order is not None:
        q_all, k_all, v_all = (t.index_select(1, order[1]) for t in (q_all, k_all, v_all))
    return proc._plan(q_all, k_all, v_all, layout, scale, ids, total), None


def _ring_gathered(proc, query, key, value, layout, scale, head_off, total, R, r, world, text_split, group, state,
                   layer):
    """Ring fallback: the whole answer of this rank's rows on the first ring step, from K/V (and
    Q for dynamic patterns) all-gathered over the ring group and the global plan restricted to
    the local query blocks."""
    H_loc = query.shape[2]
    s = query.shape[1]
    S = s * R
    # gathered order: ring chunk c = concat over the Ulysses ranks of shards c*U + u = flattened CP order
    k_all, v_all = _all_gather_seq(key, group), _all_gather_seq(value, group)
    if proc.pattern.is_dynamic:
        q_all = _all_gather_seq(query, group)
    else:
        q_all = query.new_zeros(query.shape[0], S, H_loc, query.shape[3])
        q_all[:, r * s:(r + 1) * s] = query
    order = cp_order(layout, world, text_split, device=query.device)
    local_cp = torch.zeros(S, dtype=torch.bool, device=query.device)
    local_cp[r * s:(r + 1) * s] = True
    if order is not None:
        canon_of_cp, cp_of_canon = order
        q_all, k_all, v_all = (t.index_select(1, cp_of_canon) for t in (q_all, k_all, v_all))
        rows = local_cp.index_select(0, cp_of_canon)
        local_canon = canon_of_cp[r * s:(r + 1) * s]
    else:
        rows = local_cp
        local_canon = torch.arange(r * s, (r + 1) * s, device=query.device)
    (out, lse), plan = proc._attend(q_all, k_all, v_all, layout, scale, head_offset=head_off, total_heads=total,
                                    return_lse=True, restrict=lambda p: restrict_plan_rows(p, rows))
    out = out.index_select(1, local_canon)
    lse = lse.index_select(2, local_canon).transpose(1, 2).contiguous()  # [B, s, h]
    _record(proc, state, layout, layer, plan, head_off, H_loc)
    return out, lse


def _ulysses_compute(proc, q, k, v, layout, scale, head_off, total, world, text_split, return_lse, state, layer,
                     record=True):
    order = cp_order(layout, world, text_split, device=q.device)
    if order is not None:
        canon_of_cp, cp_of_canon = order
        q, k, v = (t.index_select(1, cp_of_canon) for t in (q, k, v))
    (out, lse), plan = proc._attend(q, k, v, layout, scale, head_offset=head_off, total_heads=total,
                                    return_lse=return_lse)
    if order is not None:
        out = out.index_select(1, canon_of_cp)
        if lse is not None:
            lse = lse.index_select(2, canon_of_cp)
    if record:
        _record(proc, state, layout, layer, plan, head_off, q.shape[2])
    return out, (lse.transpose(1, 2).contiguous() if lse is not None else None)


def _record(proc, state, layout, layer, plan, head_off, heads) -> None:
    if torch.compiler.is_compiling():
        return
    proc._record(state, layout, layer, plan, cp=True)
    if plan is not None and layer is not None and proc.heads is None:
        state.stats.head_work[layer] = _head_blocks(plan, head_off, heads)


def _head_blocks(plan, head_off: int, heads: int) -> Dict[int, float]:
    """Global head id -> key blocks computed by that head's plan (summed over query blocks);
    a plan shared by all heads counts once per head."""
    tot = (plan.kv_num_blocks.float() + plan.full_kv_num_blocks.float()).sum(dim=(0, 2))  # [Hp]
    if tot.numel() == 1:
        return {head_off + i: float(tot[0]) for i in range(heads)}
    return {head_off + i: float(x) for i, x in enumerate(tot.tolist())}


def _backward_op(ctx, grad_out, *args, **kwargs):
    if "out" in kwargs or "lse" in kwargs:
        raise NotImplementedError("vidattn: sparse Ring attention backward is not implemented (inference only); "
                                  "use Ulysses (ulysses_degree) for training under context parallelism")
    proc, layout, state, layer, scale, head_off, total, world, text_split = ctx.vidattn
    query, key, value = ctx.saved_tensors
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        out, _ = _ulysses_compute(proc, q, k, v, layout, scale, head_off, total, world, text_split, False, state,
                                  layer, record=False)
        return torch.autograd.grad(out, (q, k, v), grad_out)


def sparse_attention_cp(proc, query, key, value, layout, scale, return_lse, parallel_config, state, layer):
    """Run ``proc``'s pattern on one self-attention call under diffusers context parallelism.

    Args:
        proc: the running :class:`~vidattn.pipelines.processors.SparseAttnProcessor`.
        query, key, value: this rank's ``[B, S / world, H, D]`` (sequence shard, all heads).
        layout: the canonical layout of the full ``S``-token sequence.
    Returns:
        ``[B, S / world, H, D]`` (and the LSE ``[B, S / world, H]`` with ``return_lse``).
    """
    R, U = cp_degrees(parallel_config)
    if query.shape[2] % U:
        raise ValueError(f"Ulysses degree {U} must divide the {query.shape[2]} attention heads")
    fwd = _CpOp(proc, layout, state, layer)
    return _compat().templated_cp_attention(query, key, value, None, 0.0, False, scale, False, return_lse,
                                            forward_op=fwd, backward_op=_backward_op, parallel_config=parallel_config)


# =============================================================================== load balance
def head_balance(head_work: Dict[int, float], world: int) -> dict:
    """Ulysses head load balance.

    Args:
        head_work: global head id -> work (key blocks computed, or block density) for all heads.
        world: Ulysses degree (heads ``u * H/world ..`` go to rank ``u``).
    Returns:
        dict with ``rank_work`` (list per rank), ``imbalance`` (max / mean, 1.0 = balanced),
        ``balanced_order`` (a head order whose contiguous slices balance the ranks, greedy
        longest-first) and ``balanced_imbalance``.
    """
    H = len(head_work)
    if H == 0 or H % world:
        raise ValueError(f"need work for all heads, a multiple of world={world}; got {H} heads")
    heads = sorted(head_work)
    per = H // world
    rank_work = [sum(head_work[h] for h in heads[u * per:(u + 1) * per]) for u in range(world)]
    mean = sum(rank_work) / world
    bins: List[List[int]] = [[] for _ in range(world)]
    load = [0.0] * world
    for h in sorted(heads, key=lambda x: -head_work[x]):
        u = min((i for i in range(world) if len(bins[i]) < per), key=lambda i: load[i])
        bins[u].append(h)
        load[u] += head_work[h]
    return dict(rank_work=rank_work, imbalance=(max(rank_work) / mean) if mean else 1.0,
                balanced_order=[h for b in bins for h in sorted(b)],
                balanced_imbalance=(max(load) / mean) if mean else 1.0)


# =============================================================================== benchmark worker
def bench_worker(rank: int, world: int, port: int, spec: dict, out_path: str) -> None:
    """``torch.multiprocessing.spawn`` target of ``benchmarks/parallel.py`` (see there)."""
    from vidattn.pipelines.parallel_bench import run_worker

    run_worker(rank, world, port, spec, out_path)

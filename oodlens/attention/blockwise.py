"""The blockwise routine: for each block of queries, the key segments a layer's plan names, run by a
kernel and merged by log-sum-exp, plus the statistics observers want. Memory O(n · block), never n × n.

A band plan (every method but DCA) splits the keys of a block of queries ``[i_first, i_last]`` with window W:

    diagonal                keys [i_first, i_last]             causal kernel call
    local, all rows         keys (i_last - W, i_first)         no mask
    local, leading triangle keys (i_first - W, i_last - W]     small mask (local for some rows)
    far, all rows           far keys ≤ i_first - W             no mask, query and keys moved
    far, trailing triangle  far keys in (i_first - W, i_last - W]  small mask, moved

Far keys are the first ``n_global`` keys (every key for the distance limit, Self-Extend, ReRoPE, STRING),
moved to the plan's key position map; the queries of a far segment are moved to its query position map. A
chunk plan (DCA) cuts query blocks at chunk boundaries and splits keys into the own chunk (true positions),
the previous chunk and the older ones (moved). Observers' sampled logit rows and sink mass are computed from
the same segments, so they are exactly the logits the model used."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import flex
from .kernels import NEG_INF, Partial, Segment, expand_kv, explicit_logits, merge_partials, run_segment
from .plan import AttentionObserver, BlockStats, LayerPlan, PositionMap, fixed


@dataclass
class RowGroup:
    """Queries and keys of batch rows that share positions (all rows, or one padded row).

    ``q_pos``/``k_pos`` are real positions (0 = first real token); the model rotated each query and key at its
    real position plus ``rotation_offset`` (the row's padding, or its ``position_ids`` offset). ``moved_keys``
    holds the keys at the plan's key position map, made once per layer call, and ``keys_at_zero`` the keys at
    position 0 (for top-k middle keys); like every moved key they keep the row's rotation offset, which
    cancels in each logit. ``q_host``/``k_host`` are the positions on the host: every segment boundary is
    computed from them, so that on a GPU a block costs no synchronisation (one copy per layer call instead of
    several reads back per block).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    rotation_offset: int
    moved_keys: torch.Tensor | None = field(default=None)
    keys_at_zero: torch.Tensor | None = field(default=None)
    q_host: torch.Tensor = field(init=False)
    k_host: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.q_host, self.k_host = self.q_pos.cpu(), self.k_pos.cpu()


DEFAULT_BLOCK = 1024
CUDA_BLOCK = 2048  # on a GPU fewer, larger blocks: each costs kernel launches, not memory that matters
OBSERVED_BLOCK = 512
MATH_BLOCK = 128


def plain_block(device_type: str) -> int:
    """Query rows per block of an unobserved call on ``device_type`` ("cpu", "cuda", …)."""
    return CUDA_BLOCK if device_type == "cuda" else DEFAULT_BLOCK


def _moved(
    plan: LayerPlan, group: RowGroup, x: torch.Tensor, pos: torch.Tensor, to: PositionMap
) -> torch.Tensor:
    """``x`` (queries or keys at real positions ``pos``) re-rotated to the positions ``to`` gives them.

    The row's rotation offset (its padding, or a ``position_ids`` shift) stays on the new positions too: a
    logit depends only on the difference of the two, and a key left where the model put it (a far key under
    StreamingLLM) carries that offset."""
    if to.is_identity:
        return x
    rotated_at = pos + group.rotation_offset
    return plan.rotary.move(x, rotated_at, to(pos) + group.rotation_offset)


def _index(host_positions: torch.Tensor, value: int) -> int:
    """How many of the sorted host positions are below ``value``."""
    return int(torch.searchsorted(host_positions, torch.tensor(value)))


def _far_count(plan: LayerPlan, group: RowGroup) -> int:
    """How many of the call's keys can be far keys: those at positions below ``n_global`` (the first ones)."""
    return _index(group.k_host, min(plan.n_global, int(group.k_host[-1]) + 1))


def _rows_before(q_host: torch.Tensor, value: int) -> int:
    """How many of a block's (sorted) query positions are below ``value``."""
    return _index(q_host, value)


def _diagonal(group: RowGroup, start: int, stop: int, window: int | None) -> tuple[Segment, int]:
    """The keys at the block's own positions (a query always sees itself), and where they begin."""
    q = group.query[:, :, start:stop]
    q_pos, k_pos, q_host = group.q_pos[start:stop], group.k_pos, group.q_host[start:stop]
    d_lo, d_hi = _index(group.k_host, int(q_host[0])), _index(group.k_host, int(q_host[-1]) + 1)
    keys, values = group.key[:, :, d_lo:d_hi], group.value[:, :, d_lo:d_hi]
    if d_hi - d_lo == stop - start and (window is None or window >= stop - start):
        return Segment(slice(0, stop - start), q, keys, values, "causal", slice(d_lo, d_hi)), d_lo
    mask = k_pos[d_lo:d_hi][None] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[d_lo:d_hi][None] > q_pos[:, None] - window
    return Segment(slice(0, stop - start), q, keys, values, mask, slice(d_lo, d_hi)), d_lo


def _band_segments(plan: LayerPlan, group: RowGroup, start: int, stop: int) -> list[Segment]:
    """The segments of query rows ``[start, stop)`` under a band plan (see the module docstring); the
    diagonal first, so every row's log-sum-exp is finite from the start."""
    q = group.query[:, :, start:stop]
    q_pos, k_pos = group.q_pos[start:stop], group.k_pos
    q_host, k_host = group.q_host[start:stop], group.k_host
    first, last = int(q_host[0]), int(q_host[-1])
    window, every = plan.window, slice(0, stop - start)
    diagonal, d_lo = _diagonal(group, start, stop, window)
    segments = [diagonal]
    lo = 0 if window is None else _index(k_host, first - window + 1)  # keys ≥ lo are local for the first row
    mid = 0 if window is None else max(_index(k_host, last - window + 1), lo)  # ≥ mid: local for every row
    if d_lo > mid:
        keys = slice(mid, d_lo)
        segments.append(Segment(every, q, group.key[:, :, keys], group.value[:, :, keys], None, keys))
    if min(mid, d_lo) > lo:
        keys = slice(lo, min(mid, d_lo))
        mask = k_pos[keys][None] > q_pos[:, None] - window
        # a key is local while q < k + window: the rows that see any are a prefix (positions are sorted)
        rows = slice(0, _rows_before(q_host, int(k_host[keys.stop - 1]) + window))
        segments.append(
            Segment(rows, q[:, :, rows], group.key[:, :, keys], group.value[:, :, keys], mask[rows], keys)
        )
    if window is None or plan.n_global <= 0:
        return segments
    far_hi = min(_far_count(plan, group), mid)
    far_keys = group.key if group.moved_keys is None else group.moved_keys
    for keys in (slice(0, min(far_hi, lo)), slice(lo, far_hi)):  # far for every row, then the triangle
        if keys.stop <= keys.start:
            continue
        mask = k_pos[keys][None] <= q_pos[:, None] - window
        # a key is far once q ≥ k + window: the rows that see any are a suffix, all of them from the row
        # where the last key is far
        rows = slice(_rows_before(q_host, int(k_host[keys.start]) + window), stop - start)
        far_q = _moved(plan, group, q[:, :, rows], q_pos[rows], plan.far_query)
        full = int(q_host[rows.start]) >= int(k_host[keys.stop - 1]) + window
        segment = Segment(
            rows, far_q, far_keys[:, :, keys], group.value[:, :, keys], None if full else mask[rows], keys
        )
        segments.append(segment)
    return segments


def _chunk_segments(plan: LayerPlan, group: RowGroup, start: int, stop: int) -> list[Segment]:
    """The segments of query rows ``[start, stop)``, all in one chunk, under dual chunk attention: the own
    chunk at true positions, the previous chunk and the older chunks with their query positions; every key
    at ``j mod chunk``."""
    q = group.query[:, :, start:stop]
    q_pos = group.q_pos[start:stop]
    chunk, every = plan.chunk.chunk, slice(0, stop - start)
    begins = int(group.q_host[start]) // chunk * chunk
    diagonal, d_lo = _diagonal(group, start, stop, None)
    own, previous = _index(group.k_host, begins), _index(group.k_host, begins - chunk)
    segments = [diagonal]
    if d_lo > own:
        keys = slice(own, d_lo)
        segments.append(Segment(every, q, group.key[:, :, keys], group.value[:, :, keys], None, keys))
    for keys, query_map in zip(
        (slice(previous, own), slice(0, previous)), plan.chunk.query_maps(), strict=True
    ):
        if keys.stop > keys.start:
            moved_q = _moved(plan, group, q, q_pos, query_map)
            segments.append(
                Segment(every, moved_q, group.moved_keys[:, :, keys], group.value[:, :, keys], None, keys)
            )
    return segments


def _top_k_partial(
    plan: LayerPlan,
    group: RowGroup,
    start: int,
    stop: int,
    scale: float,
    softcap: float | None,
    want_mean: bool,
) -> tuple[slice, Partial] | None:
    """Each head's ``top_k`` highest-logit middle keys (not global, not local), seen at ``top_k_distance``."""
    q_pos, q_host = group.q_pos[start:stop], group.q_host[start:stop]
    k_pos, k_host = group.k_pos, group.k_host
    middle_lo = _far_count(plan, group)
    middle_hi = _index(k_host, int(q_host[-1]) - plan.window + 1)
    if middle_hi <= middle_lo:
        return None
    valid = k_pos[middle_lo:middle_hi][None] <= q_pos[:, None] - plan.window
    r0 = _rows_before(q_host, int(k_host[middle_lo]) + plan.window)  # the first row with a middle key
    q = _moved(plan, group, group.query[:, :, start + r0 : stop], q_pos[r0:], fixed(plan.top_k_distance))
    keys = group.keys_at_zero[:, :, middle_lo:middle_hi]
    logits = explicit_logits(q, keys, scale, softcap).masked_fill(~valid[r0:], NEG_INF)
    k = min(plan.top_k, middle_hi - middle_lo)
    best, index = logits.topk(k, dim=-1)  # [B, H, R, k]
    values = expand_kv(group.value[:, :, middle_lo:middle_hi], q.shape[1]).float()
    chosen = torch.gather(
        values.unsqueeze(2).expand(-1, -1, index.shape[2], -1, -1),
        3,
        index.unsqueeze(-1).expand(-1, -1, -1, -1, values.shape[-1]),
    )  # [B, H, R, k, D]
    lse = torch.logsumexp(best, dim=-1)
    probs = torch.exp(best - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = (probs.unsqueeze(-1) * chosen).sum(-2)
    mean = (probs * best.nan_to_num(neginf=0.0)).sum(-1) if want_mean else None
    return slice(r0, stop - start), Partial(out, lse, mean)


def _prepare(plan: LayerPlan, group: RowGroup) -> None:
    """Per layer call: scale the queries, and move the keys that far or chunk segments see elsewhere."""
    if plan.query_scale is not None:
        n_tokens = int(group.k_host[-1]) + 1
        factors = plan.query_scale.factors(group.q_pos, n_tokens).to(group.query.device, group.query.dtype)
        group.query = group.query * factors[:, None]
    if plan.chunk is not None:
        group.moved_keys = _moved(plan, group, group.key, group.k_pos, plan.chunk.key_map())
    elif plan.window is not None and plan.n_global > 0 and not plan.far_key.is_identity:
        n_far = _far_count(plan, group)
        group.moved_keys = _moved(plan, group, group.key[:, :, :n_far], group.k_pos[:n_far], plan.far_key)
    if plan.top_k > 0:
        group.keys_at_zero = _moved(plan, group, group.key, group.k_pos, fixed(0.0))


def _blocks(plan: LayerPlan, group: RowGroup, block_size: int) -> list[tuple[int, int]]:
    """Query row ranges of at most ``block_size``; under DCA none straddles a chunk boundary."""
    n_queries = group.query.shape[2]
    cuts = set(range(0, n_queries, block_size))
    if plan.chunk is not None:
        chunk_of = torch.div(group.q_host, plan.chunk.chunk, rounding_mode="floor")
        cuts |= set((torch.nonzero(chunk_of[1:] != chunk_of[:-1]).squeeze(-1) + 1).tolist())
    edges = sorted(cuts | {n_queries})
    return list(zip(edges[:-1], edges[1:], strict=True))


def attend_group(
    plan: LayerPlan,
    group: RowGroup,
    scale: float,
    softcap: float | None,
    observer: AttentionObserver | None,
    layer_idx: int,
    block_size: int | None,
) -> torch.Tensor:
    """Attention for one row group; returns ``[B, Q, Hq, D]`` in the query dtype."""
    batch, heads, n_queries, dim = group.query.shape
    want_mean = observer is not None
    _prepare(plan, group)
    if flex.serves(plan, group.query, softcap=softcap, observed=observer is not None, block_size=block_size):
        return _fused(plan, group, scale)
    if block_size is None:
        if softcap is not None:
            block_size = MATH_BLOCK  # the float32 reference kernel holds block × keys logits per head
        elif observer is not None:  # a GPU takes plain blocks' size: its launches cost more than the memory
            block_size = CUDA_BLOCK if group.query.device.type == "cuda" else OBSERVED_BLOCK
        else:  # one fused call covers plain causal attention; the other plans need blocks
            block_size = n_queries if plan.is_vanilla else plain_block(group.query.device.type)
    for bound in (plan.window, plan.chunk.chunk if plan.chunk is not None else None):
        if bound is not None:
            block_size = min(block_size, bound)
    output = torch.empty(batch, n_queries, heads, dim, dtype=group.query.dtype, device=group.query.device)
    build = _chunk_segments if plan.chunk is not None else _band_segments
    for start, stop in _blocks(plan, group, block_size):
        segments = build(plan, group, start, stop)
        parts = [(seg.rows, run_segment(seg, scale, softcap, want_mean)) for seg in segments]
        if plan.top_k > 0:
            extra = _top_k_partial(plan, group, start, stop, scale, softcap, want_mean)
            if extra is not None:
                parts.append(extra)
        acc = (
            merge_partials(parts, (batch, heads, stop - start, dim), group.query.device)
            if len(parts) > 1
            else parts[0][1]
        )
        output[:, start:stop] = acc.out.transpose(1, 2).to(output.dtype)
        if observer is not None:
            _observe(group, start, stop, segments, acc, scale, softcap, observer, layer_idx)
    return output


def _fused(plan: LayerPlan, group: RowGroup, scale: float) -> torch.Tensor:
    """A band plan's call on the fused path (:mod:`.flex`): the local band, and the far keys at their moved
    positions where any query is far enough from them."""
    far = None
    n_far = _far_count(plan, group)
    if n_far:
        far_keys = group.key if group.moved_keys is None else group.moved_keys

        def far_queries(rows: slice) -> torch.Tensor:
            return _moved(plan, group, group.query[:, :, rows], group.q_pos[rows], plan.far_query)

        # the first row that sees a far key: the first far key is far from query k_0 + window on
        first_row = _rows_before(group.q_host, int(group.k_host[0]) + plan.window)
        far = flex.FarKeys(first_row, far_queries, far_keys[:, :, :n_far])
    return flex.band_attention(
        group.query,
        group.key,
        group.value,
        group.q_pos,
        group.k_pos,
        group.q_host,
        group.k_host,
        scale,
        plan.window,
        far,
    )


def _segment_logits(
    seg: Segment, rows: torch.Tensor, keys: slice, scale: float, softcap: float | None
) -> torch.Tensor:
    """Float32 logits ``[B, H, len(rows), keys]`` of the segment's rows ``rows`` (block indices inside
    ``seg.rows``) against its keys ``keys`` (a part of ``seg.key_index``), ``-inf`` where its mask hides a
    key.
    """
    local = rows - seg.rows.start
    begin = keys.start - seg.key_index.start
    part = slice(begin, begin + keys.stop - keys.start)
    logits = explicit_logits(seg.queries[:, :, local], seg.keys[:, :, part], scale, softcap)
    if isinstance(seg.mask, torch.Tensor):
        logits = logits.masked_fill(~seg.mask[local][:, part], NEG_INF)
    elif seg.mask == "causal":
        column = torch.arange(part.start, part.stop, device=logits.device)
        logits = logits.masked_fill(column[None] > local[:, None], NEG_INF)
    return logits


@torch.no_grad()  # statistics for an observer, never part of a gradient
def _observe(
    group: RowGroup,
    start: int,
    stop: int,
    segments: list[Segment],
    acc: Partial,
    scale: float,
    softcap: float | None,
    observer: AttentionObserver,
    layer_idx: int,
) -> None:
    """Hand the observer the statistics of query rows ``[start, stop)``: entropy and log-sum-exp of every
    row, the full logit rows of the rows it samples and every row's mass on the first ``n_global`` keys, both
    rebuilt from the block's segments (top-k middle keys, where a plan has them, are left out of both)."""
    positions = group.q_pos[start:stop]
    device = acc.lse.device
    rows_host = observer.select_queries(group.q_host[start:stop])  # chosen on the host: no read-back
    rows = rows_host.to(device)
    batch, heads = acc.lse.shape[:2]
    sampled_logits = sampled_distances = None
    if rows_host.numel():
        shape = (batch, heads, rows_host.numel(), group.key.shape[2])
        sampled_logits = torch.full(shape, NEG_INF, device=device)
        for seg in segments:
            inside = (rows_host >= seg.rows.start) & (rows_host < seg.rows.stop)
            if inside.any():
                picked = inside.nonzero().squeeze(-1)
                logits = _segment_logits(seg, rows_host[picked].to(device), seg.key_index, scale, softcap)
                where = (slice(None), slice(None), picked.to(device), seg.key_index)
                # segments share key ranges (a triangle's keys are far keys for other rows): keep what is set
                sampled_logits[where] = torch.where(torch.isfinite(logits), logits, sampled_logits[where])
        sampled_distances = positions[rows][:, None] - group.k_pos[None]
    sink = None
    if observer.n_global > 0:
        n_sink = _index(group.k_host, observer.n_global)
        sink = torch.zeros_like(acc.lse)
        for seg in segments:
            keys = slice(seg.key_index.start, min(seg.key_index.stop, n_sink))
            if keys.stop > keys.start:
                seg_rows = torch.arange(seg.rows.start, seg.rows.stop, device=acc.lse.device)
                logits = _segment_logits(seg, seg_rows, keys, scale, softcap)
                sink[:, :, seg.rows] += torch.exp(logits - acc.lse[:, :, seg.rows, None]).sum(-1)
    lse = acc.lse.detach()
    entropy = lse - acc.mean_logit.detach()
    stats = BlockStats(
        positions,
        lse,
        entropy,
        sink,
        positions[rows],
        sampled_logits,
        sampled_distances,
        dtype=group.query.dtype,
    )
    observer.observe(layer_idx, stats)

"""The blockwise routine: for each block of queries, the key segments a layer's plan names, run by a
kernel and merged by log-sum-exp, plus the statistics observers want. Memory O(n · block), never n × n."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels import NEG_INF, Partial, Segment, expand_kv, explicit_logits, merge_partials, run_segment
from .plan import AttentionObserver, BlockStats, LayerPlan


@dataclass
class RowGroup:
    """Queries and keys of batch rows that share positions (all rows, or one padded row).

    ``q_pos``/``k_pos`` are real positions (0 = first real token); the model rotated each query and key at its
    real position plus ``rotation_offset`` (the row's padding, or its ``position_ids`` offset).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    rotation_offset: int
    far_keys: torch.Tensor | None = field(default=None)
    unrotated_keys: torch.Tensor | None = field(default=None)


DEFAULT_BLOCK = 1024
OBSERVED_BLOCK = 512
MATH_BLOCK = 128


def _far_queries(
    plan: LayerPlan, group: RowGroup, q: torch.Tensor, pos: torch.Tensor, distance: int
) -> torch.Tensor:
    """Queries re-rotated so that an unrotated key sits at ``distance`` from them."""
    rotation = pos + group.rotation_offset
    return plan.rotary.move(q, rotation, torch.full_like(rotation, distance))


def _unrotated(plan: LayerPlan, group: RowGroup, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return plan.rotary.rotate(keys, pos + group.rotation_offset, sign=-1.0)


def _block_segments(plan: LayerPlan, group: RowGroup, start: int, stop: int) -> list[Segment]:
    """The segments of query rows ``[start, stop)``; diagonal first so every row's lse is finite early."""
    q = group.query[:, :, start:stop]
    q_pos = group.q_pos[start:stop]
    k_pos = group.k_pos
    first, last = int(q_pos[0]), int(q_pos[-1])
    window = plan.window
    segments: list[Segment] = []

    # Diagonal: keys at the block's own positions (always present: a query sees itself).
    d_lo, d_hi = torch.searchsorted(k_pos, torch.tensor([first, last + 1], device=k_pos.device)).tolist()
    if d_hi - d_lo == stop - start and (window is None or window >= stop - start):
        segments.append(
            Segment(
                slice(0, stop - start), q, group.key[:, :, d_lo:d_hi], group.value[:, :, d_lo:d_hi], "causal"
            )
        )
    else:
        mask = k_pos[d_lo:d_hi][None] <= q_pos[:, None]
        if window is not None:
            mask &= k_pos[d_lo:d_hi][None] > q_pos[:, None] - window
        segments.append(
            Segment(slice(0, stop - start), q, group.key[:, :, d_lo:d_hi], group.value[:, :, d_lo:d_hi], mask)
        )

    # Keys before the block inside the local band.
    lowest_local = -1 if window is None else first - window  # keys must be > this for the first query
    all_see = -1 if window is None else last - window  # keys > this are local for every query in the block
    lo = int(torch.searchsorted(k_pos, torch.tensor(lowest_local + 1, device=k_pos.device)))
    mid = int(torch.searchsorted(k_pos, torch.tensor(all_see + 1, device=k_pos.device)))
    mid = max(mid, lo)
    if d_lo > mid:
        segments.append(
            Segment(slice(0, stop - start), q, group.key[:, :, mid:d_lo], group.value[:, :, mid:d_lo])
        )
    if min(mid, d_lo) > lo:
        hi = min(mid, d_lo)
        mask = k_pos[lo:hi][None] > q_pos[:, None] - window
        rows = mask.any(-1).nonzero()
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        segments.append(
            Segment(
                slice(r0, r1), q[:, :, r0:r1], group.key[:, :, lo:hi], group.value[:, :, lo:hi], mask[r0:r1]
            )
        )

    # Far keys: starting tokens that are outside the band for at least the block's last query. They are
    # seen at the distance limit (or at their true distance when the policy keeps it).
    if window is not None and plan.n_global > 0:
        far_hi = min(int(torch.searchsorted(k_pos, torch.tensor(plan.n_global, device=k_pos.device))), mid)
        if far_hi > 0:
            mask = k_pos[:far_hi][None] <= q_pos[:, None] - window
            rows = mask.any(-1).nonzero()
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            if plan.far_distance is None:
                far_q, far_k = q[:, :, r0:r1], group.key[:, :, :far_hi]
            else:
                far_q = _far_queries(plan, group, q[:, :, r0:r1], q_pos[r0:r1], plan.far_distance)
                far_k = group.far_keys[:, :, :far_hi]
            full = bool(mask[r0:r1].all())
            segments.append(
                Segment(
                    slice(r0, r1), far_q, far_k, group.value[:, :, :far_hi], None if full else mask[r0:r1]
                )
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
    q_pos = group.q_pos[start:stop]
    k_pos = group.k_pos
    middle_lo = int(torch.searchsorted(k_pos, torch.tensor(plan.n_global, device=k_pos.device)))
    middle_hi = int(
        torch.searchsorted(k_pos, torch.tensor(int(q_pos[-1]) - plan.window + 1, device=k_pos.device))
    )
    if middle_hi <= middle_lo:
        return None
    valid = k_pos[middle_lo:middle_hi][None] <= q_pos[:, None] - plan.window
    rows = valid.any(-1).nonzero()
    r0 = int(rows[0])
    rows_slice = slice(r0, stop - start)
    q = _far_queries(plan, group, group.query[:, :, start + r0 : stop], q_pos[r0:], plan.top_k_distance)
    keys = group.unrotated_keys[:, :, middle_lo:middle_hi]
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
    return rows_slice, Partial(out, lse, mean)


def _sampled_rows(
    plan: LayerPlan, group: RowGroup, start: int, rows: torch.Tensor, scale: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logit rows (local + far keys as the policy sees them) for a few queries: ``[B,H,R,K]``, ``[R,K]``."""
    index = start + rows
    q = group.query[:, :, index]
    q_pos = group.q_pos[index]
    k_pos = group.k_pos
    distance = q_pos[:, None] - k_pos[None]
    local = distance >= 0
    if plan.window is not None:
        local &= distance < plan.window
    logits = explicit_logits(q, group.key, scale, softcap).masked_fill(~local, NEG_INF)
    if plan.window is not None and plan.n_global > 0:
        far = (distance >= plan.window) & (k_pos[None] < plan.n_global)
        if far.any():
            far_hi = int(far.any(0).nonzero()[-1]) + 1
            if plan.far_distance is None:
                far_q, far_k = q, group.key[:, :, :far_hi]
            else:
                far_q = _far_queries(plan, group, q, q_pos, plan.far_distance)
                far_k = group.far_keys[:, :, :far_hi]
            far_logits = explicit_logits(far_q, far_k, scale, softcap)
            logits[..., :far_hi] = torch.where(far[:, :far_hi], far_logits, logits[..., :far_hi])
    return logits, distance


def _sink_mass(
    plan: LayerPlan,
    group: RowGroup,
    start: int,
    stop: int,
    lse: torch.Tensor,
    n_sink: int,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Probability mass ``[B, H, C]`` that each query puts on the first ``n_sink`` real tokens."""
    n_keys = int(torch.searchsorted(group.k_pos, torch.tensor(n_sink, device=group.k_pos.device)))
    if n_keys == 0:
        return torch.zeros_like(lse)
    sub = RowGroup(
        group.query,
        group.key[:, :, :n_keys],
        group.value[:, :, :n_keys],
        group.q_pos,
        group.k_pos[:n_keys],
        group.rotation_offset,
        None if group.far_keys is None else group.far_keys[:, :, :n_keys],
    )
    logits, _ = _sampled_rows(plan, sub, start, torch.arange(stop - start, device=lse.device), scale, softcap)
    return torch.exp(logits - lse.unsqueeze(-1)).sum(-1)


def attend_group(
    plan: LayerPlan,
    group: RowGroup,
    scale: float,
    softcap: float | None,
    observer: AttentionObserver | None,
    layer_idx: int,
    block_size: int | None,
) -> torch.Tensor:
    """Attention for one row group; returns ``[B, Hq, Q, D]`` in the query dtype."""
    batch, heads, n_queries, dim = group.query.shape
    want_mean = observer is not None
    if plan.window is not None and plan.far_distance is not None and plan.n_global > 0:
        group.far_keys = _unrotated(
            plan,
            group,
            group.key[:, :, : min(plan.n_global, group.key.shape[2])],
            group.k_pos[: min(plan.n_global, group.key.shape[2])],
        )
    if plan.top_k > 0:
        group.unrotated_keys = _unrotated(plan, group, group.key, group.k_pos)
    if block_size is None:
        if softcap is not None:
            block_size = MATH_BLOCK  # the float32 reference kernel holds block × keys logits per head
        elif observer is not None:
            block_size = OBSERVED_BLOCK
        else:  # one fused call covers plain causal attention; banded policies need blocks
            block_size = n_queries if plan.is_vanilla else DEFAULT_BLOCK
        if plan.window is not None:
            block_size = min(block_size, plan.window)
    output = torch.empty(batch, n_queries, heads, dim, dtype=group.query.dtype, device=group.query.device)
    for start in range(0, n_queries, block_size):
        stop = min(start + block_size, n_queries)
        parts = [
            (seg.rows, run_segment(seg, scale, softcap, want_mean))
            for seg in _block_segments(plan, group, start, stop)
        ]
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
            positions = group.q_pos[start:stop]
            rows = observer.select_queries(positions)
            sampled = (
                _sampled_rows(plan, group, start, rows, scale, softcap) if rows.numel() else (None, None)
            )
            sink = (
                _sink_mass(plan, group, start, stop, acc.lse, observer.n_global, scale, softcap)
                if observer.n_global > 0
                else None
            )
            observer.observe(
                layer_idx,
                BlockStats(positions, acc.lse, acc.lse - acc.mean_logit, sink, positions[rows], *sampled),
            )
    return output

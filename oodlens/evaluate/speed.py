"""Decoding speed and cache memory after a long context, measured without paying for the prefill.

The paper's speed claim is about decoding: after n tokens of context, vanilla attends to all n keys at every
step, LM-Infinite and StreamingLLM to a bounded set. What a decoding step costs depends on how many keys the
cache holds and how it stores them, not on their values, so :func:`decode_speed` fills each method's own
cache with random keys and values for ``context`` tokens (as a prefill of that length would leave it: a
bounded cache keeps its starting tokens and window, a dynamic one every key) and times greedy steps from
there. Minutes of prefill per point become seconds, so 8k–64k fit in one side-by-side run on a CPU.

Methods run as the evaluations run them; ``"vanilla"`` is the model's own attention (e.g. SDPA) with
transformers' dynamic cache, and ``"vanilla-static"`` the same with a preallocated ``StaticCache``, so that
a comparison is not only about the dynamic cache's copying.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, StaticCache

from ..errors import OodlensError, check_count
from ..models import model_info
from ..policies import Policy, apply_policy, policy_by_name
from .scoring import cache_kwargs, new_cache

NATIVE_DYNAMIC = "vanilla"
NATIVE_STATIC = "vanilla-static"


@dataclass
class DecodeSpeedResult:
    """One row per (method, context): the time of each timed decoding step and the cache it left.

    ``step_ms`` lists every timed step in order (the first step after filling is a warm-up and not listed);
    ``cache_mib`` is the keys and values the cache holds after the last step; ``stored_tokens`` how many
    keys per layer that is."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        """method, context, ms_per_token (median of the steps), ms_low / ms_high (their min and max),
        n (steps), cache_mib, stored_tokens."""
        records = []
        for row in self.rows:
            steps = row["step_ms"]
            records.append(
                {
                    "method": row["method"],
                    "context": row["context"],
                    "ms_per_token": statistics.median(steps),
                    "ms_low": min(steps),
                    "ms_high": max(steps),
                    "n": len(steps),
                    "cache_mib": row["cache_mib"],
                    "stored_tokens": row["stored_tokens"],
                }
            )
        return pd.DataFrame(records)

    def ratio(self, method: str, reference: str, context: int) -> float:
        """How many times faster ``method`` decodes than ``reference`` at ``context`` (median over steps)."""
        frame = self.to_dataframe().set_index(["method", "context"])["ms_per_token"]
        return float(frame[reference, context] / frame[method, context])

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: per method, per context, the median, range and n of the step times and the
        cache size."""
        out: dict[str, Any] = {}
        for record in self.to_dataframe().to_dict("records"):
            method, context = record.pop("method"), str(record.pop("context"))
            out.setdefault(method, {})[context] = record
        return out


def decode_speed(
    model: PreTrainedModel,
    methods: Sequence[str | Policy],
    contexts: Sequence[int],
    *,
    steps: int = 8,
    repeats: int = 1,
    train_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DecodeSpeedResult:
    """Time ``steps`` greedy decoding steps of every method after every context length, side by side.

    ``methods``: names of :data:`~oodlens.policies.POLICIES`, policies, ``"vanilla"`` (the model's own
    attention and dynamic cache) or ``"vanilla-static"`` (its own attention with a ``StaticCache``). The
    order is interleaved — every method at one context, then the next context, and with ``repeats > 1`` the
    whole sweep again — so that a drift of the machine touches every method alike; repeated steps pool.
    """
    check_count("steps", steps, minimum=1)
    check_count("repeats", repeats, minimum=1)
    for context in contexts:
        check_count("context", context, minimum=1)
    policies = [_as_method(method) for method in methods]
    generator = torch.Generator().manual_seed(seed)
    result: dict[tuple[str, int], dict[str, Any]] = {}
    sweep = [(method, context) for _ in range(repeats) for context in contexts for method in policies]
    with torch.no_grad():
        for method, context in tqdm(sweep, desc="decode speed", disable=not progress, leave=False):
            name = method if isinstance(method, str) else method.name
            step_ms, cache = _time_steps(model, method, context, steps, train_length, generator)
            row = result.setdefault(
                (name, context), {"method": name, "context": context, "step_ms": [], "cache_mib": 0.0}
            )
            row["step_ms"] += step_ms
            row["cache_mib"], row["stored_tokens"] = _cache_size(cache)
    return DecodeSpeedResult(list(result.values()))


def _as_method(method: str | Policy) -> str | Policy:
    if isinstance(method, Policy) or method in (NATIVE_DYNAMIC, NATIVE_STATIC):
        return method
    return policy_by_name(method)


def _time_steps(
    model: PreTrainedModel,
    method: str | Policy,
    context: int,
    steps: int,
    train_length: int | None,
    generator: torch.Generator,
) -> tuple[list[float], Any]:
    """Fill the method's cache for ``context`` tokens, take one untimed step, then time ``steps`` steps."""
    if isinstance(method, str):
        cache = _native_cache(model, method, context + steps + 1)
        _fill(model, cache, context, generator)
        return _steps(model, cache, context, steps), cache
    with apply_policy(model, method, train_length=train_length) as handle:
        cache = new_cache(model, handle)
        _fill(model, cache, context, generator)
        return _steps(model, cache, context, steps), cache


def _native_cache(model: PreTrainedModel, method: str, capacity: int) -> Any:
    if method == NATIVE_STATIC:
        return StaticCache(config=model.config, max_cache_len=capacity)
    return DynamicCache(config=model.config)


def _fill(model: PreTrainedModel, cache: Any, context: int, generator: torch.Generator) -> None:
    """Put ``context`` tokens of random keys and values into every layer, as a prefill would: one update per
    layer (a bounded cache trims to its starting tokens and window right away)."""
    info = model_info(model)
    parameter = next(model.parameters())
    shape = (1, info.n_kv_heads, context, info.head_dim)
    positions = {"cache_position": torch.arange(context, device=parameter.device)}  # read by older versions
    for layer in range(len(cache.layers)):
        keys, values = (
            torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype) for _ in range(2)
        )
        cache.update(keys, values, layer, positions)


def _steps(model: PreTrainedModel, cache: Any, context: int, steps: int) -> list[float]:
    """Milliseconds of each of ``steps`` one-token steps after an untimed warm-up step."""
    device = next(model.parameters()).device
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    times = []
    for step in range(steps + 1):
        position = torch.tensor([[context + step]], device=device)
        started = time.perf_counter()
        logits = model(
            input_ids=token,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(model, cache),
        ).logits
        token = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(1000 * (time.perf_counter() - started))
    return times


def _cache_size(cache: Any) -> tuple[float, int]:
    """MiB of keys and values the cache holds, and how many keys its largest layer stores."""
    total, stored = 0, 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        if isinstance(layer.keys, torch.Tensor):
            stored = max(stored, layer.keys.shape[-2])
    if not stored:
        raise OodlensError(
            "the cache holds no keys after decoding: this model's cache layout is not supported"
        )
    return total / 2**20, stored

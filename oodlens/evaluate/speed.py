"""Decoding speed and cache memory after a long context, measured without paying for the prefill.

The paper's speed claim is about decoding: after n tokens of context, vanilla attends to all n keys at every
step, LM-Infinite and StreamingLLM to a bounded set. What a decoding step costs depends on how many keys the
cache holds and how it stores them, not on their values, so :func:`decode_speed` fills each method's own
cache with random keys and values for ``context`` tokens (as a prefill of that length would leave it: a
bounded cache keeps its starting tokens and window, a dynamic one every key) and times greedy steps from
there. Minutes of prefill per point become seconds, so 8k–64k fit in one side-by-side run on a CPU.

Two modes, side by side: ``"eager"`` decodes as the evaluations do (``"vanilla"``, the model's own attention
such as SDPA, and every unbounded method with transformers' dynamic cache, bounded methods with oodlens'
bounded cache); ``"static"`` removes the per-step overheads: preallocated caches written in place
(transformers' ``StaticCache`` for vanilla, :class:`~oodlens.cache.StaticBoundedCache` for bounded methods),
and on a GPU one step captured as a CUDA graph and replayed, so no step launches kernels one by one from
Python. On a CPU the static mode runs the same step as is.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, StaticCache

from ..errors import OodlensError, check_count
from ..models import model_info, train_length_of
from ..policies import Policy, apply_policy, policy_by_name
from .scoring import cache_kwargs, new_cache

NATIVE = "vanilla"
MODES = ("eager", "static")
WARM_UP_STEPS = 2  # eager steps before a CUDA graph is captured (allocator, cuBLAS and compiled kernels warm)


@dataclass
class DecodeSpeedResult:
    """One row per (method, mode, context): the time of each timed decoding step and the cache it left.

    ``step_ms`` lists every timed step in order (the first step after filling is a warm-up and not listed);
    ``cache_mib`` is the keys and values the cache holds after the last step; ``stored_tokens`` how many
    keys its largest layer holds (a static cache: its slots)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dataframe(self) -> pd.DataFrame:
        """method, mode, context, ms_per_token (median of the steps), ms_low / ms_high (their min and max),
        n (steps), cache_mib, stored_tokens."""
        records = []
        for row in self.rows:
            steps = row["step_ms"]
            records.append(
                {
                    "method": row["method"],
                    "mode": row["mode"],
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

    def ratio(
        self,
        method: str,
        reference: str,
        context: int,
        mode: str = "eager",
        reference_mode: str | None = None,
    ) -> float:
        """How many times faster ``method`` in ``mode`` decodes than ``reference`` in ``reference_mode`` (the
        same mode by default) at ``context`` (medians over steps)."""
        frame = self.to_dataframe().set_index(["method", "mode", "context"])["ms_per_token"]
        return float(frame[reference, reference_mode or mode, context] / frame[method, mode, context])

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: per method, per mode, per context, the median, range and n of the step times
        and the cache size."""
        out: dict[str, Any] = {}
        for record in self.to_dataframe().to_dict("records"):
            method, mode, context = record.pop("method"), record.pop("mode"), str(record.pop("context"))
            out.setdefault(method, {}).setdefault(mode, {})[context] = record
        return out


def decode_speed(
    model: PreTrainedModel,
    methods: Sequence[str | Policy],
    contexts: Sequence[int],
    *,
    modes: Sequence[str] = ("eager",),
    steps: int = 8,
    repeats: int = 1,
    train_length: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DecodeSpeedResult:
    """Time ``steps`` greedy decoding steps of every method in every mode after every context length, side
    by side.

    ``methods``: names of :data:`~oodlens.policies.POLICIES`, policies, or ``"vanilla"`` (the model's own
    attention). ``modes``: ``"eager"`` and/or ``"static"`` (see the module docstring); a method that keeps
    every key (Self-Extend, ReRoPE, DCA, …) has no static cache and is timed eager only. The order is
    interleaved — every method and mode at one context, then the next context, and with ``repeats > 1`` the
    whole sweep again — so that a drift of the machine touches every method alike; repeated steps pool.
    """
    check_count("steps", steps, minimum=1)
    check_count("repeats", repeats, minimum=1)
    for context in contexts:
        check_count("context", context, minimum=1)
    for mode in modes:
        if mode not in MODES:
            raise OodlensError(f"unknown decoding mode {mode!r}: choose from {', '.join(MODES)}")
    policies = [_as_method(method) for method in methods]
    train = train_length_of(model, train_length)
    modes_of = {id(method): _modes_of(method, modes, train) for method in policies}
    # drawn where the model is: a GPU fills a 7B model's 128k-token cache in moments, its host in minutes
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    result: dict[tuple[str, str, int], dict[str, Any]] = {}
    sweep = [
        (method, mode, context)
        for _ in range(repeats)
        for context in contexts
        for method in policies
        for mode in modes_of[id(method)]
    ]
    with torch.no_grad():
        for method, mode, context in tqdm(sweep, desc="decode speed", disable=not progress, leave=False):
            name = method if isinstance(method, str) else method.name
            step_ms, size = _time_steps(model, method, mode, context, steps, train_length, generator)
            row = result.setdefault(
                (name, mode, context),
                {"method": name, "mode": mode, "context": context, "step_ms": [], "cache_mib": 0.0},
            )
            row["step_ms"] += step_ms
            row["cache_mib"], row["stored_tokens"] = size
            if generator.device.type == "cuda":  # the next case's cache gets the memory this one freed
                torch.cuda.empty_cache()
    return DecodeSpeedResult(list(result.values()))


def _as_method(method: str | Policy) -> str | Policy:
    if isinstance(method, Policy) or method == NATIVE:
        return method
    return policy_by_name(method)


def _modes_of(method: str | Policy, modes: Sequence[str], train_length: int) -> list[str]:
    """The asked modes this method has: a method that keeps every key has no static cache, so only eager."""
    plan = None if isinstance(method, str) else method.cache_plan(train_length)
    if plan is None or plan.bounded:
        return list(modes)
    if "eager" not in modes:
        raise OodlensError(f"{plan.reason}, so it has no static mode: add the mode 'eager' or leave it out")
    return ["eager"]


def _time_steps(
    model: PreTrainedModel,
    method: str | Policy,
    mode: str,
    context: int,
    steps: int,
    train_length: int | None,
    generator: torch.Generator,
) -> tuple[list[float], tuple[float, int]]:
    """Fill the method's cache for ``context`` tokens, take one untimed step, then time ``steps`` steps;
    returns the step times and the cache's size (the cache itself is freed before the next case fills its
    own: two 128k-token caches of a 7B model would not fit one GPU)."""
    static = mode == "static"
    if isinstance(method, str):
        capacity = context + steps + WARM_UP_STEPS + 1
        cache = StaticCache(config=model.config, max_cache_len=capacity) if static else DynamicCache(
            config=model.config
        )
        _fill(model, cache, context, generator)
        return _steps(model, cache, context, steps, static), _cache_size(cache)
    with apply_policy(model, method, train_length=train_length) as handle:
        cache = handle.new_cache(static=True) if static else new_cache(model, handle)
        _fill(model, cache, context, generator)
        return _steps(model, cache, context, steps, static), _cache_size(cache)


def _fill(model: PreTrainedModel, cache: Any, context: int, generator: torch.Generator) -> None:
    """Put ``context`` tokens of random keys and values into every layer, as a prefill would: one update per
    layer (a bounded cache trims to its starting tokens and window right away)."""
    info = model_info(model)
    parameter = next(model.parameters())
    shape = (1, info.n_kv_heads, context, info.head_dim)
    for layer in range(len(cache.layers)):
        keys, values = (
            torch.randn(shape, generator=generator, device=generator.device).to(parameter.dtype)
            for _ in range(2)
        )
        cache.update(keys, values, layer)


def _steps(model: PreTrainedModel, cache: Any, context: int, steps: int, static: bool) -> list[float]:
    """Milliseconds of each of ``steps`` one-token steps after an untimed warm-up step (static on a GPU: a
    step captured as a CUDA graph after a few eager ones, then replayed)."""
    device = next(model.parameters()).device
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    position = torch.tensor([[context]], device=device)
    inputs = {"input_ids": token, "position_ids": position, "use_cache": True, "logits_to_keep": 1}
    inputs |= cache_kwargs(model, cache)  # no attention_mask: reading one back would stall a captured step

    def step() -> torch.Tensor:
        return model(**inputs).logits[:, -1:].argmax(-1)

    def advance(next_token: torch.Tensor) -> None:  # in place: a captured step reads these same tensors
        token.copy_(next_token)
        position.add_(1)

    run = _captured(step, advance, device) if static and device.type == "cuda" else step
    times = []
    for index in range(steps + 1):
        started = time.perf_counter()
        advance(run())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append(1000 * (time.perf_counter() - started))
    return times


def _captured(
    step: Callable[[], torch.Tensor], advance: Callable[[torch.Tensor], None], device: torch.device
) -> Callable[[], torch.Tensor]:
    """``step`` as one CUDA graph: a few eager steps on a side stream (they decode for real), the capture
    (which records the next step without running it), then a replay per call."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_STEPS):
            advance(step())
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


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

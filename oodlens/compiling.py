"""Compiled kernels on a GPU, and the one switch that turns them (and the fused attention path) on or off.

On a GPU a long sequence's element-wise passes (re-rotating every query, merging two softmax results) cost
more than the attention kernel itself when each runs as separate PyTorch operations; compiled, each becomes
one pass over memory. Compiling needs Triton; without it, on a CPU, or under ``fused_attention("never")``
the functions run as written.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import torch
import torch._dynamo.config
import torch._dynamo.exc

from .errors import OodlensError

Function = TypeVar("Function", bound=Callable)
FusedMode = Literal["auto", "always", "never"]
RECOMPILE_LIMIT = 64  # head counts, head sizes, scales, masks: a few models' worth of variants per function
_mode: FusedMode = "auto"
_COMPILED: dict[tuple[Callable, bool | None], Callable] = {}
# PyTorch 2.7 renamed the compile cache's limit ("cache size" → "recompile"): take whichever this one has
_LIMIT_NAMES = (
    ("recompile_limit", "fail_on_recompile_limit_hit", "FailOnRecompileLimitHit")
    if hasattr(torch._dynamo.config, "recompile_limit")
    else ("cache_size_limit", "fail_on_cache_limit_hit", "FailOnCacheLimitHit")
)
_LIMIT_HIT = getattr(torch._dynamo.exc, _LIMIT_NAMES[2], RuntimeError)


@contextlib.contextmanager
def fused_attention(mode: FusedMode) -> Iterator[None]:
    """Within the block: ``"auto"`` (the fused attention path for long calls on a GPU, and compiled kernels
    there), ``"always"`` (the fused path wherever it can serve, a CPU included: for tests) or ``"never"``
    (the segment path and no compiling anywhere: for comparisons, or a GPU without a working compiler)."""
    global _mode
    if mode not in ("auto", "always", "never"):
        raise OodlensError(f"fused_attention takes 'auto', 'always' or 'never', got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def fused_mode() -> FusedMode:
    return _mode


def can_compile(device: torch.device) -> bool:
    """Whether work on ``device`` is compiled: a CUDA device with Triton, unless the mode is "never"."""
    return _mode != "never" and device.type == "cuda" and importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def compile_budget() -> Iterator[None]:
    """Room for each compiled function to specialise to several models in one process, and an error rather
    than PyTorch's silent fall-back to eager code past it (eager FlexAttention writes out every score, which
    at long length exhausts the GPU's memory)."""
    limit, fail, _ = _LIMIT_NAMES
    try:
        with torch._dynamo.config.patch(**{limit: RECOMPILE_LIMIT, fail: True}):
            yield
    except _LIMIT_HIT as error:
        raise OodlensError(
            f"oodlens' compiled kernels were specialised more than {RECOMPILE_LIMIT} times in this process "
            "(many shapes or models): run under oodlens.attention.fused_attention('never'), or a new process"
        ) from error


def compiled(function: Function, *, dynamic: bool | None) -> Callable[..., Any]:
    """``function`` compiled once per process (``dynamic`` as :func:`torch.compile` takes it), called within
    the :func:`compile_budget`."""
    key = (function, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(function, dynamic=dynamic)

    def call(*args, **kwargs):
        with compile_budget():
            return _COMPILED[key](*args, **kwargs)

    return call


def fused_on_gpu(function: Function) -> Function:
    """``function``, compiled (dynamic shapes) where :func:`can_compile` says so for the device of its first
    argument; as written otherwise."""

    def dispatch(*args, **kwargs):
        if not can_compile(args[0].device):
            return function(*args, **kwargs)
        return compiled(function, dynamic=True)(*args, **kwargs)

    return dispatch  # type: ignore[return-value]

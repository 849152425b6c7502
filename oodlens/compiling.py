"""Element-wise work compiled into fused kernels on a GPU.

On a GPU a long sequence's element-wise passes (re-rotating every query, merging two softmax results) cost
more than the attention kernel itself when each runs as separate PyTorch operations; compiled, each becomes
one pass over memory. Elsewhere the functions run as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch._dynamo.config

from .errors import OodlensError

Function = TypeVar("Function", bound=Callable)
RECOMPILE_LIMIT = 64  # head counts, head sizes, scales, masks: a few models' worth of variants per function
_COMPILED: dict[Callable, Callable] = {}


@contextlib.contextmanager
def compile_budget() -> Iterator[None]:
    """Room for each compiled function to specialise to several models in one process, and an error rather
    than PyTorch's silent fall-back to eager code past it (eager FlexAttention writes out every score, which
    at long length exhausts the GPU's memory)."""
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as error:
        raise OodlensError(
            f"oodlens' compiled attention was specialised more than {RECOMPILE_LIMIT} times in this process "
            "(many shapes or models): run it with oodlens.attention.fused_attention('never') or a new process"
        ) from error


def fused_on_gpu(function: Function) -> Function:
    """``function``, compiled (dynamic shapes, once per process) when its first argument is on a CUDA
    device; as written otherwise."""

    def dispatch(*args, **kwargs):
        if args[0].device.type != "cuda":
            return function(*args, **kwargs)
        if function not in _COMPILED:
            _COMPILED[function] = torch.compile(function, dynamic=True)
        with compile_budget():
            return _COMPILED[function](*args, **kwargs)

    return dispatch  # type: ignore[return-value]

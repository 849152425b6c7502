"""The compiled CPU kernel behind exact per-query entropy (``csrc/entropy_attention.cpp``).

PyTorch's CPU flash kernel gives the output and log-sum-exp of attention but not ``E_p[logit]``, which the
entropy needs; this kernel computes all three in one pass. It is compiled the first time an observer needs
the entropy on a CPU, with ``torch.utils.cpp_extension`` (about 40 s, then cached by torch under
``~/.cache/torch_extensions``), and needs x86-64 with AVX2 and FMA, a C++ compiler, ninja and PyTorch's MKL
BLAS. On other CPUs the engine keeps its portable path (the CPU flash kernel with the keys appended to the
values), which gives the same numbers more slowly; where a build is tried and fails it warns once first.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent.parent / "csrc" / "entropy_attention.cpp"
EXTENSION = "oodlens_entropy_attention"
log = logging.getLogger("oodlens")


@functools.cache
def compiled() -> ModuleType | None:
    """The compiled extension, or ``None`` where this CPU cannot run it or the build fails (warned once)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        return None  # the portable path is the designed fallback on such CPUs; nothing to warn about
    try:
        from torch.utils import cpp_extension

        built = Path(cpp_extension._get_build_directory(EXTENSION, False)) / f"{EXTENSION}.so"
        if not built.is_file():  # the first build on a machine is slow enough to need a word
            log.warning("oodlens: compiling the CPU entropy kernel (once per machine, about 40 s) …")
        with _ninja_on_path():
            return cpp_extension.load(
                name=EXTENSION,
                sources=[str(SOURCE)],
                # OpenMP: at::parallel_for is inline and runs serially in code built without it
                extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as error:  # a missing compiler or ninja, a link error: all mean "not here"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(
            f"oodlens: cannot build the CPU entropy kernel ({first_line}); capture uses the slower portable "
            "path (install a C++ compiler and ninja to get the kernel)",
            stacklevel=2,
        )
        return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; the ninja package installed with oodlens sits next to this Python,
    which is not on PATH when the environment's Python is run without activating it (as ``make`` does)."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is not None or shutil.which("ninja", path=here) is None:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = here + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


def entropy_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | str | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output ``[B, Hq, R, D]``, log-sum-exp ``[B, Hq, R]`` and ``E_p[logit]`` ``[B, Hq, R]`` in float32.

    ``query [B, Hq, R, D]``, ``key``/``value [B, Hkv, S, D]`` float32 on the CPU; ``mask`` is ``None``,
    ``"causal"`` (square) or a bool ``[R, S]`` (True = attend). Call only when :func:`compiled` is not None.
    """
    tensors = [_rows_readable(t) for t in (query, key, value)]
    boolean = mask if isinstance(mask, torch.Tensor) else None
    return tuple(compiled().entropy_attention(*tensors, boolean, mask == "causal", float(scale)))


def _rows_readable(tensor: torch.Tensor) -> torch.Tensor:
    """The kernel reads rows of ``D`` contiguous floats at any head and batch strides and any row stride of
    at least ``D`` (transformers' transposed projections are read in place; a single row may have any)."""
    rows, dim = tensor.shape[-2:]
    if tensor.stride(-1) == 1 and (rows == 1 or tensor.stride(-2) >= dim):
        return tensor
    return tensor.contiguous()

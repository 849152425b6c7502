"""What every analysis script shares: its command line, the model, the token windows, and a result cache.

Each script computes its results once, stores them under ``figures/cache/<script>/`` (JSON and Parquet, with
the settings that produced them), and redraws figures from that cache on later runs unless ``--recompute``
is given. ``--quick`` switches to a tiny random model and short lengths so the scripts can be tested in
seconds; quick runs write into a separate folder so they never overwrite the committed figures.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from oodlens import plotting
from oodlens.data import DEFAULT_CORPUS, load_corpus, token_windows
from oodlens.evaluate import PerplexityResult
from oodlens.models import LoadedModel, load_model
from oodlens.storage import atomic_path, write_json

REPO = Path(__file__).resolve().parent.parent
QUICK_MODEL = "tiny:llama"
QUICK_TRAIN_LENGTH = 64


@dataclass
class Settings:
    """Parsed command line of an analysis script."""

    name: str
    model: str
    train_length: int | None
    out: Path
    quick: bool
    recompute: bool
    windows: int
    seed: int
    device: str
    dtype: str
    extra: argparse.Namespace

    @property
    def cache(self) -> Path:
        return self.out / "cache" / self.name

    def scale(self, full: int, quick: int) -> int:
        """A length for a full run or a quick run."""
        return quick if self.quick else full


def parse(
    name: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
    windows: int = 1,
    reuse_memory: bool = True,
) -> Settings:
    """The shared options; ``add_arguments`` adds a script's own; ``windows`` is the script's default.

    ``reuse_memory`` calls :func:`reuse_freed_memory` (faster long forwards; off where memory is measured).
    """
    parser = argparse.ArgumentParser(
        prog=f"python analyses/{name}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="smollm2", help="model name or path (see oodlens.models.load_model)"
    )
    parser.add_argument(
        "--train-length", type=int, default=None, help="pretraining length (default: the model's)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="figure folder (default: figures/, quick: figures/quick/)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, short lengths (for tests)")
    parser.add_argument("--recompute", action="store_true", help="ignore cached results")
    parser.add_argument("--windows", type=int, default=windows, help="token windows to average over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if reuse_memory:
        reuse_freed_memory()
    model = QUICK_MODEL if args.quick and args.model == "smollm2" else args.model
    train_length = args.train_length or (QUICK_TRAIN_LENGTH if args.quick else None)
    out = args.out or (REPO / "figures" / ("quick" if args.quick else ""))
    return Settings(
        name,
        model,
        train_length,
        out,
        args.quick,
        args.recompute,
        args.windows,
        args.seed,
        args.device,
        args.dtype,
        args,
    )


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning every large block to the kernel.

    A long forward allocates and frees the same large activations in every layer; by default each one is a
    fresh mapping whose pages the kernel must fault in and zero again (measured: 16 million page faults and
    ~20 % of the wall time of a 32k-token SmolLM2 forward). Kept memory raises peak RSS a little, so the
    efficiency benchmark, which reports memory, does not call this. Returns False where glibc is absent.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError, TypeError):
        return False


_LOADED: dict[tuple, LoadedModel] = {}


def model(settings: Settings) -> LoadedModel:
    """The model (loaded once per process, as ``run_all`` runs every script in one process)."""
    key = (settings.model, settings.device, settings.dtype, settings.train_length)
    if key not in _LOADED:
        _LOADED[key] = load_model(
            settings.model, device=settings.device, dtype=settings.dtype, train_length=settings.train_length
        )
    return _LOADED[key]


def windows(settings: Settings, length: int):
    """``[settings.windows, length]`` token windows of the embedded python-docs corpus."""
    loaded = model(settings)
    return token_windows(
        load_corpus(DEFAULT_CORPUS),
        loaded.tokenizer,
        length,
        n_windows=settings.windows,
        seed=settings.seed,
        join_documents=True,
    )


def window_nll_frame(result: PerplexityResult) -> pd.DataFrame:
    """Each method's NLL per window and position, one column per method (windows one after another): how
    the scripts cache a :class:`PerplexityResult` so that intervals over windows can be drawn from it."""
    return pd.DataFrame({method: nll.reshape(-1) for method, nll in result.window_nll.items()})


def window_nll(frame: pd.DataFrame, method: str, n_windows: int) -> np.ndarray:
    """``[n_windows, length]`` NLL of ``method`` from a :func:`window_nll_frame`."""
    return frame[method].to_numpy().reshape(n_windows, -1)


def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as partial:
        frame.to_parquet(partial)


def cached(
    settings: Settings,
    key: str,
    params: dict[str, Any],
    compute: Callable[[], Any],
    *,
    suffix: str = ".parquet",
    write: Callable[[Any, Path], Any] = _write_frame,
    read: Callable[[Path], Any] = pd.read_parquet,
    serves: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
) -> Any:
    """``compute()`` once per (key, params); later runs ``read`` the stored result unless ``--recompute``.

    By default results are DataFrames stored as Parquet; pass ``write``/``read`` for other objects (e.g. a
    :class:`~oodlens.capture.Diagnosis` folder). A stored result is used when its params equal the asked
    ones, or when ``serves(stored_params, asked_params)`` says it answers them.
    """
    stored = settings.cache / f"{key}{suffix}"
    if is_stored(settings, key, params, suffix=suffix, serves=serves):
        return read(stored)
    result = compute()
    settings.cache.mkdir(parents=True, exist_ok=True)
    write(result, stored)
    write_json(settings.cache / f"{key}.json", _run_params(settings, params))
    return result


def is_stored(
    settings: Settings,
    key: str,
    params: dict[str, Any],
    *,
    suffix: str = ".parquet",
    serves: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
) -> bool:
    """Whether :func:`cached` would read a stored result for ``(key, params)`` instead of computing it."""
    stored, header = settings.cache / f"{key}{suffix}", settings.cache / f"{key}.json"
    if settings.recompute or not (stored.exists() and header.exists()):
        return False
    try:
        stored_params = json.loads(header.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # an unreadable header is no stored result: computed again and rewritten
    asked = _run_params(settings, params)
    return stored_params == asked or (serves is not None and serves(stored_params, asked))


def _run_params(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the run's settings that every result depends on, as JSON stores them."""
    run = {"model": settings.model, "train_length": settings.train_length, "windows": settings.windows}
    return json.loads(json.dumps({**run, "seed": settings.seed, **params}))


def save(settings: Settings, figure, stem: str) -> Path:
    """Save ``figure`` as ``<out>/<stem>.pdf|png`` and close it; returns the PNG path."""
    settings.out.mkdir(parents=True, exist_ok=True)
    _, png = plotting.save_figure(figure, settings.out / stem)
    plt.close(figure)
    print(f"wrote {png}")
    return png


def print_table(title: str, frame: pd.DataFrame) -> None:
    print(f"\n{title}\n{frame.to_string(index=False)}")

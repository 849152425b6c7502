"""`load_model`: the embedded default (`"smollm2"`), a local `.gguf` file, a local Hugging Face folder, a
`tiny:<family>` name (random tiny models for tests) or a hub id → model, tokenizer and :class:`ModelInfo`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..errors import OodlensError, check_train_length
from .anatomy import extend_rotary_tables
from .gguf import load_gguf, smollm2_gguf_path
from .hub import HUB_ID_PATTERN, load_folder, load_from_hub
from .info import LoadedModel, model_info
from .tiny import tiny_model

DEFAULT_MODEL = "smollm2"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    train_length: int | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    name: "smollm2" (the embedded SmolLM2-135M-Instruct GGUF), a path to a `.gguf` file, a local Hugging
    Face folder, "tiny:<family>" (see `oodlens.tiny.TINY_FAMILIES`) or a hub id.
    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    dtype: "auto" (float32 on CPU, bfloat16 on CUDA where supported, else float16), "float32",
    "bfloat16", "float16" (or "fp32", "bf16", "fp16").
    train_length: overrides the pretraining length read from the model.
    """
    if train_length is not None:
        check_train_length(train_length)  # before a load that can take half a minute
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer = _load_model_and_tokenizer(name, torch_device, torch_dtype)
    model.eval()
    extend_rotary_tables(model)
    return LoadedModel(model, tokenizer, model_info(model, name=name, train_length=train_length))


def resolve_device(device: str) -> torch.device:
    """Turn "auto" / "cpu" / "cuda" / "cuda:N" into a torch.device, checking that CUDA exists."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise OodlensError(f"device {device!r} asked for, but CUDA is not available: use --device cpu")
        return torch.device(device)
    raise OodlensError(f"unknown device {device!r}: use one of {', '.join(DEVICES)} (or cuda:N)")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Turn "auto" or a dtype name into a torch.dtype; "auto" picks what runs well on `device`."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise OodlensError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_model_and_tokenizer(
    name: str, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, Any]:
    if name.startswith("tiny:"):
        tiny = tiny_model(name.removeprefix("tiny:"))
        return tiny.model.to(device=device, dtype=dtype), tiny.tokenizer
    if name == DEFAULT_MODEL:
        return load_gguf(smollm2_gguf_path(), device, dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OodlensError(f"GGUF file {name!r} does not exist: check the path")
        return load_gguf(path, device, dtype)
    if path.is_dir():
        return load_folder(path, device, dtype)
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID_PATTERN.fullmatch(name):
        raise OodlensError(
            f"unknown model {name!r}: pass 'smollm2', 'tiny:<family>', a .gguf file, a folder or a hub id"
        )
    return load_from_hub(name, device, dtype)

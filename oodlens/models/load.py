"""`load_model`: the embedded default (`"smollm2"`), a local `.gguf` file, a local Hugging Face folder, a
`tiny:<family>` name (random tiny models for tests) or a hub id → model, tokenizer and :class:`ModelInfo`."""

from __future__ import annotations

import difflib
import hashlib
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
from .tiny import TINY_FAMILIES, tiny_model

DEFAULT_MODEL = "smollm2"
FINGERPRINT_BYTES = 1 << 20  # read from each end of every file: a revision in milliseconds, even for 100 GB
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
    dtype: str | torch.dtype = "auto",
    train_length: int | None = None,
    **from_pretrained: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    Args:
        name: "smollm2" (the embedded SmolLM2-135M-Instruct GGUF), a path to a `.gguf` file, a local Hugging
            Face folder, "tiny:<family>" (see `oodlens.tiny.TINY_FAMILIES`) or a hub id (loaded from the local
            Hugging Face cache when it is there, so it works offline).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (float32 on CPU, bfloat16 on CUDA where supported, else float16), "float32",
            "bfloat16", "float16" (or "fp32", "bf16", "fp16"), or a torch.dtype.
        train_length: overrides the pretraining length read from the model.
        **from_pretrained: passed to transformers' ``from_pretrained`` for folders, hub ids and GGUF files:
            ``device_map`` (e.g. ``"auto"`` for a model larger than one device; then leave ``device`` as
            "auto"), ``revision``, ``trust_remote_code``, ``attn_implementation``, ``quantization_config``, …
    """
    if train_length is not None:
        check_train_length(train_length)  # before a load that can take half a minute
    if "device_map" in from_pretrained and device != "auto":
        raise OodlensError(f"pass either device={device!r} or device_map, not both")
    if name.startswith("tiny:") and from_pretrained:
        raise OodlensError(
            f"tiny models are built in memory and take no from_pretrained options: {sorted(from_pretrained)}"
        )
    torch_device = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device)
    model, tokenizer = _load_model_and_tokenizer(name, torch_device, torch_dtype, from_pretrained)
    model.eval()
    extend_rotary_tables(model)
    return LoadedModel(model, tokenizer, model_info(model, name=name, train_length=train_length))


def model_revision(name: str, model: PreTrainedModel) -> str:
    """Which weights ``name`` loaded, for a report's provenance: a hub model's commit (``hub:<sha>``), a local
    file's or folder's fingerprint (``fingerprint:<sha256>`` over each file's name, size and first and last
    MiB: it changes when any file is replaced, without reading gigabytes), or ``random:seed0`` for a tiny
    model."""
    if name.startswith("tiny:"):
        return "random:seed0"
    commit = getattr(model.config, "_commit_hash", None)
    path = smollm2_gguf_path() if name == DEFAULT_MODEL else Path(name).expanduser()
    if not path.exists():
        return f"hub:{commit}" if commit else "hub:unknown"
    root, files = (path.parent, [path]) if path.is_file() else (path, sorted(path.rglob("*")))
    digest = hashlib.sha256()
    for file in files:
        relative = file.relative_to(root)
        if not file.is_file() or (path.is_dir() and any(part.startswith(".") for part in relative.parts)):
            continue  # caches and editor files are not the model
        size = file.stat().st_size
        digest.update(f"{relative}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(handle.read())
    return f"fingerprint:{digest.hexdigest()[:16]}"


def parse_model_args(text: str) -> dict[str, Any]:
    """``"key=value,key=value"`` (lm-evaluation-harness' ``--model_args``) as from_pretrained options:
    numbers, true/false and none become Python values, everything else stays a string."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise OodlensError(f"--model-args takes key=value pairs separated by commas, got {item!r}")
        options[key.strip()] = _literal(value.strip())
    return options


def _literal(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


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
    name: str, device: torch.device, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    if name.startswith("tiny:"):
        tiny = tiny_model(name.removeprefix("tiny:"))
        return tiny.model.to(device=device, dtype=dtype), tiny.tokenizer
    if name == DEFAULT_MODEL:
        return load_gguf(smollm2_gguf_path(), device, dtype, options)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OodlensError(f"GGUF file {name!r} does not exist: check the path")
        return load_gguf(path, device, dtype, options)
    if path.is_dir():
        return load_folder(path, device, dtype, options)
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID_PATTERN.fullmatch(name):
        raise OodlensError(
            f"unknown model {name!r}: pass 'smollm2', 'tiny:<family>', a .gguf file, a folder or a hub id"
            + _did_you_mean(name)
        )
    try:
        return load_from_hub(name, device, dtype, options)
    except OodlensError as error:
        raise OodlensError(f"{error}{_did_you_mean(name)}") from error


def _did_you_mean(name: str) -> str:
    """`` (did you mean 'smollm2'?)`` for a near miss of a built-in name, else nothing."""
    known = [DEFAULT_MODEL, *(f"tiny:{family}" for family in TINY_FAMILIES)]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""

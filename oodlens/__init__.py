"""oodlens: see why language models break beyond their training length, and fix it on the fly.

The public API, flat::

    import oodlens
    loaded = oodlens.load_model("smollm2")
    ids = oodlens.data.token_windows(oodlens.data.load_corpus(), loaded.tokenizer, 16384)
    before = oodlens.diagnose(loaded.model, ids)                       # the three factors, vanilla
    after = oodlens.diagnose(loaded.model, ids, oodlens.lm_infinite())  # the same under the fix
    oodlens.plotting.plot_entropy_by_position({"before": before, "after": after})

Subpackages (``oodlens.evaluate``, ``oodlens.plotting``, ``oodlens.probe``, ``oodlens.data``, …) load on first
use, so ``import oodlens`` stays quick.
"""

import importlib
from typing import Any

from .capture import CaptureConfig, Diagnosis, capture, diagnose
from .errors import OodlensError
from .models import LoadedModel, ModelInfo, load_model
from .policies import (
    POLICIES,
    Policy,
    PolicyHandle,
    apply_lm_infinite,
    apply_policy,
    distance_limit,
    dual_chunk,
    lambda_mask,
    leaky_rerope,
    lm_infinite,
    policy_by_name,
    rerope,
    rope_scaling,
    self_extend,
    streaming_llm,
    string,
    vanilla,
    window,
)
from .theory import check_theory

__version__ = "0.1.0"

_LAZY_SUBPACKAGES = ("compare", "data", "evaluate", "plotting", "probe", "stats", "storage", "tasks")
_LAZY_FUNCTIONS = {"collect": ".probe.collect"}  # many report folders → one tidy table


def __getattr__(name: str) -> Any:
    """The subpackages not needed by the core (``oodlens.evaluate``, ``oodlens.plotting``, ``oodlens.probe``,
    ``oodlens.data``, …), imported on first access."""
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name], __name__), name)
    raise AttributeError(f"module 'oodlens' has no attribute {name!r}")


__all__ = [
    "POLICIES",
    "CaptureConfig",
    "Diagnosis",
    "LoadedModel",
    "ModelInfo",
    "OodlensError",
    "Policy",
    "PolicyHandle",
    "apply_lm_infinite",
    "apply_policy",
    "capture",
    "check_theory",
    "collect",
    "compare",
    "diagnose",
    "distance_limit",
    "dual_chunk",
    "evaluate",
    "lambda_mask",
    "leaky_rerope",
    "lm_infinite",
    "load_model",
    "plotting",
    "policy_by_name",
    "probe",
    "rerope",
    "rope_scaling",
    "self_extend",
    "streaming_llm",
    "string",
    "vanilla",
    "window",
]

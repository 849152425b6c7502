"""Every policy by name: the probe's ``--methods``, the analyses and the notebooks pick policies here."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from ..errors import OodlensError
from .base import Policy
from .lm_infinite import distance_limit, lambda_mask, lm_infinite, vanilla, window
from .peers import dual_chunk, leaky_rerope, rerope, self_extend, streaming_llm, string
from .rope_scaling import rope_scaling

POLICIES: dict[str, Callable[..., Policy]] = {
    "vanilla": vanilla,
    "window": window,
    "lambda": lambda_mask,
    "distance-limit": distance_limit,
    "lm-infinite": lm_infinite,
    "streaming-llm": streaming_llm,
    "self-extend": self_extend,
    "rerope": rerope,
    "leaky-rerope": leaky_rerope,
    "string": string,
    "dual-chunk": dual_chunk,
    "pi": partial(rope_scaling, "linear"),
    "ntk": partial(rope_scaling, "dynamic"),
    "yarn": partial(rope_scaling, "yarn"),
    "llama3-rope": partial(rope_scaling, "llama3"),
}
# LM-Infinite and its parts taken apart, as in the paper's Fig. 5
ABLATIONS = ("vanilla", "window", "lambda", "distance-limit", "lm-infinite")


def check_method(name: str) -> str:
    """``name`` if it is a known method, else an error listing them (checked before any model loads)."""
    if name not in POLICIES:
        raise OodlensError(f"unknown method {name!r}; choose from {', '.join(POLICIES)}")
    return name


def policy_by_name(name: str, **settings: Any) -> Policy:
    """The policy called ``name`` (one of :data:`POLICIES`) with those of ``settings`` its factory takes
    (e.g. ``n_global`` reaches ``lambda`` and ``lm-infinite`` but not ``window``); defaults otherwise."""
    factory = POLICIES[check_method(name)]
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in settings.items() if key in accepted})

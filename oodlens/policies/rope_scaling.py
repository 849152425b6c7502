"""RoPE rescaling through transformers' own code: position interpolation (``linear``), dynamic NTK
(``dynamic``), YaRN (``yarn``), Llama 3's (``llama3``) and LongRoPE (``longrope``). The policy rebuilds the
model's rotary embedding from new ``rope_parameters`` (merged over the model's own, so ``rope_theta`` and a
partial rotary factor stay) and puts the original back on ``remove()``; attention itself stays full, through
the engine so that it can be observed. Equal to loading the model with those ``rope_parameters``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import OodlensError
from ..models.anatomy import rotary_module
from .base import RESOLVERS, Policy, settings_of

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
DEFAULT_TARGET_FACTOR = 2  # without a target length, scale for twice the pretraining length


def rope_scaling(
    rope_type: str = "linear",
    factor: float | None = None,
    *,
    target_length: int | None = None,
    **parameters: Any,
) -> Policy:
    """RoPE rescaled by transformers' ``rope_type`` with ``factor`` (default ``target_length / L``, as PI,
    YaRN and NTK set it: the length to reach over the pretraining length; 2 without a target length).
    ``parameters`` go into ``rope_parameters`` too (YaRN's ``beta_fast``/``beta_slow``, llama3's
    ``low_freq_factor``/ ``high_freq_factor``, LongRoPE's ``short_factor``/``long_factor``);
    ``original_max_position_embeddings`` defaults to L. PI without fine-tuning is expected to lose quality
    (its paper fine-tunes): that is a result, not a bug."""
    if rope_type not in ROPE_TYPES:
        raise OodlensError(f"unknown rope_type {rope_type!r}: choose from {', '.join(ROPE_TYPES)}")
    name = {"linear": "pi", "dynamic": "ntk", "llama3": "llama3-rope"}.get(rope_type, rope_type)
    settings = settings_of(rope_type=rope_type, factor=factor, target_length=target_length, **parameters)
    return Policy(name, "rope-scaling", settings)


def _rope_scaling(settings: dict[str, Any], train_length: int) -> dict[str, Any]:
    rope_type, factor, target = (
        settings.pop("rope_type"),
        settings.pop("factor"),
        settings.pop("target_length"),
    )
    if factor is None:  # the authors' f = N / L, for the probe's default N = 2 L where no target is given
        factor = (target if target is not None else DEFAULT_TARGET_FACTOR * train_length) / train_length
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise OodlensError(
            f"a RoPE scaling factor must be a number > 1 (it stretches the positions), got {factor!r}"
        )
    if rope_type == "longrope" and not {"short_factor", "long_factor"} <= set(settings):
        raise OodlensError(
            "longrope needs its searched short_factor and long_factor lists (one per rotary frequency)"
        )
    values = {
        "rope_type": rope_type,
        "factor": float(factor),
        "original_max_position_embeddings": train_length,
    }
    if rope_type == "llama3":
        values |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return {"rope_parameters": tuple((values | settings).items())}


RESOLVERS["rope-scaling"] = _rope_scaling


def rebuild_rotary(model: nn.Module, rope_parameters: dict[str, Any]) -> Callable[[], None]:
    """Replace the model's rotary embedding by one built from its config with ``rope_parameters`` merged in;
    returns the function that puts the original back.

    Raises:
        OodlensError: the model has no rotary embedding transformers builds from ``rope_parameters``."""
    old = rotary_module(model)
    described = "rotary embedding transformers builds from rope_parameters"
    if old is None or not hasattr(old, "inv_freq"):
        raise OodlensError(
            f"{type(model).__name__} has no {described}: RoPE scaling needs one (Llama, Qwen, …)"
        )
    own = dict(getattr(model.config, "rope_parameters", None) or {})
    if any(isinstance(value, dict) for value in own.values()):
        raise OodlensError(
            f"{type(model).__name__} has one rotary embedding per layer type: RoPE scaling is not supported"
        )
    config = copy.deepcopy(model.config)
    config.rope_parameters = own | rope_parameters
    if "original_max_position_embeddings" in vars(
        config
    ):  # Phi-3 keeps it beside rope_parameters, and it wins
        config.original_max_position_embeddings = rope_parameters["original_max_position_embeddings"]
    try:
        new = type(old)(config=config).to(old.inv_freq.device)  # transformers 5.2x takes no device argument
    except (TypeError, ValueError, KeyError) as error:
        raise OodlensError(f"cannot rebuild {type(old).__name__} with {rope_parameters}: {error}") from error
    parent, attribute = next(
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if child is old
    )
    setattr(parent, attribute, new)

    def restore() -> None:
        setattr(parent, attribute, old)

    return restore

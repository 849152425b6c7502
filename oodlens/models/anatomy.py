"""Where a model's parts are: attention modules, decoder layers, rotary embedding, position encoding and
pretraining length.

A leaf: every other module asks these questions here, so each has one answer. Everything is found from the
model's structure and config (module names ending in ``Attention``/``RotaryEmbedding``, the ``ModuleList``
that holds the attention modules, the family's own ``rotate_half``), never from a list of family names, so new
architectures work without new code.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import OodlensError

ALIBI_FAMILIES = frozenset({"bloom", "mpt"})
LEARNED_POSITION_MODULE_NAMES = ("wpe", "embed_positions", "position_embeddings")
# GPT-J and CodeGen hard-code the rotary base in their modeling code instead of the config.
DEFAULT_ROPE_THETA = 10000.0
# Configs loaded from a file that states no context length (their max_position_embeddings is transformers'
# class default, which says nothing about how long the model was trained), by id; configs are unhashable.
_LENGTH_NOT_DECLARED: dict[int, weakref.ref] = {}


def mark_length_not_declared(config: Any) -> None:
    """Remember that ``config``'s file stated no context length (until the config is gone)."""
    key = id(config)
    _LENGTH_NOT_DECLARED[key] = weakref.ref(config, lambda _, key=key: _LENGTH_NOT_DECLARED.pop(key, None))


def _length_declared(config: Any) -> bool:
    ref = _LENGTH_NOT_DECLARED.get(id(config))
    return ref is None or ref() is not config


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in layer order (modules with a ``layer_idx`` and a config)."""
    found = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention") and hasattr(m, "config")
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def decoder_layers(model: nn.Module, attention: list[nn.Module] | None = None) -> list[nn.Module]:
    """The decoder layers in order: the elements of the ``ModuleList`` that holds the attention modules.

    ``attention``: the model's attention modules when the caller already has them.
    """
    attention_by_layer = attention_modules(model) if attention is None else attention
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < len(attention_by_layer):
            continue
        owner = {id(inner): layer for layer in module for inner in layer.modules()}
        if all(id(attn) in owner for attn in attention_by_layer):
            return [owner[id(attn)] for attn in attention_by_layer]
    raise OodlensError(
        f"found no list of decoder layers holding the attention modules of {type(model).__name__}"
    )


@dataclass(frozen=True)
class ModelParts:
    """The parts of one model that oodlens hooks, found once (a capture asks for them several times)."""

    attention: tuple[nn.Module, ...]
    decoder_layers: tuple[nn.Module, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ModelParts:
        attention = attention_modules(model)
        if not attention:
            raise OodlensError(f"found no attention layers in {type(model).__name__}")
        return cls(tuple(attention), tuple(decoder_layers(model, attention)))


def rotary_module(model: nn.Module, attention: nn.Module | None = None) -> nn.Module | None:
    """The rotary-embedding module that serves ``attention`` (its own, else the model's), or None."""
    own = getattr(attention, "rotary_emb", None)
    if isinstance(own, nn.Module):
        return own
    candidates = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    return candidates[0] if candidates else None


def interleaved_pairs(attention: nn.Module) -> bool:
    """Whether the family of ``attention`` rotates neighbouring channels (GPT-J, CodeGen, Cohere, GLM).

    Asked of the family's own helper rather than a list of names: its ``rotate_every_two`` or ``rotate_half``
    is applied to ``[1, 2, 3, 4]``; the half-split layout gives ``[-3, -4, 1, 2]``, the interleaved one
    ``[-2, 1, -4, 3]``.
    """
    modeling = sys.modules.get(type(attention).__module__)
    rotate = getattr(modeling, "rotate_every_two", None) or getattr(modeling, "rotate_half", None)
    if rotate is None:
        return False
    probe = torch.arange(1.0, 5.0).reshape(1, 1, 1, 4)
    return rotate(probe).flatten().tolist() == [-2.0, 1.0, -4.0, 3.0]


def layer_type(attention: nn.Module) -> str | None:
    """The layer type of ``attention`` (``"sliding_attention"``/``"full_attention"``) where the config has
    per-layer types (Gemma 2/3), else None."""
    found = getattr(attention, "layer_type", None)
    if found is not None:
        return found
    layer_types = getattr(getattr(attention, "config", None), "layer_types", None)
    layer_idx = getattr(attention, "layer_idx", None)
    if layer_types is not None and layer_idx is not None:
        return layer_types[layer_idx]
    return None


def position_encoding(model: nn.Module) -> str:
    """``"rope"``, ``"alibi"``, ``"learned"`` or ``"none"``."""
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


def position_limit(model: nn.Module) -> int | None:
    """How many positions the model can take at all: the size of its learned position table (GPT-2, OPT), or
    None where positions are computed (RoPE, ALiBi) and only the pretraining length bounds what it has seen.
    """
    if position_encoding(model) != "learned":
        return None
    return int(model.config.max_position_embeddings)


def check_positions(model: nn.Module, length: int, label: str = "length") -> None:
    """Refuse a ``length`` beyond the model's learned position table, which no method can extend."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise OodlensError(
            f"{label} {length} exceeds the {limit} positions of {model.config.model_type}'s learned position "
            f"table: use at most {limit} (learned absolute positions cannot be extended without training)"
        )


def rope_description(config: Any, head_dim: int) -> tuple[float, str, float]:
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


def sliding_window(config: Any) -> int | None:
    """The model's own sliding-window size, or None (Qwen2/3 keep a size they do not use)."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def pretraining_length(config: Any) -> tuple[int, str]:
    """The length the model was trained at, and where that number came from."""
    parameters = getattr(config, "rope_parameters", None) or {}
    original = parameters.get("original_max_position_embeddings")
    if original:
        return int(original), "config.rope_parameters.original_max_position_embeddings"
    length = getattr(config, "max_position_embeddings", None)
    if not length or not _length_declared(config):
        shown = f" (transformers would assume its default, {length})" if length else ""
        raise OodlensError(
            f"the {config.model_type} config file states no max_position_embeddings{shown}, "
            "so the pretraining length is unknown: pass train_length (--train-length) "
            "with the length the model was trained at"
        )
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = vars(quantization)
    from_gguf = quantization.get("quant_method") == "gguf" or getattr(config, "gguf_file", None)
    return int(length), "gguf" if from_gguf else "config.max_position_embeddings"


# GPT-J and CodeGen precompute their rotary table; this many positions costs 32 MB for a real GPT-J.
ROTARY_TABLE_POSITIONS = 1 << 17


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

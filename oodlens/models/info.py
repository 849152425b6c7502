"""What oodlens needs to know about a loaded model: :class:`ModelInfo`, and the pretraining length."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..errors import check_train_length
from . import anatomy


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


def train_length_of(model: nn.Module, train_length: int | None = None) -> int:
    """The pretraining length to use for ``model``: ``train_length`` when given (checked), else the model's
    own. Every function that takes an optional ``train_length`` resolves it here."""
    if train_length is not None:
        return check_train_length(train_length)
    return anatomy.pretraining_length(model.config)[0]


def model_info(model: PreTrainedModel, name: str | None = None, train_length: int | None = None) -> ModelInfo:
    """Describe an already-loaded transformers causal LM.

    `train_length` overrides the pretraining length read from the config; `name` defaults to the
    config's name_or_path.
    """
    config = model.config
    if train_length is None:
        train_length, train_length_source = anatomy.pretraining_length(config)
    else:
        train_length, train_length_source = check_train_length(train_length), "user"
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if getattr(config, "multi_query", False):  # GPT-BigCode: one key/value head
        n_kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    position_encoding = anatomy.position_encoding(model)
    if position_encoding == "rope":
        rope_theta, rope_type, rotary_fraction = anatomy.rope_description(config, head_dim)
        attention = anatomy.attention_modules(model)
        interleaved = bool(attention) and anatomy.interleaved_pairs(attention[0])
    else:
        rope_theta, rope_type, rotary_fraction, interleaved = None, None, 0.0, False
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
        rope_interleaved=interleaved,
        sliding_window=anatomy.sliding_window(config),
        train_length=train_length,
        train_length_source=train_length_source,
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
    )

"""Models: loading (:func:`load_model`), their description (:class:`ModelInfo`), where their parts are
(:mod:`~oodlens.models.anatomy`) and tiny random models of real families (:mod:`~oodlens.models.tiny`)."""

from .anatomy import ModelParts, attention_modules, decoder_layers, extend_rotary_tables
from .gguf import GGUF_CACHE_COMPLETE, SMOLLM2_INSTALL, gguf_cache_folder, smollm2_gguf_path
from .info import LoadedModel, ModelInfo, model_info, train_length_of
from .load import (
    DEFAULT_MODEL,
    DEVICES,
    DTYPES,
    load_model,
    model_revision,
    parse_model_args,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "GGUF_CACHE_COMPLETE",
    "SMOLLM2_INSTALL",
    "DEFAULT_MODEL",
    "DEVICES",
    "DTYPES",
    "LoadedModel",
    "ModelInfo",
    "ModelParts",
    "attention_modules",
    "decoder_layers",
    "extend_rotary_tables",
    "gguf_cache_folder",
    "load_model",
    "model_revision",
    "model_info",
    "parse_model_args",
    "resolve_device",
    "resolve_dtype",
    "smollm2_gguf_path",
    "train_length_of",
]

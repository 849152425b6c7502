"""The fused path (FlexAttention with a block mask of the band, far keys merged by log-sum-exp) against the
same independent dense references as the segment path, on tiny models of every RoPE family. On a CPU it runs
only when forced (``fused_attention("always")``); OODLENS_TEST_DEVICE=cuda runs this file on a GPU,
compiled."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import oodlens
from oodlens.attention import flex, fused_attention
from oodlens.capture import diagnose
from oodlens.errors import OodlensError
from oodlens.policies import (
    apply_policy,
    distance_limit,
    lambda_mask,
    leaky_rerope,
    lm_infinite,
    rerope,
    self_extend,
    streaming_llm,
    string,
    vanilla,
    window,
)
from oodlens.tiny import TINY_FAMILIES, tiny_model

from . import peer_reference as ref
from .peer_reference import PeerReference
from .reference import DenseReference

DEVICE = torch.device(os.environ.get("OODLENS_TEST_DEVICE", "cpu"))
# on a GPU the fused path serves half precision only; its agreement with the segment path there is measured
# by benchmarks/gpu.py (the attention case), so these float32 comparisons run on a CPU
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="float32 fused path: CPU only")
TRAIN, LENGTH, TOL = 64, 96, 1e-5
ROPE_FAMILIES = [family for family in TINY_FAMILIES if family not in ("gpt2", "gemma2")]  # gemma2 soft-caps

# policy ↔ an independent dense reference (DenseReference's keywords, or a peer rule)
CASES = {
    "lm-infinite": (
        lm_infinite(n_global=3, n_local=20, distance_limit=16),
        dict(window=20, n_global=3, distance_limit=16),
    ),
    "lambda": (lambda_mask(n_global=3, n_local=20), dict(window=20, n_global=3)),
    "window": (window(20), dict(window=20)),
    "distance-limit": (distance_limit(20), dict(window=20, n_global=10**9, distance_limit=20)),
    "streaming-llm": (streaming_llm(n_sink=4, window=17), ref.streaming_llm(4, 17)),
    "self-extend-fractional": (self_extend(group_size=3, window=16), ref.self_extend(3, 16)),
    "rerope": (rerope(window=16), ref.rerope(16, log_scale_base=TRAIN)),
    "leaky-rerope": (leaky_rerope(window=16, leak=4.0), ref.leaky_rerope(16, 4.0, log_scale_base=TRAIN)),
    "string": (string(shifted_offset=21, small_local_value=8), ref.string(21, 8)),
}


def _ids(length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 290, (1, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture(scope="module", params=ROPE_FAMILIES)
def family_model(request):
    overrides = {"max_position_embeddings": 256} if request.param == "gptj" else {}
    model = tiny_model(request.param, **overrides).model.to(DEVICE)
    try:  # GPT-J only joined transformers' attention interface after 5.17
        apply_policy(model, vanilla(), train_length=TRAIN).remove()
    except OodlensError as error:
        pytest.skip(f"{request.param} with transformers {transformers.__version__}: {error}")
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that took the fused path, so a test cannot pass on the segment path alone."""
    calls = []
    original = flex.band_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(flex, "band_attention", counting)
    return calls


def _reference(model, case):
    expected = CASES[case][1]
    return DenseReference(model, **expected) if isinstance(expected, dict) else PeerReference(model, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_equals_the_dense_reference(family_model, case, fused_calls):
    policy = CASES[case][0]
    ids = _ids()
    with torch.no_grad():
        with _reference(family_model, case):
            expected = family_model(ids).logits
        with apply_policy(family_model, policy, train_length=TRAIN), fused_attention("always"):
            got = family_model(ids).logits
        plain = family_model(ids).logits
    assert fused_calls, "the fused path never ran"
    assert (got - expected).abs().max().item() < TOL
    if getattr(family_model.config, "sliding_window", None) is None:
        assert (got - plain).abs().max().item() > 1e-3  # the policy changes the logits at this length


def test_fused_chunked_prefill_through_a_bounded_cache_equals_one_forward(fused_calls):
    """Keys with a gap (the starting tokens, then the tail) after the first chunk."""
    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids(200)
    policy = lm_infinite(n_global=3, n_local=20, distance_limit=16)
    with torch.no_grad(), apply_policy(model, policy, train_length=TRAIN) as handle:
        full = model(ids).logits
        cache = handle.new_cache()
        with fused_attention("always"):
            pieces = [
                model(ids[:, start : start + 50], past_key_values=cache, use_cache=True).logits
                for start in range(0, 200, 50)
            ]
    assert len(fused_calls) >= 4 * model.config.num_hidden_layers
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < TOL


def test_fused_left_padded_batch_matches_unpadded_rows(fused_calls):
    model = tiny_model("qwen2").model.to(DEVICE)
    short, long = _ids(70, seed=1), _ids(90, seed=2)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long, device=DEVICE), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad(), apply_policy(model, streaming_llm(n_sink=4, window=17), train_length=TRAIN):
        expected_short, expected_long = model(short).logits, model(long).logits
        with fused_attention("always"):
            padded = model(batch, attention_mask=mask).logits
    assert fused_calls
    assert (padded[0, pad:] - expected_short[0]).abs().max() < TOL
    assert (padded[1] - expected_long[0]).abs().max() < TOL


def test_a_capture_keeps_the_segment_path_and_its_statistics(fused_calls):
    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids()
    policy = lm_infinite(n_global=3, n_local=20, distance_limit=16)
    with fused_attention("always"):
        fused = diagnose(model, ids, policy, train_length=TRAIN)
    with fused_attention("never"):
        segments = diagnose(model, ids, policy, train_length=TRAIN)
    assert not fused_calls
    assert fused.entropy_by_position().equals(segments.entropy_by_position())


def test_the_fused_path_serves_long_calls_on_a_gpu_only_unless_forced():
    cpu, cuda, half, full = torch.device("cpu"), torch.device("cuda"), torch.bfloat16, torch.float32
    with torch.no_grad():
        assert not flex.serves(cpu, full, 10**6, 64)
        assert flex.serves(cuda, half, flex.MIN_FUSED_QUERIES, 64) and not flex.serves(cuda, half, 16, 64)
        assert not flex.serves(cuda, half, 10**6, 80)  # FlexAttention wants a power-of-two head size
        assert not flex.serves(cuda, full, 10**6, 64)  # float32 on a GPU: the exact segment path
        with fused_attention("always"):
            assert flex.serves(cpu, full, 16, 64) and not flex.serves(cuda, full, 16, 64)
        with fused_attention("never"):
            assert not flex.serves(cuda, half, 10**6, 64)
    with pytest.raises(OodlensError, match="'auto', 'always' or 'never'"):
        with fused_attention("sometimes"):
            pass


def test_one_pair_of_block_masks_serves_every_layer_and_forward(monkeypatch):
    flex._masks.clear()
    built = []
    original = flex._flex.create_block_mask
    monkeypatch.setattr(flex._flex, "create_block_mask", lambda *a, **k: built.append(1) or original(*a, **k))
    model = tiny_model("llama").model.to(DEVICE)
    with torch.no_grad(), oodlens.apply_lm_infinite(model, n_global=3, n_local=20, train_length=TRAIN):
        with fused_attention("always"):
            model(_ids())
            model(_ids(seed=1))  # same shape: the cached mask again
    assert len(built) == 2 and model.config.num_hidden_layers > 1  # one band mask and one far mask


def test_past_the_recompile_budget_is_a_clear_error_not_a_silent_eager_fallback(monkeypatch):
    from oodlens import compiling

    monkeypatch.setattr(compiling, "RECOMPILE_LIMIT", 1)
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with compiling.compile_budget():
        double(torch.ones(2))
    with pytest.raises(OodlensError, match="fused_attention\\('never'\\)"):
        with compiling.compile_budget():
            double(torch.ones(3))  # a second shape: one specialisation too many

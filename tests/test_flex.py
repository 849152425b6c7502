"""The fused path (FlexAttention with a block mask of the band, far keys merged by log-sum-exp) against the
same independent dense references as the segment path, on tiny models of every RoPE family, in float32 on a
CPU (forced with ``fused_attention("always")``, eager FlexAttention). OODLENS_TEST_DEVICE=cuda runs the
bfloat16 comparison with the segment path on a GPU, compiled, where the fused path serves half precision."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import transformers

import oodlens
from oodlens import compiling
from oodlens.attention import LayerPlan, flex, fused_attention
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
# on a GPU the fused path serves half precision only: the float32 comparisons run on a CPU
on_cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="the fused path in float32: CPU only")
on_cuda_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled: OODLENS_TEST_DEVICE=cuda")
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


@on_cpu_only
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


@on_cpu_only
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


@on_cpu_only
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


@on_cpu_only
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


def test_the_fused_path_serves_long_half_precision_band_calls_on_a_gpu_only_unless_forced(monkeypatch):
    monkeypatch.setattr(flex, "can_compile", lambda device: device.type == "cuda")  # as with Triton there
    band = LayerPlan(window=16, n_global=4)

    def serves(device: str, n: int, dtype=torch.bfloat16, head: int = 64, plan=band, **options) -> bool:
        # what serves() reads of a query, without allocating one on a device this machine may not have
        device = torch.device(device)
        query = SimpleNamespace(shape=(1, 2, n, head), dtype=dtype, device=device, requires_grad=False)
        return flex.serves(plan, query, **{"softcap": None, "observed": False, "block_size": None} | options)

    assert serves("cuda", flex.MIN_FUSED_QUERIES) and not serves("cuda", 16)
    assert not serves("cpu", 10**6, torch.float32)
    assert not serves("cuda", 10**6, head=80)  # FlexAttention wants a power-of-two head size
    assert not serves("cuda", 10**6, torch.float32)  # float32 on a GPU: the exact segment path
    assert not serves("cuda", 10**6, plan=LayerPlan())  # no band: one fused SDPA call already
    assert not serves("cuda", 10**6, plan=LayerPlan(window=16, top_k=2))
    assert not serves("cuda", 10**6, softcap=30.0) and not serves("cuda", 10**6, observed=True)
    assert not serves("cuda", 10**6, block_size=64)
    with fused_attention("always"):
        assert serves("cpu", 16, torch.float32) and not serves("cuda", 16, torch.float32)
    with fused_attention("never"):
        assert not serves("cuda", 10**6)
    with pytest.raises(OodlensError, match="'auto', 'always' or 'never'"):
        with fused_attention("sometimes"):
            pass


@on_cpu_only
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
    monkeypatch.setattr(compiling, "RECOMPILE_LIMIT", 1)
    double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with compiling.compile_budget():
        double(torch.ones(2))
    with pytest.raises(OodlensError, match="fused_attention\\('never'\\)"):
        with compiling.compile_budget():
            double(torch.ones(3))  # a second shape: one specialisation too many


@on_cuda_only
@pytest.mark.parametrize("case", ["lm-infinite", "streaming-llm", "distance-limit", "self-extend-fractional"])
def test_compiled_fused_path_in_bfloat16_agrees_with_the_segment_path(case, fused_calls):
    """Far keys (a few, or every key), odd lengths, a bounded cache's gap and left padding, on the GPU."""
    model = tiny_model("qwen2", head_dim=64).model.to(DEVICE, torch.bfloat16)
    policy, ids, short = CASES[case][0], _ids(301), _ids(170, seed=1)
    batch = torch.cat([torch.cat([torch.zeros(1, 131, dtype=torch.long, device=DEVICE), short], 1), ids])
    mask = torch.ones_like(batch)
    mask[0, :131] = 0
    outputs = {}
    with torch.no_grad(), apply_policy(model, policy, train_length=TRAIN) as handle:
        for mode in ("never", "always"):
            with fused_attention(mode):
                logits = [model(ids).logits, model(batch, attention_mask=mask).logits]
                if handle.policy.cache_plan(TRAIN).bounded:
                    cache = handle.new_cache()
                    chunks = [model(ids[:, s : s + 101], past_key_values=cache).logits for s in (0, 101, 202)]
                    logits.append(torch.cat(chunks, dim=1))
            outputs[mode] = [x.float() for x in logits]
    assert fused_calls
    for fused, segments in zip(outputs["always"], outputs["never"], strict=True):
        assert (fused - segments).abs().max() < 0.03 * segments.abs().max()

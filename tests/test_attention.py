"""The attention engine against independent dense references, on tiny models of every RoPE family."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from transformers import DynamicCache

import oodlens
from oodlens.policies import apply_policy, distance_limit, lambda_mask, lm_infinite, vanilla, window
from oodlens.tiny import TINY_FAMILIES, tiny_model

from .reference import DenseReference

ROPE_FAMILIES = [f for f in TINY_FAMILIES if f != "gpt2"]
LENGTH = 96  # beyond the tiny models' training length of 64
TOL = 1e-5
# OODLENS_TEST_DEVICE=cuda runs this file on a GPU (the CUDA kernels and their self-check)
DEVICE = torch.device(os.environ.get("OODLENS_TEST_DEVICE", "cpu"))

POLICY_CASES = {
    "lm-infinite": (
        lm_infinite(n_global=3, n_local=20, distance_limit=16),
        dict(window=20, n_global=3, distance_limit=16),
    ),
    "lm-infinite-top-k": (
        lm_infinite(n_global=3, n_local=20, distance_limit=16, top_k=2, top_k_from_layer=1),
        dict(window=20, n_global=3, distance_limit=16, top_k=2, top_k_from_layer=1),
    ),
    "lambda": (lambda_mask(n_global=3, n_local=20), dict(window=20, n_global=3)),
    "window": (window(20), dict(window=20)),
    "distance-limit": (distance_limit(20), dict(window=20, n_global=10**9, distance_limit=20)),
    "vanilla": (vanilla(), dict()),
}


def _ids(model, length=LENGTH, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(DEVICE)


@pytest.fixture(scope="module", params=ROPE_FAMILIES)
def family_model(request):
    # GPT-J looks RoPE up in a table of max_position_embeddings rows: it cannot run past it in transformers,
    # so its table is made longer than the test length (the policies still use train_length=64).
    overrides = {"max_position_embeddings": 256} if request.param == "gptj" else {}
    model = tiny_model(request.param, **overrides).model.to(DEVICE)
    try:  # GPT-J only joined transformers' attention interface after 5.17
        apply_policy(model, vanilla(), train_length=64).remove()
    except oodlens.OodlensError as error:
        pytest.skip(f"{request.param} with transformers {transformers.__version__}: {error}")
    return model


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_matches_dense_reference(family_model, case):
    policy, reference = POLICY_CASES[case]
    ids = _ids(family_model)
    with torch.no_grad():
        with DenseReference(family_model, **reference):
            expected = family_model(ids).logits
        with apply_policy(family_model, policy, train_length=64, block_size=16):
            got = family_model(ids).logits
        plain = family_model(ids).logits
    assert (got - expected).abs().max().item() < TOL
    if case != "vanilla" and getattr(family_model.config, "sliding_window", None) is None:
        # the policy must actually change something at this length, or this test could not fail
        assert (got - plain).abs().max().item() > 1e-3


def test_block_size_does_not_change_results(family_model):
    ids = _ids(family_model)
    policy = lm_infinite(n_global=3, n_local=20, distance_limit=16)
    with torch.no_grad():
        outs = []
        for block in (5, 16, 64):
            with apply_policy(family_model, policy, train_length=64, block_size=block):
                outs.append(family_model(ids).logits)
    assert (outs[0] - outs[1]).abs().max() < TOL and (outs[1] - outs[2]).abs().max() < TOL


def test_identical_to_vanilla_within_window(family_model):
    ids = _ids(family_model, length=60)
    with torch.no_grad():
        plain = family_model(ids).logits
        with oodlens.apply_lm_infinite(family_model, n_global=4, train_length=64):
            got = family_model(ids).logits
    assert (got - plain).abs().max().item() < TOL


def test_remove_restores_bit_identical_outputs(family_model):
    ids = _ids(family_model)
    before_impl = family_model.config._attn_implementation
    with torch.no_grad():
        before = family_model(ids).logits
        handle = oodlens.apply_lm_infinite(family_model, train_length=32)
        changed = family_model(ids).logits
        handle.remove()
        handle.remove()  # idempotent
        after = family_model(ids).logits
    assert family_model.config._attn_implementation == before_impl
    assert torch.equal(before, after)
    assert not torch.equal(before, changed)


def test_context_manager_restores_on_error(family_model):
    before_impl = family_model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with oodlens.apply_lm_infinite(family_model, train_length=32):
            raise RuntimeError("boom")
    assert family_model.config._attn_implementation == before_impl


@pytest.mark.parametrize("chunk", [1, 5])
def test_bounded_cache_decoding_equals_full_forward(family_model, chunk):
    ids = _ids(family_model, length=80)
    with (
        torch.no_grad(),
        apply_policy(
            family_model, lm_infinite(n_global=3, n_local=20, distance_limit=16), train_length=64
        ) as handle,
    ):
        full = family_model(ids).logits
        cache = handle.new_cache()
        pieces = [
            family_model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True).logits
            for start in range(0, ids.shape[1], chunk)
        ]
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < TOL
    for stored, layer in zip(cache.stored_tokens(), cache.layers, strict=True):
        # head + window - 1 keys for LM-Infinite layers; the model's own sliding layers keep their window
        limit = layer.sliding_window - 1 if layer.is_sliding else 3 + 20 - 1
        assert stored == limit


def test_dynamic_cache_decoding_equals_full_forward(family_model):
    ids = _ids(family_model, length=80)
    with (
        torch.no_grad(),
        apply_policy(
            family_model,
            lm_infinite(n_global=3, n_local=20, distance_limit=16, top_k=2, top_k_from_layer=0),
            train_length=64,
        ),
    ):
        full = family_model(ids).logits
        cache = DynamicCache(config=family_model.config)
        first = family_model(ids[:, :50], past_key_values=cache, use_cache=True).logits
        rest = [
            family_model(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits
            for i in range(50, 80)
        ]
    assert (torch.cat([first, *rest], dim=1) - full).abs().max().item() < TOL


def test_left_padded_batch_matches_unpadded_rows():
    model = tiny_model("llama").model.to(DEVICE)
    short, long = _ids(model, 70, seed=1), _ids(model, 80, seed=2)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long, device=DEVICE), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with (
        torch.no_grad(),
        oodlens.apply_lm_infinite(
            model, n_global=3, n_local=20, distance_limit=16, train_length=64
        ) as handle,
    ):
        expected_short, expected_long = model(short).logits, model(long).logits
        padded = model(batch, attention_mask=mask).logits
        generated = model.generate(
            batch,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            past_key_values=handle.new_cache(attention_mask=mask),
        )
        alone = model.generate(short, max_new_tokens=4, do_sample=False)
    assert (padded[0, pad:] - expected_short[0]).abs().max() < TOL
    assert (padded[1] - expected_long[0]).abs().max() < TOL
    assert torch.equal(generated[0, -4:], alone[0, -4:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids(model)
    with torch.no_grad(), oodlens.apply_lm_infinite(model, n_global=3, n_local=20, train_length=24):
        reference = model(ids).logits
        model.to(dtype)
        try:
            got = model(ids).logits.float()
        finally:
            model.float()
    assert torch.isfinite(got).all()
    assert (got - reference).abs().max().item() < 0.05 * reference.abs().max().item()


def test_learned_positions_get_a_clear_error():
    model = tiny_model("gpt2").model
    with pytest.raises(oodlens.OodlensError, match="rotary"):
        oodlens.apply_lm_infinite(model, train_length=32)
    assert model.config._attn_implementation != "oodlens"


def test_bad_lengths_are_rejected():
    model = tiny_model("llama").model.to(DEVICE)
    with pytest.raises(oodlens.OodlensError, match="n_local/window must be an integer ≥ 1"):
        oodlens.apply_lm_infinite(model, n_local=0)
    with pytest.raises(oodlens.OodlensError, match="unknown method"):
        oodlens.policy_by_name("streaming")


def test_broken_fused_kernel_falls_back_to_reference(monkeypatch):
    from oodlens.attention import kernels

    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids(model)
    with torch.no_grad(), oodlens.apply_lm_infinite(model, n_global=3, n_local=20, train_length=24):
        expected = model(ids).logits

        def broken(*args, **kwargs):
            raise RuntimeError("operator signature changed")

        monkeypatch.setattr(kernels, "_segment_fused", broken)
        monkeypatch.setattr(kernels, "_FUSED_VERIFIED", {})
        with pytest.warns(UserWarning, match="reference kernel"):
            got = model(ids).logits
    assert (got - expected).abs().max().item() < TOL


def test_native_or_policy_keeps_vanilla_native_and_routes_the_rest():
    model = tiny_model("llama").model.to(DEVICE)
    native = model.config._attn_implementation
    with oodlens.policies.native_or_policy(model, "vanilla", train_length=32) as handle:
        assert handle is None and model.config._attn_implementation == native
    with oodlens.policies.native_or_policy(model, "lm-infinite", train_length=32) as handle:
        assert handle.policy.name == "lm-infinite" and model.config._attn_implementation == "oodlens"
    assert model.config._attn_implementation == native

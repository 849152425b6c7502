"""Decoding speed after a synthetic context (oodlens.evaluate.speed): the cache each method is left with, and
that a filled bounded cache decodes as the full history would."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from oodlens.errors import OodlensError
from oodlens.evaluate.scoring import cache_kwargs
from oodlens.evaluate.speed import WARM_UP_STEPS, _fill, decode_speed
from oodlens.models import load_model
from oodlens.policies import apply_policy, lm_infinite, streaming_llm

STEPS = 2


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llama")  # L = 64 (see oodlens.models.tiny)


def _expected_mib(info, tokens: int) -> float:
    return info.n_layers * 2 * info.n_kv_heads * tokens * info.head_dim * 4 / 2**20  # float32 keys + values


def test_caches_are_what_each_method_keeps(tiny):
    contexts = [100, 300]
    result = decode_speed(
        tiny.model,
        ["vanilla", "lm-infinite", "streaming-llm", "self-extend"],
        contexts,
        modes=("eager", "static"),
        steps=STEPS,
        progress=False,
    )
    frame = result.to_dataframe().set_index(["method", "mode", "context"])
    info, train = tiny.info, tiny.info.train_length
    assert ("self-extend", "static", 100) not in frame.index  # it keeps every key: no static cache
    for context in contexts:
        held = context + STEPS + 1  # the context, the warm-up step and the timed steps
        for method in ("vanilla", "self-extend"):
            assert frame.loc[(method, "eager", context), "stored_tokens"] == held
            mib = frame.loc[(method, "eager", context), "cache_mib"]
            assert mib == pytest.approx(_expected_mib(info, held))
        # preallocated for the context, the steps and the GPU's warm-up steps before capture
        static = context + STEPS + WARM_UP_STEPS + 1
        assert frame.loc[("vanilla", "static", context), "stored_tokens"] == static
        # bounded: 10 starting tokens + L − 1 recent ones (LM-Infinite), 4 sinks + (L − 4) − 1 (StreamingLLM);
        # their static caches hold scratch slots for the moved starting tokens and a ring one slot longer
        # (the step's own key is written before it attends)
        assert frame.loc[("lm-infinite", "eager", context), "stored_tokens"] == 10 + train - 1
        assert frame.loc[("streaming-llm", "eager", context), "stored_tokens"] == train - 1
        assert frame.loc[("lm-infinite", "static", context), "stored_tokens"] == 2 * 10 + train
        assert frame.loc[("streaming-llm", "static", context), "stored_tokens"] == 2 * 4 + train - 4
        assert frame.loc[("lm-infinite", "eager", context), "cache_mib"] == pytest.approx(
            _expected_mib(info, 10 + train - 1)
        )
    assert (frame["n"] == STEPS).all() and (frame["ms_per_token"] > 0).all()
    assert result.ratio("vanilla", "vanilla", 100) == 1.0
    assert result.ratio("lm-infinite", "lm-infinite", 300, "static", "eager") > 0
    assert set(result.summary()["lm-infinite"]) == {"eager", "static"}
    assert set(result.summary()["lm-infinite"]["static"]) == {"100", "300"}


def test_static_mode_needs_a_method_that_has_it(tiny):
    with pytest.raises(OodlensError, match="no static mode: add the mode 'eager'"):
        decode_speed(tiny.model, ["self-extend"], [50], modes=("static",), steps=1, progress=False)
    with pytest.raises(OodlensError, match="unknown decoding mode 'graph'"):
        decode_speed(tiny.model, ["vanilla"], [50], modes=("graph",), steps=1, progress=False)


@pytest.mark.parametrize("policy", [lm_infinite(), streaming_llm()], ids=lambda p: p.name)
def test_filled_bounded_cache_decodes_like_the_full_history(tiny, policy):
    """The same random history in a bounded cache and in a dynamic one: the next step's logits agree, so the
    synthetic fill leaves what a prefill of that length would."""
    model, context = tiny.model, 200
    token = torch.tensor([[5]])
    logits = []
    with torch.no_grad(), apply_policy(model, policy) as handle:
        for cache in (handle.new_cache(), DynamicCache(config=model.config)):
            _fill(model, cache, context, torch.Generator().manual_seed(3))
            out = model(
                input_ids=token,
                position_ids=torch.tensor([[context]]),
                use_cache=True,
                **cache_kwargs(model, cache),
            )
            logits.append(out.logits[0, -1])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named(tiny):
    with pytest.raises(OodlensError, match="steps"):
        decode_speed(tiny.model, ["vanilla"], [10], steps=0)
    with pytest.raises(OodlensError, match="unknown method"):
        decode_speed(tiny.model, ["no-such-method"], [10])

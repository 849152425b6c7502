"""Evaluations on tiny models: transformers' own loss, bucketing, baselines, streaming, scoring, memory."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from oodlens import evaluate
from oodlens.data import passkey_prompt
from oodlens.errors import OodlensError
from oodlens.evaluate import generation
from oodlens.memory import resident_gib
from oodlens.policies import (
    EVERY_KEY,
    POLICIES,
    apply_policy,
    distance_limit,
    lm_infinite,
    policy_by_name,
    vanilla,
    window,
)
from oodlens.stats import perplexity_interval
from oodlens.tiny import TINY_SLIDING_WINDOW, TINY_TRAIN_LENGTH, tiny_model

STREAM_POLICY = lm_infinite(n_global=3, n_local=20, distance_limit=16)


def _ids(shape: tuple[int, ...], seed: int = 0) -> torch.LongTensor:
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_perplexity_equals_transformers_loss(family):
    model = tiny_model(family).model  # gemma2: soft-capped attention and final logits
    ids = _ids((1, 48))
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    result = evaluate.perplexity_by_position(
        model,
        ids,
        [vanilla()],
        train_length=TINY_TRAIN_LENGTH,
        chunk=7,
        truncated_baseline=False,
        progress=False,
    )
    assert result.ppl("vanilla") == pytest.approx(expected, rel=1e-4)


def test_chunk_size_does_not_change_the_nll(llama):
    ids = _ids((2, 40))
    results = [
        evaluate.perplexity_by_position(
            llama.model,
            ids,
            [STREAM_POLICY],
            train_length=TINY_TRAIN_LENGTH,
            chunk=chunk,
            truncated_baseline=False,
            progress=False,
        )
        for chunk in (1, 13, 1024)
    ]
    for other in results[1:]:
        torch.testing.assert_close(
            other.token_nll["lm-infinite"],
            results[0].token_nll["lm-infinite"],
            rtol=0,
            atol=1e-5,
            equal_nan=True,
        )


def test_buckets_cover_every_scored_token_once(llama):
    ids = _ids((3, 50))
    result = evaluate.perplexity_by_position(
        llama.model, ids, [vanilla()], train_length=TINY_TRAIN_LENGTH, bucket=16, progress=False
    )
    table = result.to_dataframe()
    for _, rows in table.groupby("method"):
        assert rows.start.tolist() == [0, 16, 32, 48] and rows.end.tolist() == [16, 32, 48, 50]
        assert rows.n_tokens.sum() == 3 * 49  # every position but the first, in every window
        pooled = (rows.nll * rows.n_tokens).sum() / rows.n_tokens.sum()
        assert pooled == pytest.approx(result.mean_nll(rows.method.iloc[0]), rel=1e-6)
    summary = result.summary()
    assert json.loads(json.dumps(summary)) == summary
    assert set(summary["methods"]["vanilla"]["buckets"][0]) == {"start", "end", "ppl", "ppl_low", "ppl_high"}
    assert summary["methods"]["vanilla"]["ppl_beyond_train_length"] is None  # 50 < 64 positions


def test_truncated_baseline_equals_vanilla_within_train_length(llama):
    ids = _ids((1, 60))
    result = evaluate.perplexity_by_position(
        llama.model, ids, [vanilla()], train_length=TINY_TRAIN_LENGTH, progress=False
    )
    torch.testing.assert_close(
        result.token_nll[evaluate.TRUNCATED_BASELINE],
        result.token_nll["vanilla"],
        rtol=0,
        atol=1e-6,
        equal_nan=True,
    )


def test_truncated_baseline_scores_each_token_with_the_most_context_it_can_have(llama):
    ids = _ids((70,))
    truncated = evaluate.truncated_sequence_nll(llama.model, ids, train_length=16)
    with torch.no_grad():
        first_piece = evaluate.sequence_nll(llama.model, ids[:16])
        later_piece = evaluate.sequence_nll(llama.model, ids[40:56])  # stride 8: the piece that ends at 56
    assert math.isnan(truncated[0]) and not truncated[1:].isnan().any()
    torch.testing.assert_close(truncated[1:16], first_piece[1:])
    torch.testing.assert_close(truncated[48:56], later_piece[8:])


def test_scoring_from_a_position_leaves_the_scored_nll_unchanged(llama):
    ids = _ids((40,))
    with torch.no_grad():
        every = evaluate.sequence_nll(llama.model, ids)
        tail = evaluate.sequence_nll(llama.model, ids, score_from=25)
    assert tail[:25].isnan().all() and not tail[25:].isnan().any()
    torch.testing.assert_close(tail[25:], every[25:], rtol=0, atol=1e-6)


class _TokenCounter:
    """Counts the token positions the model's embedding layer is run on (one forward, or a continuation)."""

    def __init__(self, model):
        self.tokens = 0
        self._hook = model.get_input_embeddings().register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.tokens += args[0].numel()

    def remove(self):
        self._hook.remove()


@pytest.mark.parametrize(
    "policy, agrees_below",
    [
        (lm_infinite(n_global=2, n_local=20, distance_limit=16), 20),  # key 0 moves to distance 16 at i = 20
        (window(20), 20),  # key 0 leaves the window at i = 20
        # the limit acts only beyond the window: key 0 is first seen at distance 12 instead of 30 at i = 30
        (lm_infinite(n_global=2, n_local=30, distance_limit=12), 30),
    ],
)
def test_a_policy_attends_as_vanilla_exactly_below_its_vanilla_prefix(llama, policy, agrees_below):
    assert policy.vanilla_prefix(TINY_TRAIN_LENGTH) == agrees_below
    ids = _ids((1, agrees_below + 6))

    def logits(policy):
        with torch.no_grad(), apply_policy(llama.model, policy, train_length=TINY_TRAIN_LENGTH):
            return llama.model(ids, use_cache=False).logits[0]

    before, after = logits(vanilla()), logits(policy)
    torch.testing.assert_close(after[:agrees_below], before[:agrees_below], rtol=0, atol=1e-5)
    # the bound is tight here: the change is 10x the tolerance above (small logits of a random model)
    assert (after[agrees_below] - before[agrees_below]).abs().max() > 1e-4
    assert vanilla().vanilla_prefix(TINY_TRAIN_LENGTH) == EVERY_KEY


# mistral-sliding and gemma2 have the model's own sliding-window layers, shorter than the shared prefix.
@pytest.mark.parametrize("family", ["llama", "mistral-sliding", "gemma2", "gpt_neox", "phi3"])
def test_a_shared_prefix_gives_the_scores_of_separate_forwards(family):
    model = tiny_model(family).model
    assert TINY_SLIDING_WINDOW < TINY_TRAIN_LENGTH
    ids = _ids((2, 2 * TINY_TRAIN_LENGTH - 10))
    policies = [policy_by_name(name) for name in POLICIES] + [
        dataclasses.replace(lm_infinite(n_global=2, n_local=40, distance_limit=32), name="short-window")
    ]
    results = {
        share: evaluate.perplexity_by_position(
            model, ids, policies, train_length=TINY_TRAIN_LENGTH, share_prefix=share, progress=False
        )
        for share in (True, False)
    }
    assert set(results[True].token_nll) == {*POLICIES, "short-window", evaluate.TRUNCATED_BASELINE}
    for method, nll in results[False].token_nll.items():
        torch.testing.assert_close(
            torch.from_numpy(results[True].token_nll[method]),
            torch.from_numpy(nll),
            rtol=0,
            atol=2e-5,
            equal_nan=True,
        )


def test_a_shared_prefix_is_computed_once_per_window(llama):
    length, train = 100, TINY_TRAIN_LENGTH
    ids = _ids((1, length))
    counted = {}
    for share in (True, False):
        counter = _TokenCounter(llama.model)
        try:
            evaluate.perplexity_by_position(
                llama.model,
                ids,
                [vanilla(), lm_infinite()],
                train_length=train,
                share_prefix=share,
                progress=False,
            )
        finally:
            counter.remove()
        counted[share] = counter.tokens
    # the truncated baseline's pieces of 64 tokens start at 0, 32 and 64 (the last holds 36 tokens)
    assert counted[False] == 2 * length + (train + train + 36)
    # shared: the first 64 tokens once, 36 more per method; the baseline's first piece is the prefix itself
    assert counted[True] == train + 2 * (length - train) + (train + 36)


def test_a_method_that_cannot_share_runs_alone_and_the_others_still_share(llama):
    length, train = 100, TINY_TRAIN_LENGTH
    ids = _ids((1, length))
    rescaled = policy_by_name("pi", target_length=2 * length)  # differs from vanilla from the first token
    assert rescaled.vanilla_prefix(train) == 0
    policies = [vanilla(), lm_infinite(), rescaled]
    counted, results = {}, {}
    for share in (True, False):
        counter = _TokenCounter(llama.model)
        try:
            results[share] = evaluate.perplexity_by_position(
                llama.model, ids, policies, train_length=train, share_prefix=share, progress=False
            )
        finally:
            counter.remove()
        counted[share] = counter.tokens
    # 64 tokens once for vanilla, LM-Infinite and the baseline's first piece; PI from its first token
    assert counted[True] == train + 2 * (length - train) + length + (train + 36)
    assert counted[False] == 3 * length + (train + train + 36)
    for method, nll in results[False].token_nll.items():
        np.testing.assert_allclose(results[True].token_nll[method], nll, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "reaches, held, expected",
    [
        ([EVERY_KEY, 64, 0], 0, 64),  # vanilla and a window share 64; the rescaled method runs alone
        ([EVERY_KEY, 64, 64, 20, 10, 0], 0, 64),  # 64 x 3 methods beats 20 x 4 and 10 x 5
        ([EVERY_KEY], 0, 0),  # alone, with nothing run yet: nothing to share
        ([EVERY_KEY], 30, 99),  # alone, with 30 tokens already run: continue from them, extended
        ([EVERY_KEY, 20, 20], 99, 99),  # holding 99: vanilla saves 99, cutting to 20 saves 3 x 20 - 20
        ([EVERY_KEY] + [20] * 6, 99, 20),  # 7 x 20 - 20 (run again) beats 99
        ([0, 0], 0, 0),
    ],
)
def test_the_shared_prefix_is_the_length_that_saves_the_most(reaches, held, expected):
    methods = [evaluate.scoring.Method(f"m{i}", _reaching(reach)) for i, reach in enumerate(reaches)]
    assert evaluate.prefix.shared_length(methods, TINY_TRAIN_LENGTH, 99, held) == expected


def _reaching(reach: int):
    policy = vanilla() if reach == EVERY_KEY else dataclasses.replace(window(reach), name=f"w{reach}")
    if reach == 0:
        policy = policy_by_name("pi", target_length=200)
    assert policy.vanilla_prefix(TINY_TRAIN_LENGTH) == reach
    return policy


def test_passkey_prompts_of_one_length_run_their_common_filler_once_per_method(llama):
    """Each method's trunk grows from needle to needle: the filler before the deepest needle runs once, and
    each prompt only from its needle on (one new token: the prompt's own forward and nothing more)."""
    depths, length = (0.8, 0.1, 0.5), 340  # out of order: the trunks take them by needle position
    policies = [vanilla(), lm_infinite(n_global=3, n_local=40, distance_limit=32)]
    counter = _TokenCounter(llama.model)
    try:
        shared = evaluate.passkey_retrieval(
            llama.model, llama.tokenizer, policies, lengths=[length], depths=depths,
            train_length=TINY_TRAIN_LENGTH, max_new_tokens=1, truncated_baseline=False, progress=False,
        ).to_dataframe()  # fmt: skip
    finally:
        counter.remove()
    prompts = [
        passkey_prompt(llama.tokenizer, length, depth, seed=generation._passkey_seed(0, length, depth, 0))
        for depth in depths
    ]
    deepest = max(prompt.needle_position for prompt in prompts)
    after_needles = sum(prompt.length - prompt.needle_position for prompt in prompts)
    assert counter.tokens == len(policies) * (deepest + after_needles)
    assert shared.depth.tolist() == list(depths) * 2  # the rows keep the cells' order
    alone = evaluate.passkey_retrieval(
        llama.model, llama.tokenizer, policies, lengths=[length], depths=depths,
        train_length=TINY_TRAIN_LENGTH, max_new_tokens=1, truncated_baseline=False, share_prefix=False,
        progress=False,
    ).to_dataframe()  # fmt: skip
    assert shared.equals(alone)


@pytest.mark.parametrize("name", ["dual-chunk", "ntk", "self-extend"])
def test_passkey_with_trunks_equals_prompts_alone_for_methods_that_depend_on_the_call(llama, name):
    """DCA's logit factor and dynamic NTK's frequencies depend on each call's length: such methods run every
    prompt alone (a trunk would change the keys); Self-Extend does not, and shares."""
    policy = policy_by_name(name, target_length=400) if name == "ntk" else policy_by_name(name)
    runs = {}
    for share in (True, False):
        counter = _TokenCounter(llama.model)
        try:
            runs[share] = evaluate.passkey_retrieval(
                llama.model, llama.tokenizer, [policy], lengths=[340], depths=(0.3, 0.7),
                train_length=TINY_TRAIN_LENGTH, max_new_tokens=2, truncated_baseline=False,
                share_prefix=share, progress=False,
            ).to_dataframe()  # fmt: skip
        finally:
            counter.remove()
        runs[share, "tokens"] = counter.tokens
    assert runs[True].equals(runs[False])
    assert policy.runs_in_pieces(TINY_TRAIN_LENGTH) == (name == "self-extend")
    assert (runs[True, "tokens"] < runs[False, "tokens"]) == (name == "self-extend")


def test_passkey_and_generation_give_the_same_answers_with_a_shared_prefix(llama):
    policies = [vanilla(), lm_infinite(n_global=3, n_local=40, distance_limit=32)]
    passkey, generation, tokens = {}, {}, {}
    for share in (True, False):
        counter = _TokenCounter(llama.model)
        try:
            passkey[share] = evaluate.passkey_retrieval(
                llama.model,
                llama.tokenizer,
                policies,
                lengths=[340],
                depths=(0.2, 0.8),
                train_length=TINY_TRAIN_LENGTH,
                max_new_tokens=4,
                share_prefix=share,
                progress=False,
            ).to_dataframe()
            generation[share] = evaluate.generation_quality(
                llama.model,
                llama.tokenizer,
                _ids((2, 130)),
                policies,
                # the rows keep this order; the shared prefix grows in ascending order
                milestones=[100, 20, 60],
                new_tokens=6,
                train_length=TINY_TRAIN_LENGTH,
                share_prefix=share,
                progress=False,
            ).to_dataframe()
        finally:
            counter.remove()
        tokens[share] = counter.tokens
    assert passkey[True].equals(passkey[False]) and generation[True].equals(generation[False])
    assert generation[True].milestone.tolist() == [100, 20, 60] * 4
    assert generation[True].method.tolist() == ["vanilla"] * 6 + ["lm-infinite"] * 6
    assert tokens[True] < tokens[False]


def test_a_policy_that_attends_as_vanilla_over_prompt_and_answer_gives_vanillas_answer(llama, monkeypatch):
    greedy, prompts_run = generation.greedy, []

    def counting(model, handle, prompt, *args):
        prompts_run.append((handle.policy.name, len(prompt)))
        return greedy(model, handle, prompt, *args)

    monkeypatch.setattr(generation, "greedy", counting)
    windows = _ids((1, 80))
    result = evaluate.generation_quality(
        llama.model,
        llama.tokenizer,
        windows,
        [vanilla(), lm_infinite(n_global=3, n_local=40, distance_limit=32)],
        milestones=[30, 36, 60],  # 30 + 10 new tokens: last query at 38 < 40; 36 + 10: query 44 is past it
        new_tokens=10,
        train_length=TINY_TRAIN_LENGTH,
        progress=False,
    ).to_dataframe()
    assert sorted(prompts_run) == sorted(
        [("vanilla", 30), ("vanilla", 36), ("lm-infinite", 36), ("vanilla", 60), ("lm-infinite", 60)]
    )
    at_30 = result[result.milestone == 30]
    assert at_30.generated.nunique() == 1 and len(at_30) == 2


def test_duplicate_method_names_are_rejected(llama):
    with pytest.raises(OodlensError, match="own name"):
        evaluate.perplexity_by_position(
            llama.model, _ids((1, 10)), [vanilla(), vanilla()], train_length=64, progress=False
        )
    renamed = dataclasses.replace(vanilla(), name="vanilla-2")
    result = evaluate.perplexity_by_position(
        llama.model,
        _ids((1, 10)),
        [vanilla(), renamed],
        train_length=64,
        truncated_baseline=False,
        progress=False,
    )
    assert list(result.token_nll) == ["vanilla", "vanilla-2"]


@pytest.mark.parametrize(
    ("generated", "correct"),
    [
        ("12345.", True),
        (" 12345", True),
        (" The pass key is 12345", True),
        ("1234", False),
        ("123456", False),
        ("12 345", False),
        ("no digits", False),
        (" 54321 or 12345", False),
    ],
)
def test_passkey_digit_matcher(generated, correct):
    assert evaluate.passkey_correct(generated, "12345") is correct


def test_passkey_retrieval_rows_and_accuracy(llama, monkeypatch):
    # The tiny model is random: make it "answer" with the passkey in its prompt, so correctness is known.
    def answer_from_prompt(model, handle, prompt, max_new_tokens, pad_token_id, prefix=None, until=None):
        text = llama.tokenizer.decode(prompt)
        key = text.split("The pass key is ")[1][:5] if "The pass key is " in text else "00000"
        return torch.tensor(llama.tokenizer(f" {key}.", add_special_tokens=False)["input_ids"])

    monkeypatch.setattr(generation, "greedy", answer_from_prompt)
    result = evaluate.passkey_retrieval(
        llama.model,
        llama.tokenizer,
        [vanilla()],
        lengths=[400],
        depths=(0.1, 0.9),
        samples_per_cell=2,
        train_length=TINY_TRAIN_LENGTH,
        progress=False,
    )
    table = result.to_dataframe()
    assert len(table) == 2 * 2 * 2  # (vanilla, truncated) × depths × samples
    assert table.passkey.str.fullmatch(r"\d{5}").all() and table.passkey.nunique() == 4
    assert table[table.method == "vanilla"].correct.all()
    # truncated to 64 tokens, the needle is gone, so the stand-in model cannot answer
    assert not table[table.method == evaluate.TRUNCATED_BASELINE].correct.any()
    assert (table[table.method == evaluate.TRUNCATED_BASELINE].prompt_tokens == TINY_TRAIN_LENGTH).all()
    assert result.summary() == {"vanilla": {"400": 1.0}, evaluate.TRUNCATED_BASELINE: {"400": 0.0}}
    assert len(result.accuracy(by_depth=True)) == 4


@pytest.mark.parametrize("last_needle_token_kept", [False, True])
def test_truncated_baseline_skips_a_prompt_whose_needle_is_cut(llama, monkeypatch, last_needle_token_kept):
    # the train length puts the truncated context's first token just after the needle, or on its last token
    prompt = passkey_prompt(llama.tokenizer, 400, 0.3, seed=generation._passkey_seed(0, 400, 0.3, 0))
    train_length = prompt.length - prompt.needle_end + last_needle_token_kept
    prompts_run = []

    def recording(model, handle, ids, max_new_tokens, pad_token_id, prefix=None, until=None):
        prompts_run.append(ids.numel())
        return torch.tensor(llama.tokenizer(f" {prompt.passkey}.", add_special_tokens=False)["input_ids"])

    monkeypatch.setattr(generation, "greedy", recording)
    result = evaluate.passkey_retrieval(
        llama.model, llama.tokenizer, [vanilla()], lengths=[400], depths=(0.3,), train_length=train_length,
        progress=False,
    )  # fmt: skip
    rows = result.to_dataframe().set_index("method")
    truncated = rows.loc[evaluate.TRUNCATED_BASELINE]
    assert sorted(prompts_run) == sorted([train_length, prompt.length][1 - last_needle_token_kept :])
    assert truncated.prompt_tokens == train_length
    assert truncated.needle_seen == truncated.correct == last_needle_token_kept
    assert (truncated.generated == "") != last_needle_token_kept
    assert rows.loc["vanilla"].needle_seen and rows.loc["vanilla"].correct


def test_truncated_baseline_of_a_prompt_that_fits_is_not_generated_twice(llama, monkeypatch):
    greedy, prompts_run = generation.greedy, []

    def counting(model, handle, prompt, *args):
        prompts_run.append(len(prompt))
        return greedy(model, handle, prompt, *args)

    monkeypatch.setattr(generation, "greedy", counting)
    result = evaluate.passkey_retrieval(
        llama.model,
        llama.tokenizer,
        [vanilla()],
        lengths=[350, 600],  # the first fits in the train length, the second is cut to it
        depths=(0.5,),
        train_length=400,
        max_new_tokens=3,
        progress=False,
    )
    table = result.to_dataframe().set_index(["method", "length"])
    expected = [table.prompt_tokens[("vanilla", 350)], table.prompt_tokens[("vanilla", 600)], 400]
    assert sorted(prompts_run) == sorted(expected)
    fits = table.xs(350, level="length")
    assert fits.generated.nunique() == 1 and fits.prompt_tokens.nunique() == 1 and len(fits) == 2


def test_passkey_retrieval_runs_with_real_generation(llama):
    policy = lm_infinite(n_global=3, n_local=20, distance_limit=16)
    result = evaluate.passkey_retrieval(
        llama.model,
        llama.tokenizer,
        [policy],
        lengths=[340],
        depths=(0.5,),
        train_length=TINY_TRAIN_LENGTH,
        max_new_tokens=3,
        truncated_baseline=False,
        progress=False,
    )
    row = result.to_dataframe().iloc[0]
    assert row.method == "lm-infinite" and row.length == 340 and isinstance(row.generated, str)
    assert row.correct == evaluate.passkey_correct(row.generated, row.passkey)


def test_identical_continuation_scores_perfectly():
    text = "The grass is green. The sky is blue. The sun is yellow."
    bleu, rouge_l = evaluate.continuation_scores(text, text)
    assert bleu == pytest.approx(100.0) and rouge_l == pytest.approx(1.0)
    bleu, rouge_l = evaluate.continuation_scores("completely different words", text)
    assert bleu < 10 and rouge_l == 0.0


def test_generation_quality_has_a_row_per_milestone(llama):
    windows = _ids((2, 120))
    result = evaluate.generation_quality(
        llama.model,
        llama.tokenizer,
        windows,
        [STREAM_POLICY],
        milestones=[30, 90],
        new_tokens=8,
        train_length=TINY_TRAIN_LENGTH,
        progress=False,
    )
    table = result.to_dataframe()
    assert sorted(zip(table.window, table.milestone, strict=True)) == [(0, 30), (0, 90), (1, 30), (1, 90)]
    assert table.bleu.between(0, 100).all() and table.rouge_l.between(0, 1).all()
    assert set(result.summary()["lm-infinite"]) == {"30", "90"}
    with pytest.raises(OodlensError, match="milestones"):
        evaluate.generation_quality(
            llama.model,
            llama.tokenizer,
            windows,
            [vanilla()],
            milestones=[115],
            new_tokens=8,
            train_length=TINY_TRAIN_LENGTH,
            progress=False,
        )


def test_streaming_equals_one_forward(llama):
    ids = _ids((300,))
    one_forward = evaluate.perplexity_by_position(
        llama.model,
        ids[None],
        [STREAM_POLICY],
        train_length=64,
        bucket=1,
        truncated_baseline=False,
        progress=False,
    )
    streamed = evaluate.streaming_perplexity(
        llama.model,
        evaluate.cycle_tokens(ids, 300, piece=37),
        STREAM_POLICY,
        train_length=64,
        chunk=16,
        bucket=1,
        progress=False,
    )
    expected, got = one_forward.to_dataframe(), streamed.to_dataframe()
    assert got.start.tolist() == expected.start.tolist() == list(range(1, 300))
    assert (got.nll - expected.nll).abs().max() < 1e-4
    assert streamed.n_tokens == 300 and streamed.peak_cache_tokens == 3 + 20 - 1
    assert json.loads(json.dumps(streamed.summary())) == streamed.summary()


def test_streaming_cache_stays_constant_and_max_tokens_stops_an_endless_stream(llama):
    endless = evaluate.cycle_tokens(_ids((50,)), 10**12)
    short = evaluate.streaming_perplexity(
        llama.model, endless, STREAM_POLICY, train_length=64, chunk=16, max_tokens=100, progress=False
    )
    longer = evaluate.streaming_perplexity(
        llama.model, endless, STREAM_POLICY, train_length=64, chunk=16, max_tokens=400, progress=False
    )
    assert (short.n_tokens, longer.n_tokens) == (100, 400)
    assert short.peak_cache_tokens == longer.peak_cache_tokens == 22


def test_streaming_keeps_each_buckets_peak_memory_and_time(llama):
    result = evaluate.streaming_perplexity(
        llama.model, _ids((400,)), STREAM_POLICY, train_length=64, chunk=20, bucket=100, progress=False
    )
    frame = result.to_dataframe()
    assert frame.start.tolist() == [0, 100, 200, 300]
    resident = resident_gib()[0]
    assert np.isfinite(result.peak_memory_gib).all() and (result.peak_memory_gib > 0.5 * resident).all()
    assert (result.bucket_seconds > 0).all() and result.bucket_seconds.sum() <= result.seconds
    assert [row["peak_memory_gib"] for row in result.summary()["buckets"]] == frame.peak_memory_gib.tolist()


def test_a_streams_interval_resamples_its_buckets_whole():
    def stream(nll_sum: list[float], n_scored: list[int]) -> evaluate.StreamingResult:
        ones = np.ones(len(nll_sum))
        return evaluate.StreamingResult(
            "m", 10, np.array(nll_sum), np.array(n_scored), 10 * len(nll_sum), 1.0, 5, ones, ones
        )

    # every bucket scores 2 nats a token: the interval is the point, whatever the bucket sizes
    flat = stream([20.0, 0.0, 18.0, 20.0], [10, 0, 9, 10]).estimate()
    assert (flat.value, flat.low, flat.high) == pytest.approx((math.e**2,) * 3)
    assert (flat.n, flat.method) == (3, "bootstrap-buckets")  # the empty bucket is no sample
    # buckets that differ: weighed by their tokens, as windows are
    varied = stream([10.0, 30.0, 9.0, 25.0], [10, 10, 9, 10])
    estimate = varied.estimate()
    by_hand = perplexity_interval(np.array([1.0, 3.0, 1.0, 2.5]), np.array([10, 10, 9, 10]))
    assert (estimate.value, estimate.low, estimate.high, estimate.n) == pytest.approx(by_hand)
    assert estimate.value == pytest.approx(varied.ppl()) and estimate.low < estimate.value < estimate.high
    assert varied.summary()["intervals"]["ppl"] == estimate.to_dict()


def test_device_peak_sees_an_allocation_made_after_the_reset():
    # in a fresh process: in this one, memory freed by earlier tests (kept by the allocator) could take the
    # new block without any new resident page
    code = (
        "import torch\n"
        "from oodlens.memory import device_peak_gib, reset_device_peak\n"
        "cpu = torch.device('cpu')\n"
        "was_reset = reset_device_peak(cpu)\n"
        "before = device_peak_gib(cpu, was_reset)\n"
        "block = torch.ones(64 * 2**20)  # 256 MiB, written so its pages are resident\n"
        "print(was_reset, device_peak_gib(cpu, was_reset) - before)\n"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    was_reset, grown = done.stdout.split()
    assert was_reset == "True" and float(grown) > 0.2


@pytest.mark.parametrize("policy", [vanilla(), distance_limit(20), lm_infinite(n_local=20, top_k=2)])
def test_streaming_a_policy_that_keeps_every_key_needs_an_explicit_bound(llama, policy):
    with pytest.raises(OodlensError, match="max_tokens"):
        evaluate.streaming_perplexity(llama.model, _ids((100,)), policy, train_length=64, progress=False)


@pytest.mark.parametrize("name", ["dual-chunk", "ntk"])
def test_a_method_that_depends_on_the_call_cannot_stream(llama, name):
    policy = policy_by_name(name, target_length=400) if name == "ntk" else policy_by_name(name)
    with pytest.raises(OodlensError, match="split into calls"):
        evaluate.streaming_perplexity(
            llama.model, _ids((100,)), policy, train_length=64, max_tokens=80, progress=False
        )


def test_streaming_vanilla_with_an_explicit_bound(llama):
    bounded = evaluate.streaming_perplexity(
        llama.model, _ids((100,)), vanilla(), train_length=64, chunk=32, max_tokens=80, progress=False
    )
    assert bounded.n_tokens == bounded.peak_cache_tokens == 80


def test_cycle_tokens_repeats_the_sequence():
    pieces = list(evaluate.cycle_tokens(torch.arange(5), 12, piece=3))
    assert torch.cat(pieces).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert max(len(piece) for piece in pieces) <= 3


def test_memory_estimate_grows_with_length_and_refuses_nonsense(llama):
    info = llama.info
    estimates = [evaluate.estimate_forward_memory(info, length) for length in (1, 1024, 4096, 16384, 65536)]
    assert estimates == sorted(estimates) and len(set(estimates)) == len(estimates)
    # a bounded policy holds fewer keys than vanilla
    assert evaluate.estimate_forward_memory(info, 65536, policy=lm_infinite()) < estimates[-1]
    budget = estimates[3]
    fits = evaluate.longest_length_within(info, budget)
    assert (
        evaluate.estimate_forward_memory(info, fits)
        <= budget
        < evaluate.estimate_forward_memory(info, fits + 1)
    )
    assert evaluate.longest_length_within(info, 0) == 0
    for bad in (
        dict(length=0),
        dict(length=-5),
        dict(length=1.5),
        dict(length=8, batch=0),
        dict(length=8, dtype_bytes=3),
    ):
        with pytest.raises(OodlensError):
            evaluate.estimate_forward_memory(info, **bad)


@pytest.mark.slow
def test_smollm2_retrieves_a_passkey_at_1k_tokens():
    from oodlens.models import load_model

    loaded = load_model("smollm2")
    result = evaluate.passkey_retrieval(
        loaded.model,
        loaded.tokenizer,
        [vanilla()],
        lengths=[1024],
        depths=(0.5,),
        train_length=loaded.info.train_length,
        truncated_baseline=False,
        progress=False,
    )
    row = result.to_dataframe().iloc[0]
    assert row.correct, f"generated {row.generated!r} for passkey {row.passkey}"

"""The method comparison: its arithmetic on hand-made measurements, and one run on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from oodlens.display import format_number
from oodlens.errors import OodlensError
from oodlens.evaluate import TRUNCATED_BASELINE, MethodComparison, compare_methods, perplexity_by_position
from oodlens.evaluate.comparison import REPAIRS
from oodlens.policies import lm_infinite, streaming_llm, vanilla
from oodlens.tiny import byte_tokenizer, tiny_model

TRAIN = 4


def buckets(nlls: list[float | None], width: int = 2) -> list[dict]:
    return [
        {"start": i * width, "end": (i + 1) * width, "nll": nll, "n_tokens": width - (i == 0)}
        for i, nll in enumerate(nlls)
    ]


def measured(nlls, logit, entropy, sink, passkey) -> dict:
    return {
        "buckets": buckets(nlls),
        "forward_s": 1.5,
        "factors": {
            "max_logit_within": 10.0,
            "max_logit_beyond": logit,
            "entropy_late_within": 2.0,
            "entropy_beyond": entropy,
            "sink_mass_within": 0.4,
            "sink_mass_beyond": sink,
            "start_token_auc": 1.0,
        },
        "passkey": passkey,
    }


@pytest.fixture
def comparison() -> MethodComparison:
    # L = 4, windows of 12 tokens in buckets of 2: within [0, 4), spans [4, 8) and [8, 12)
    methods = {
        "vanilla": measured([1.0, 1.0, 2.0, 3.0, 4.0, None], 30.0, 3.0, 0.1, {"6": [0, 2], "8": [0, 2]}),
        "fixed": measured([1.0, 1.0, 1.0, 1.5, 1.0, 1.0], 12.0, 2.2, 0.3, {"6": [2, 2], "8": [1, 2]}),
    }
    baseline = {"buckets": buckets([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), "passkey": {"6": [1, 2], "8": [0, 2]}}
    speed = pd.DataFrame(
        {"method": ["vanilla", "fixed"], "ms_per_token": [9.0, 3.0], "cache_mib": [12.0, 4.0]}
    )
    return MethodComparison(methods, baseline, {"2": [2, 2]}, TRAIN, 12, 2, [6, 8], speed)


def test_span_perplexity_is_token_weighted_and_infinite_where_a_bucket_overflowed(comparison):
    # the first bucket holds 1 token, the second 2: exp((1·1 + 1·2) / 3) = e
    assert comparison.span_ppl("vanilla", 0, 4) == pytest.approx(math.e)
    assert comparison.span_ppl("vanilla", 4, 8) == pytest.approx(math.exp((2.0 * 2 + 3.0 * 2) / 4))
    assert comparison.span_ppl("vanilla", 8, 12) == math.inf
    assert math.isnan(comparison.span_ppl("vanilla", 100, 200))
    assert comparison.spans() == [(0, 4), (4, 8), (8, 12)]


def test_the_table_holds_ratios_to_the_baseline_passkey_counts_and_costs(comparison):
    table = comparison.table().set_index("method")
    assert list(table.index) == ["vanilla", "fixed", TRUNCATED_BASELINE]
    assert table.loc["fixed", "ppl 4-8 / baseline"] == pytest.approx(math.exp(1.25) / math.e)
    assert table.loc["fixed", "ppl 8-12 / baseline"] == pytest.approx(1.0)
    assert table.loc["vanilla", "ppl 8-12 / baseline"] == math.inf
    assert table.loc[TRUNCATED_BASELINE, "ppl 4-8 / baseline"] == 1.0
    # Wilson 95 % by hand: 2/2 → [0.342, 1]; 1/2 → [0.0945, 0.905]
    assert (table.loc["fixed", "passkey @6"], table.loc["fixed", "passkey @8"]) == (
        "2/2 [0.342, 1]",
        "1/2 [0.0945, 0.905]",
    )
    assert table.loc[TRUNCATED_BASELINE, "passkey @6"] == "1/2 [0.0945, 0.905]"
    assert table.loc["fixed", "max logit >L"] == 12.0
    assert table.loc["fixed", "prefill s @12"] == 1.5
    assert table.loc["vanilla", "decode ms/token @12"] == 9.0
    assert table.loc["fixed", "cache MiB @12"] == 4.0
    assert np.isnan(table.loc[TRUNCATED_BASELINE, "max logit >L"])


def test_the_table_pools_each_methods_task_scores_with_an_interval(comparison):
    # "fixed": 3 of 4 binary scores (a Wilson interval); vanilla: scores 0.5 and 1 (Wilson at their mean)
    rows = [
        {"method": "fixed", "task": task, "length": 6, "score": score}
        for task, score in (("niah_single", 1.0), ("niah_single", 1.0), ("variable_tracking", 1.0),
                            ("variable_tracking", 0.0))
    ] + [
        {"method": "vanilla", "task": "common_words", "length": 6, "score": score} for score in (0.5, 1.0)
    ]  # fmt: skip
    comparison.tasks = pd.DataFrame(rows)
    table = comparison.table().set_index("method")

    def wilson_text(p: float, n: int, z: float = 1.959964) -> str:
        """"p [low, high]" by hand: (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
        centre, half = p + z**2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
        low, high = (centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n)
        return f"{format_number(p)} [{format_number(low)}, {format_number(high)}]"

    assert table.loc["fixed", "tasks @6"] == wilson_text(0.75, 4)
    assert table.loc["vanilla", "tasks @6"] == wilson_text(0.75, 2)  # at the mean score of two prompts
    assert pd.isna(table.loc[TRUNCATED_BASELINE, "tasks @6"])  # the baseline answered no task here
    tasks = comparison.task_result().accuracy().set_index(["method", "task"])
    cell = tasks.loc[("fixed", "variable_tracking")]
    assert (cell["value"], cell["n"], cell["interval"]) == (0.5, 2, "wilson")
    assert tasks.loc[("vanilla", "common_words"), "interval"] == "wilson-bound"


def test_the_repair_map_divides_by_vanillas_value_within_the_training_length(comparison):
    repairs = comparison.repairs().set_index(["method", "quantity"])
    ratio = repairs["ratio"]
    assert list(repairs.index.get_level_values("quantity").unique()) == list(REPAIRS)
    assert ratio["vanilla", REPAIRS[0]] == pytest.approx(3.0)  # 30 beyond / 10 within
    assert ratio["fixed", REPAIRS[0]] == pytest.approx(1.2)
    assert ratio["fixed", REPAIRS[1]] == pytest.approx(1.1)  # 2.2 / 2.0
    assert ratio["vanilla", REPAIRS[2]] == pytest.approx(0.25)  # 0.1 / 0.4
    assert ratio["fixed", REPAIRS[3]] == pytest.approx(1.0)  # last span over the baseline's
    assert ratio["vanilla", REPAIRS[3]] == math.inf
    assert ratio["fixed", REPAIRS[4]] == pytest.approx(0.75)  # 3 of 4 over vanilla's 2 of 2 within L
    assert repairs.loc[("fixed", REPAIRS[4]), "label"] == "3/4"


def test_the_repair_map_needs_vanilla(comparison):
    comparison.methods.pop("vanilla")
    with pytest.raises(OodlensError, match="needs vanilla among the methods"):
        comparison.repairs()


@pytest.fixture(scope="module")
def tiny_comparison():
    model = tiny_model("llama").model  # pretrained "at" 64 tokens
    ids = torch.randint(3, 250, (1, 192), generator=torch.Generator().manual_seed(0))
    policies = [lm_infinite(), streaming_llm()]
    result = compare_methods(
        model,
        byte_tokenizer(),
        ids,
        policies,
        passkey_lengths=[400],
        depths=[0.5],
        within_length=340,
        bucket=32,
        decode_steps=2,
        progress=False,
    )
    return model, ids, result


def test_a_tiny_comparison_adds_vanilla_and_matches_a_direct_measurement(tiny_comparison):
    model, ids, result = tiny_comparison
    assert list(result.methods) == ["vanilla", "lm-infinite", "streaming-llm"]
    direct = perplexity_by_position(model, ids, [vanilla(), lm_infinite()], train_length=64, progress=False)
    table = result.table().set_index("method")
    for method in ("vanilla", "lm-infinite"):
        assert table.loc[method, "ppl <64"] == pytest.approx(direct.ppl(method, 1, 64), rel=1e-5)
        assert table.loc[method, "ppl 128-192 / baseline"] == pytest.approx(
            direct.ppl(method, 128, 192) / direct.ppl(TRUNCATED_BASELINE, 128, 192), rel=1e-5
        )
    # within L every method attends as vanilla does
    assert table.loc["lm-infinite", "ppl <64"] == pytest.approx(table.loc["vanilla", "ppl <64"], rel=1e-5)
    assert table.loc["vanilla", "passkey @400"] in {"0/1 [0, 0.793]", "1/1 [0.207, 1]"}
    # bounded caches hold fewer keys than vanilla's after 192 tokens
    assert table.loc["lm-infinite", "cache MiB @192"] < table.loc["vanilla", "cache MiB @192"]
    assert len(result.repairs()) == 3 * len(REPAIRS)
    assert "MethodComparison(methods=3" in repr(result)


def test_two_policies_of_one_name_are_refused(tiny_comparison):
    model, ids, _ = tiny_comparison
    with pytest.raises(OodlensError, match="two policies share a name"):
        compare_methods(model, byte_tokenizer(), ids, [lm_infinite(), lm_infinite()], progress=False)

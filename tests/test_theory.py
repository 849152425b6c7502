"""The paper's statements checked on synthetic diagnoses (where the answer is known) and on captured ones."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from oodlens.capture import TABLE_COLUMNS, CaptureConfig, Diagnosis, diagnose
from oodlens.policies import lm_infinite
from oodlens.theory import check_theory, entropy_growth_fit, entropy_lower_bound, logit_growth
from oodlens.tiny import tiny_model

TRAIN = 64
LENGTH = 128


def _diagnosis(**tables: pd.DataFrame) -> Diagnosis:
    """A diagnosis holding the given tables (the others empty)."""
    full = {
        kind: tables.get(kind, pd.DataFrame(columns=list(columns))) for kind, columns in TABLE_COLUMNS.items()
    }
    return Diagnosis({"train_length": TRAIN, "length": LENGTH}, full)


def _distance_table(
    within_max: float, beyond_max: float, last_within: float, last_beyond: float
) -> pd.DataFrame:
    """One head, two distance bins: [0, 64) and [64, 128)."""
    return pd.DataFrame(
        {
            "layer": [0, 0],
            "head": [0, 0],
            "bin_start": [0, TRAIN],
            "bin_end": [TRAIN, LENGTH],
            "count": [10, 10],
            "mean": [0.0, 0.0],
            "std": [1.0, 1.0],
            "min": [-0.5, -0.5],
            "max": [within_max, beyond_max],
            "last_query_max": [last_within, last_beyond],
            "running_max": [last_within, max(last_within, last_beyond)],
        }
    )


def _query_table(
    n_keys: int, entropy: float, max_logit: float = 0.5, min_logit: float = -0.5
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [0],
            "head": [0],
            "position": [n_keys - 1],
            "max_logit": [max_logit],
            "min_logit": [min_logit],
            "n_keys": [n_keys],
            "entropy": [entropy],
            "entropy_min": [entropy],
        }
    )


def test_entropy_bound_reports_a_violation():
    # B = 0.5, n = 100: the bound is ln 100 - 1 ≈ 3.61, so an entropy of 1.0 violates it.
    diagnosis = _diagnosis(
        logits_by_distance=_distance_table(0.5, 0.5, 0.1, 0.1), max_logit_by_position=_query_table(100, 1.0)
    )
    report = entropy_lower_bound(diagnosis).iloc[0]
    assert report["logit_bound"] == 0.5
    assert report["bound"] == pytest.approx(math.log(100) - 1.0)
    assert not report["holds"] and report["n_violations"] == 1 and not report["range_holds"]


def test_entropy_bound_holds_when_entropy_is_high_enough():
    diagnosis = _diagnosis(
        logits_by_distance=_distance_table(0.5, 0.5, 0.1, 0.1), max_logit_by_position=_query_table(100, 4.0)
    )
    report = entropy_lower_bound(diagnosis).iloc[0]
    assert report["holds"] and report["n_violations"] == 0 and report["range_holds"]


def test_entropy_fit_recovers_slopes():
    edges = np.array([0, 8, 16, 32, 64, 80, 96, 112, 128])
    middle_n = (edges[:-1] + edges[1:] + 1) / 2
    within = edges[1:] <= TRAIN
    mean = np.where(within, 0.5 + 0.8 * np.log(middle_n), 3.0 + 0.1 * np.log(middle_n))
    entropy = pd.DataFrame(
        {
            "layer": 0,
            "head": 0,
            "bin_start": edges[:-1],
            "bin_end": edges[1:],
            "count": np.diff(edges),
            "mean": mean,
            "std": 0.0,
            "min": mean,
            "max": mean,
            "sink_mass": 0.0,
        }
    )
    fit = entropy_growth_fit(_diagnosis(entropy_by_position=entropy)).set_index("region")
    assert fit.loc["within", "slope"] == pytest.approx(0.8)
    assert fit.loc["within", "intercept"] == pytest.approx(0.5)
    assert fit.loc["beyond", "slope"] == pytest.approx(0.1)
    assert fit.loc["beyond", "n_bins"] == 4


def test_logit_growth_measures_running_max():
    growth = logit_growth(_diagnosis(logits_by_distance=_distance_table(4.0, 3.0, 2.0, 3.0))).set_index(
        "statistic"
    )
    last = growth.loc["last_query"]
    assert (last["within"], last["beyond"], last["running_max"]) == (2.0, 3.0, 3.0)
    assert last["increase"] == 1.0 and last["ratio"] == 1.5 and last["heads_exceeding"] == 1.0
    everything = growth.loc["all_sampled"]  # the running max never falls: beyond 3 < within 4 adds nothing
    assert (
        everything["running_max"] == 4.0
        and everything["increase"] == 0.0
        and everything["heads_exceeding"] == 0
    )


@pytest.fixture(scope="module")
def tiny_diagnoses():
    model = tiny_model("llama", max_position_embeddings=LENGTH).model
    ids = torch.randint(3, 256, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    config = CaptureConfig(query_stride=1)
    return {
        "vanilla": diagnose(model, ids, config=config, train_length=TRAIN),
        "lm-infinite": diagnose(
            model,
            ids,
            lm_infinite(n_global=3, n_local=20, distance_limit=16),
            config=config,
            train_length=TRAIN,
        ),
    }


def test_bound_holds_on_captured_data_and_tampering_breaks_it(tiny_diagnoses):
    captured = tiny_diagnoses["vanilla"]
    report = check_theory(captured)
    assert report.summary()["entropy_bound_holds"] and report.summary()["entropy_range_bound_holds"]
    assert len(report.entropy_bound) == 2 * 4  # layers × heads
    assert (report.entropy_bound["n_keys"] == LENGTH).all()

    tampered = captured.tables["max_logit_by_position"].copy()
    tampered.loc[tampered.index[-1], "entropy_min"] = 0.0  # a last query that attends one key only
    broken = Diagnosis(
        captured.meta, {**captured.tables, "max_logit_by_position": tampered}, captured.samples
    )
    summary = check_theory(broken).summary()
    assert not summary["entropy_bound_holds"] and summary["entropy_bound_violations"] == 1


def test_lm_infinite_flattens_entropy_growth_beyond_train_length(tiny_diagnoses):
    # A random tiny model attends almost uniformly, so entropy ≈ ln(keys attended): it keeps growing under
    # vanilla attention and stops once LM-Infinite caps the keys at n_global + n_local.
    vanilla = check_theory(tiny_diagnoses["vanilla"]).summary()
    fixed = check_theory(tiny_diagnoses["lm-infinite"]).summary()
    assert vanilla["entropy_slope_beyond"] > 0.5
    assert abs(fixed["entropy_slope_beyond"]) < 0.1
    assert vanilla["entropy_slope_within"] > 0.5

"""Each question the code asks has one answer, used everywhere: these tests would have caught the places that
once disagreed (the bounded-cache decision lived in three modules; two train-length checks had two rules)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from oodlens import evaluate, probe
from oodlens.cache import BoundedCache
from oodlens.errors import OodlensError
from oodlens.evaluate import budget
from oodlens.evaluate.scoring import new_cache
from oodlens.models import load_model, model_info, train_length_of
from oodlens.policies import (
    apply_policy,
    distance_limit,
    lambda_mask,
    lm_infinite,
    policy_by_name,
    vanilla,
    window,
)
from oodlens.probe.result import format_number
from oodlens.tiny import tiny_model

PACKAGE = Path(__file__).resolve().parent.parent / "oodlens"
TRAIN = 64


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").model


# ---------------------------------------------------------------------------------- bounded-cache decision


@pytest.mark.parametrize(
    "policy, bounded, reason",
    [
        (window(20), True, ""),
        (lambda_mask(n_global=3, n_local=20), True, ""),
        (lm_infinite(n_global=3, n_local=20), True, ""),
        (lm_infinite(top_k=5), False, "top-5 middle keys"),
        (distance_limit(20), False, "every key beyond its window"),
        (vanilla(), False, "no window"),
    ],
)
def test_every_consumer_follows_the_one_cache_decision(llama, policy, bounded, reason):
    plan = policy.cache_plan(TRAIN)
    assert plan.bounded is bounded and reason in plan.reason
    with apply_policy(llama, policy, train_length=TRAIN) as handle:
        made = new_cache(llama, handle)  # what every evaluation decodes with
        assert isinstance(made, BoundedCache) is bounded
        if not bounded:
            assert type(made) is DynamicCache
            with pytest.raises(OodlensError, match=re.escape(plan.reason)):
                handle.new_cache()
        else:
            assert made.layers[0].n_global == plan.n_global and made.layers[0].n_local == plan.window
    ids = torch.randint(3, 200, (300,))
    if bounded:
        result = evaluate.streaming_perplexity(
            llama, ids, policy, train_length=TRAIN, chunk=50, progress=False
        )
        assert result.peak_cache_tokens == plan.n_global + plan.window - 1
    else:
        with pytest.raises(OodlensError, match=re.escape(plan.reason)):
            evaluate.streaming_perplexity(llama, ids, policy, train_length=TRAIN, progress=False)
    info = model_info(llama)
    long, short = (budget.estimate_forward_memory(info, n, policy=policy) for n in (4096, 2048))
    grows_like_full = budget.estimate_forward_memory(info, 4096) - budget.estimate_forward_memory(info, 2048)
    if bounded:  # the cache part of the estimate stops growing once the window is full
        assert long - short < grows_like_full


@pytest.mark.parametrize(
    "methods, streamed",
    [("vanilla,window", "window"), ("vanilla,lm-infinite", "lm-infinite"), ("vanilla,distance-limit", None)],
)
def test_the_probe_streams_with_the_methods_that_have_a_bounded_cache(tmp_path, methods, streamed):
    out = tmp_path / "out"
    argv = ["--model", "tiny:llama", "--length", "128", "--methods", methods, "--stream-tokens", "200"]
    assert probe.main([*argv, "--no-passkey", "--no-generation", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    if streamed is None:
        assert (
            summary["streaming"] is None and "needs a method with a bounded cache" in summary["warnings"][-1]
        )
    else:
        assert summary["streaming"]["method"] == streamed


# ---------------------------------------------------------------------------------- the pretraining length


def test_every_function_takes_the_same_default_pretraining_length(llama):
    assert train_length_of(llama) == model_info(llama).train_length == TRAIN
    windows = torch.randint(3, 200, (1, 80))
    with_default = evaluate.perplexity_by_position(llama, windows, [vanilla()], progress=False)
    explicit = evaluate.perplexity_by_position(
        llama, windows, [vanilla()], train_length=TRAIN, progress=False
    )
    assert with_default.train_length == TRAIN and with_default.summary() == explicit.summary()
    with apply_policy(llama, lm_infinite()) as handle:
        assert handle.policy.window == TRAIN and handle.train_length == TRAIN


@pytest.mark.parametrize("bad", [1, 0, -8, 2.5, True])
def test_every_function_checks_the_pretraining_length_by_one_rule(llama, bad):
    message = re.escape(f"train_length must be an integer ≥ 2, got {bad!r}")
    windows = torch.randint(3, 200, (1, 80))
    calls = [
        lambda: load_model("tiny:llama", train_length=bad),
        lambda: model_info(llama, train_length=bad),
        lambda: apply_policy(llama, lm_infinite(), train_length=bad),
        lambda: evaluate.perplexity_by_position(
            llama, windows, [vanilla()], train_length=bad, progress=False
        ),
        lambda: lm_infinite().resolve(bad),
    ]
    for call in calls:
        with pytest.raises(OodlensError, match=message):
            call()


# ---------------------------------------------------------------------------------- numbers, names, writers


@pytest.mark.parametrize(
    "value, text",
    [(None, "–"), (3, "3"), (9.2412, "9.24"), (0.00123456, "0.00123"), (12345.6, "1.23e+04"),
     (-12345.6, "-1.23e+04"), (float("inf"), "∞"), (float("-inf"), "-∞"), (float("nan"), "n/a")],
)  # fmt: skip
def test_one_number_format(value, text):
    assert format_number(value) == text


def test_report_table_and_verdict_format_numbers_alike(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "tiny:llama", "--length", "128", "--no-passkey", "--no-generation", "--no-progress"]
    assert probe.main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ppl = summary["methods"]["lm-infinite"]["ppl_beyond_train_length"]
    report = (out / "report.md").read_text()
    assert f"lm-infinite has perplexity {format_number(ppl)}" in summary["verdict"]
    assert f"| {format_number(ppl)} |" in report


OLD_STARTING_TOKEN_NAMES = ("sink_tokens", "start_tokens", "first_tokens", "n_head", "first_positions")


def test_starting_tokens_have_one_name():
    for path in PACKAGE.rglob("*.py"):
        names = {node.id for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Name)}
        names |= {
            node.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Attribute)
        }
        names |= {node.arg for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.arg)}
        assert not names & set(OLD_STARTING_TOKEN_NAMES), path
    assert policy_by_name("lm-infinite", n_global=7).resolve(TRAIN).n_global == 7


def test_only_storage_replaces_files_and_folders():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "storage":
            continue
        text = path.read_text()
        found = [call for call in ("os.replace(", "os.rename(", "mkdtemp(", "shutil.rmtree(") if call in text]
        assert not found, f"{path.relative_to(PACKAGE)} writes on its own: {found}"

"""RULER-style tasks under every method (``oodlens.evaluate.task_accuracy``, the probe's ``--tasks``)."""

from __future__ import annotations

import json

import pytest
import torch

from oodlens import probe, tasks
from oodlens.evaluate import TRUNCATED_BASELINE, TaskResult, generate_greedy, task_accuracy
from oodlens.evaluate import tasks as task_eval
from oodlens.evaluate.scoring import new_cache
from oodlens.policies import apply_policy, lm_infinite, policy_by_name, vanilla
from oodlens.probe.collect import validate_summary
from oodlens.stats import Estimate
from oodlens.tiny import byte_tokenizer, tiny_model

LENGTH = 2000  # every task used here fits 2,000 bytes of the byte tokenizer
RESCALED = policy_by_name("yarn", target_length=LENGTH)


@pytest.fixture(scope="module")
def result():
    model = tiny_model("llama").model
    outcome = task_accuracy(
        model,
        byte_tokenizer(),
        [vanilla(), lm_infinite(), RESCALED],  # RESCALED differs from vanilla from the first token
        ["niah_single", "vt"],
        lengths=[LENGTH],
        n_samples=3,
        seed=5,
        progress=False,
    )
    return model, outcome


def settled_text(tokenizer, new_ids, task, answers) -> str:
    """The full greedy answer cut after its first token whose text settles the score (by hand)."""
    for end in range(1, new_ids.numel() + 1):
        text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
        if tasks.settled(task, text, answers):
            return text
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def test_every_answer_is_the_greedy_answer_to_its_own_prompt(result):
    model, outcome = result
    tokenizer = byte_tokenizer()
    rows = outcome.to_dataframe()
    assert len(rows) == 2 * 3 * 4  # tasks × samples × (three methods and the baseline)
    for task in ("niah_single", "vt"):
        for sample in tasks.generate(task, tokenizer, LENGTH, 3, 5):
            prompt = torch.tensor(sample.input_ids)
            cases = [
                ("vanilla", vanilla(), prompt),
                ("lm-infinite", lm_infinite(), prompt),
                ("yarn", RESCALED, prompt),  # runs alone while the other two share the haystack
                (TRUNCATED_BASELINE, vanilla(), prompt[-64:]),  # the last L tokens, question included
            ]
            for name, policy, ids in cases:
                with apply_policy(model, policy) as handle, torch.no_grad():
                    cache = new_cache(model, handle)  # bounded for LM-Infinite, dynamic for vanilla
                    new = generate_greedy(model, ids, sample.max_new_tokens, cache=cache)
                expected = settled_text(tokenizer, new, task, sample.answers)
                row = rows[(rows.method == name) & (rows.task == task) & (rows["sample"] == sample.index)]
                assert row["generated"].item() == expected  # shared prefixes change nothing
                assert row["score"].item() == tasks.score(task, expected, sample.answers)
                assert row["prompt_tokens"].item() == ids.numel()


def test_an_answer_stops_where_its_score_settles(monkeypatch):
    # pretend a score settles at three characters: every answer must be its full greedy answer cut there
    model, tokenizer = tiny_model("llama").model, byte_tokenizer()
    monkeypatch.setattr(task_eval, "settled", lambda task, prediction, answers: len(prediction) >= 3)
    outcome = task_accuracy(
        model, tokenizer, [vanilla(), lm_infinite()], ["niah_single"], lengths=[LENGTH], n_samples=2,
        seed=5, progress=False,
    )  # fmt: skip
    rows = outcome.to_dataframe()
    for sample in tasks.generate("niah_single", tokenizer, LENGTH, 2, 5):
        prompt = torch.tensor(sample.input_ids)
        with torch.no_grad():
            full = generate_greedy(model, prompt, sample.max_new_tokens)
        text = tokenizer.decode(full, skip_special_tokens=True)
        assert len(text) > 3  # so that stopping at three characters is early
        cut = next(
            tokenizer.decode(full[:end], skip_special_tokens=True)
            for end in range(1, full.numel() + 1)
            if len(tokenizer.decode(full[:end], skip_special_tokens=True)) >= 3
        )
        row = rows[(rows.method == "vanilla") & (rows["sample"] == sample.index)]
        assert row["generated"].item() == cut


def test_generation_stops_once_until_holds():
    model = tiny_model("llama").model
    prompt = torch.arange(3, 40)
    with torch.no_grad():
        full = generate_greedy(model, prompt, 12)
        early = generate_greedy(model, prompt, 12, until=lambda new_ids: new_ids.numel() >= 4)
    assert full.numel() == 12 and torch.equal(early, full[:4])


def test_accuracies_carry_a_wilson_interval_conservative_for_partial_scores():
    rows = [
        {"method": "m", "task": "niah_single", "length": 10, "score": score} for score in (1.0, 0.0, 1.0, 1.0)
    ] + [{"method": "m", "task": "cwe", "length": 10, "score": score} for score in (0.5, 1.0, 0.0, 0.7)]
    estimates = TaskResult(rows).estimates()
    assert estimates["m", "niah_single", 10] == Estimate.proportion(3, 4)
    partial = estimates["m", "cwe", 10]  # the Wilson interval of 2.2 "successes" in 4
    assert partial.method == "wilson-bound" and partial.value == pytest.approx(0.55)
    assert (partial.low, partial.high) == pytest.approx((0.1764, 0.8746), abs=1e-4)
    summary = TaskResult(rows).summary()
    assert summary["m"]["niah_single"]["10"]["n"] == 4 and summary["m"]["niah_single"]["10"]["value"] == 0.75


def test_the_probe_runs_tasks_and_reports_them(tmp_path):
    out = tmp_path / "out"
    argv = ["--model", "tiny:llama", "--length", "128", "--no-passkey", "--no-generation", "--no-progress"]
    argv += ["--tasks", "niah_single", "--task-lengths", str(LENGTH), "--task-samples", "2"]
    argv += ["--out", str(out)]
    assert probe.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary, str(out))
    block = summary["methods"]["lm-infinite"]
    assert set(block["tasks"]) == {"niah_single"}
    estimate = block["intervals"]["tasks"]["niah_single"][str(LENGTH)]
    assert estimate["n"] == 2 and estimate["value"] == block["tasks"]["niah_single"][str(LENGTH)]
    assert (out / "figures" / "tasks.png").is_file() and (out / "tables" / "task_accuracy.csv").is_file()
    assert "RULER-style tasks" in (out / "report.md").read_text()


def test_a_task_length_too_short_fails_before_the_long_work(tmp_path, capsys):
    argv = ["--model", "tiny:llama", "--length", "128", "--no-passkey", "--no-generation", "--no-progress"]
    code = probe.main([*argv, "--tasks", "vt", "--task-lengths", "100", "--out", str(tmp_path / "out")])
    assert code == 2 and "use length ≥" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

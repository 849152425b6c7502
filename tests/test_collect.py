"""Evidence across runs: every summary follows the shipped JSON Schema, carries intervals and provenance,
and many report folders become one table (``oodlens.collect``, ``python -m oodlens.compare``,
``--resume``)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

import oodlens
from oodlens import compare, plotting, probe
from oodlens.capture import FACTOR_NUMBERS
from oodlens.display import format_number
from oodlens.errors import OodlensError
from oodlens.evaluate import PerplexityResult
from oodlens.models import load_model, model_revision
from oodlens.probe.collect import SCHEMA_PATH, read_summary, summary_schema, validate_summary
from oodlens.stats import describe_difference, perplexity_interval
from oodlens.tiny import byte_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--model", "tiny:llama", "--no-progress", "--windows", "2", "--no-passkey", "--new-tokens", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Three small runs, as a sweep would leave them: two lengths, one with passkey."""
    root = tmp_path_factory.mktemp("runs")
    assert probe.main([*RUN, "--length", "128", "--out", str(root / "len128")]) == 0
    assert probe.main([*RUN, "--length", "192", "--out", str(root / "len192")]) == 0
    passkey = [*RUN[:-3], "--length", "400", "--passkey", "--passkey-depths", "0.2,0.8", "--no-generation"]
    assert probe.main([*passkey, "--out", str(root / "passkey400")]) == 0
    return root


def test_the_schema_is_shipped_and_every_summary_follows_it(runs):
    schema = summary_schema()
    assert SCHEMA_PATH.parent.name == "probe" and schema["properties"]["schema_version"]["const"] == 2
    for folder in runs.iterdir():
        summary = json.loads((folder / "summary.json").read_text())
        validate_summary(summary, str(folder))
        assert summary["provenance"]["model_revision"] == "random:seed0"
        assert re.match(r"\d{4}-\d\d-\d\dT", summary["provenance"]["date"])


def test_a_summary_that_breaks_the_schema_is_named_with_the_key(runs):
    summary = json.loads((runs / "len128" / "summary.json").read_text())
    summary["methods"]["vanilla"]["intervals"]["ppl_beyond_train_length"]["n"] = -1
    with pytest.raises(OodlensError, match="methods/vanilla/intervals/ppl_beyond_train_length/n"):
        validate_summary(summary, "here")
    del summary["provenance"]
    with pytest.raises(OodlensError, match="'provenance' is a required property"):
        validate_summary(summary, "here")


def test_intervals_sit_beside_the_numbers_and_equal_a_bootstrap_over_windows(runs):
    summary = read_summary(runs / "len192")
    vanilla = summary["methods"]["vanilla"]
    beyond = vanilla["intervals"]["ppl_beyond_train_length"]
    assert beyond["n"] == 2 and beyond["method"] == "bootstrap-windows"
    assert beyond["low"] <= vanilla["ppl_beyond_train_length"] <= beyond["high"]
    assert beyond["value"] == pytest.approx(vanilla["ppl_beyond_train_length"], rel=1e-5)
    generation = vanilla["intervals"]["generation"]["184"]["rouge_l"]
    assert generation["n"] == 2 and generation["method"] == "bootstrap"
    passkey = read_summary(runs / "passkey400")["methods"]["lm-infinite"]["intervals"]["passkey"]["400"]
    assert passkey["n"] == 2 and passkey["method"] == "wilson" and 0 <= passkey["low"] <= passkey["high"] <= 1


def test_perplexity_intervals_resample_whole_windows():
    rng = np.random.default_rng(0)
    windows = rng.uniform(1.0, 3.0, (5, 40)).astype(np.float32)
    result = PerplexityResult({"m": windows}, 16, 40, 5, 8)
    assert np.allclose(result.token_nll["m"], windows.mean(axis=0))
    estimate = result.estimate("m", 16, 40)
    ppl, low, high, n = perplexity_interval(windows[:, 16:40].astype(np.float64).mean(axis=1))
    assert (estimate.value, estimate.low, estimate.high, estimate.n) == pytest.approx((ppl, low, high, n))
    assert estimate.value == pytest.approx(math.exp(windows[:, 16:].astype(np.float64).mean()), rel=1e-6)
    frame = result.to_dataframe()
    assert (frame["ppl_low"] <= frame["ppl"]).all() and (frame["ppl"] <= frame["ppl_high"]).all()
    averaged = PerplexityResult({"m": windows.mean(axis=0)}, 16, 40, 5, 8)  # only the average: no interval
    assert math.isnan(averaged.estimate("m", 16, 40).low)
    with pytest.raises(OodlensError, match="3 rows of window NLL for 5 windows"):
        PerplexityResult({"m": windows[:3]}, 16, 40, 5, 8)


def test_a_ratio_of_perplexities_pairs_the_windows():
    rng = np.random.default_rng(1)
    reference = rng.uniform(1.0, 3.0, (5, 40)) + rng.uniform(0.0, 2.0, (5, 1))  # windows differ a lot
    method = reference + 0.01  # and the method is 0.01 nats worse on every token of every window

    def result(m: np.ndarray, r: np.ndarray) -> PerplexityResult:
        return PerplexityResult({"m": m.astype(np.float32), "r": r.astype(np.float32)}, 16, 40, 5, 8)

    ratio = result(method, reference).ratio("m", "r", 16, 40)
    assert ratio.value == pytest.approx(result(method, reference).ppl("m", 16, 40) / result(
        method, reference).ppl("r", 16, 40))  # fmt: skip
    assert (ratio.low, ratio.high, ratio.n) == pytest.approx((math.exp(0.01), math.exp(0.01), 5), rel=1e-5)
    # unpaired, the windows' spread hides the difference that pairing shows
    unpaired = [result(method, reference).estimate(name, 16, 40) for name in ("m", "r")]
    assert describe_difference(*unpaired) == "indistinguishable"
    shifted = method + rng.normal(0.0, 0.05, (5, 1))  # a per-window difference: resampled as one per window
    by_hand = perplexity_interval(shifted[:, 16:40].mean(axis=1) - reference[:, 16:40].mean(axis=1))
    estimate = result(shifted, reference).ratio("m", "r", 16, 40)
    assert (estimate.low, estimate.high) == pytest.approx(by_hand[1:3], rel=1e-5)
    averaged = PerplexityResult({"m": method.mean(axis=0), "r": reference.mean(axis=0)}, 16, 40, 5, 8)
    assert math.isnan(averaged.ratio("m", "r", 16, 40).low)  # only the averages: no interval


def test_collect_gives_one_tidy_table(runs):
    table = oodlens.collect(str(runs / "*"))
    assert list(table.columns) == [
        "run", "model", "length", "train_length", "method", "metric", "value", "low", "high", "n"
    ]
    assert sorted(table["length"].unique()) == [128, 192, 400]
    beyond = table[(table.metric == "ppl_beyond_train_length") & (table.length == 192)].set_index("method")
    summary = read_summary(runs / "len192")["methods"]
    for method in ("vanilla", "lm-infinite", "vanilla-truncated"):
        assert beyond.loc[method, "value"] == pytest.approx(summary[method]["ppl_beyond_train_length"])
        assert beyond.loc[method, "n"] == 2 and beyond.loc[method, "low"] <= beyond.loc[method, "high"]
    passkey = table[table.metric == "passkey@400"]
    assert set(passkey["method"]) == {"vanilla", "lm-infinite", "vanilla-truncated"}
    assert set(passkey["n"]) == {2}
    assert {"max_logit_beyond", "rouge_l@120", "bleu@120"} <= set(table["metric"])


def test_the_factors_carry_the_windows_of_their_capture_everywhere(runs, tmp_path):
    # the diagnosis is one capture pooled over both windows: n = 2 and no interval, in the summary, in the
    # report's comparison table and in a collected table alike
    folder = runs / "len192"
    summary = read_summary(folder)
    vanilla = summary["methods"]["vanilla"]
    factors = vanilla["intervals"]["diagnosis"]
    assert set(factors) == set(FACTOR_NUMBERS) and "diagnosis" not in summary["methods"]["vanilla-truncated"]
    for key, estimate in factors.items():
        assert estimate["value"] == pytest.approx(vanilla["diagnosis"][key])
        assert (estimate["n"], estimate["low"], estimate["high"]) == (2, None, None)
        assert estimate["method"] == "pooled-windows"
    comparison = pd.read_csv(folder / "tables" / "comparison.csv")
    row = comparison[(comparison.method == "vanilla") & (comparison.metric == "max logit beyond")].iloc[0]
    assert row["value"] == pytest.approx(vanilla["diagnosis"]["max_logit_beyond"]) and row["n"] == 2
    table = oodlens.collect(folder).set_index(["method", "metric"])
    assert table.loc[("lm-infinite", "entropy_beyond"), "n"] == 2
    # a summary written before the factors carried their n collects to the same rows
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    for block in summary["methods"].values():
        block["intervals"].pop("diagnosis", None)
    (older / "summary.json").write_text(json.dumps(summary))
    assert_frame_equal(
        oodlens.collect(older).drop(columns="run"), oodlens.collect(folder).drop(columns="run")
    )


def test_a_damaged_or_unfinished_folder_is_named_and_nothing_is_lost(runs, tmp_path):
    damaged, unfinished = tmp_path / "damaged", tmp_path / ".len128.partial-999"
    shutil.copytree(runs / "len128", damaged)
    (damaged / "summary.json").write_text('{"schema_version": 2, "model": ')
    shutil.copytree(runs / "len128", unfinished)
    (unfinished / ".oodlens-folder.json").unlink()
    with pytest.raises(OodlensError, match=f"{damaged}: summary.json is damaged"):
        oodlens.collect([runs / "len128", damaged])
    with pytest.raises(OodlensError, match="not a finished oodlens report"):
        oodlens.collect([unfinished])
    with pytest.raises(OodlensError, match="no report folder matches"):
        oodlens.collect(str(tmp_path / "nothing-*"))
    out = tmp_path / "comparison"
    assert compare.main([str(runs / "len128"), str(damaged), "--out", str(out)]) == 2
    assert not out.exists()
    assert read_summary(runs / "len128")["length"] == 128  # the good run is untouched


def test_compare_writes_one_report_from_many_runs(runs, tmp_path):
    out = tmp_path / "comparison"
    assert compare.main([str(runs / "len*"), "--out", str(out)]) == 0
    markdown = (out / "comparison.md").read_text()
    assert "## ppl_beyond_train_length" in markdown and "n=2" in markdown
    assert re.search(r"\| lm-infinite \| [\d.]+ \[[\d.]+, [\d.]+\], n=2 \|", markdown)
    table = (out / "table.csv").read_text().splitlines()
    assert table[0] == "run,model,length,train_length,method,metric,value,low,high,n"
    assert (out / "figures" / "ppl_beyond_train_length.png").is_file()
    # an earlier comparison is replaced only with --overwrite
    assert compare.main([str(runs / "len*"), "--out", str(out)]) == 2
    assert compare.main([str(runs / "len*"), "--out", str(out), "--overwrite"]) == 0


def test_compare_keeps_two_runs_of_one_model_and_length_apart(runs, tmp_path):
    other = tmp_path / "seed1"  # a second run at 128 tokens, with its own number
    shutil.copytree(runs / "len128", other)
    summary = json.loads((other / "summary.json").read_text())
    summary["methods"]["vanilla"]["intervals"]["ppl_beyond_train_length"].update(value=111, low=100, high=122)
    (other / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "comparison"
    assert compare.main([str(runs / "len128"), str(other), "--out", str(out)]) == 0
    section = (out / "comparison.md").read_text().split("## ppl_beyond_train_length")[1].split("\n## ")[0]
    assert "| method | tiny:llama @128 (len128) | tiny:llama @128 (seed1) |" in section
    first = read_summary(runs / "len128")["methods"]["vanilla"]["intervals"]["ppl_beyond_train_length"]
    (vanilla,) = [line for line in section.splitlines() if line.startswith("| vanilla |")]
    cells = vanilla.split(" | ")
    assert cells[1].startswith(format_number(first["value"])) and cells[2] == "111 [100, 122], n=2 |"
    # nor do the figures average two runs' bars: repeated rows with intervals are refused
    rows = oodlens.collect([runs / "len128", other]).query("metric == 'ppl_beyond_train_length'")
    with pytest.raises(OodlensError, match="intervals cannot be averaged"):
        plotting.plot_method_comparison(rows[["method", "metric", "value", "low", "high"]])


def test_resume_compares_the_resolved_length(runs, tmp_path, capsys):
    folder = tmp_path / "run"  # RUN gives no --length: it resolves to 2 × tiny:llama's 64 = 128 tokens
    shutil.copytree(runs / "len192", folder)
    assert probe.main([*RUN, "--out", str(folder), "--resume"]) == 2
    assert "other settings (length, bucket," in capsys.readouterr().err
    shutil.rmtree(folder)
    shutil.copytree(runs / "len128", folder)
    assert probe.main([*RUN, "--out", str(folder), "--resume"]) == 0
    assert "already holds this run's finished report" in capsys.readouterr().out


def test_resume_skips_a_finished_run_and_redoes_a_damaged_one(runs, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(runs / "len128", folder)
    before = (folder / "summary.json").stat().st_mtime_ns
    assert probe.main([*RUN, "--length", "128", "--out", str(folder), "--resume"]) == 0
    assert "already holds this run's finished report" in capsys.readouterr().out
    assert (folder / "summary.json").stat().st_mtime_ns == before
    assert probe.main([*RUN, "--length", "192", "--out", str(folder), "--resume"]) == 2
    assert "other settings (length differ)" in capsys.readouterr().err
    (folder / "summary.json").write_text("{")
    assert probe.main([*RUN, "--length", "128", "--out", str(folder), "--resume"]) == 0
    assert read_summary(folder)["length"] == 128


def test_the_schema_page_describes_every_key_of_the_schema():
    page = (ROOT / "docs" / "report-schema.md").read_text()
    schema = json.loads(SCHEMA_PATH.read_text())
    keys = set(schema["properties"])
    keys |= set(schema["$defs"]["method"]["oneOf"][1]["properties"])
    keys |= set(schema["$defs"]["estimate"]["properties"])
    keys |= set(schema["properties"]["provenance"]["properties"])
    missing = sorted(key for key in keys if f"`{key}`" not in page)
    assert missing == []
    assert f"schema_version {schema['properties']['schema_version']['const']}" in page


def test_a_model_revision_says_which_weights(tmp_path):
    assert model_revision("tiny:llama", tiny_model("llama").model) == "random:seed0"
    folder = tmp_path / "model"
    tiny = tiny_model("llama")
    tiny.model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    loaded = load_model(str(folder))
    first = model_revision(str(folder), loaded.model)
    assert first.startswith("fingerprint:") and model_revision(str(folder), loaded.model) == first
    (folder / ".cache-note").write_text("not part of the model")
    assert model_revision(str(folder), loaded.model) == first
    with torch.no_grad():
        tiny.model.lm_head.weight.add_(1.0)
    tiny.model.save_pretrained(folder)
    assert model_revision(str(folder), loaded.model) != first


def test_a_hub_model_revision_is_its_commit():
    # a hub name is no local path: the revision is the commit transformers recorded on the config, if any
    model = tiny_model("llama").model
    assert model_revision("some-org/some-model", model) == "hub:unknown"
    model.config._commit_hash = "0123abcd" * 5
    assert model_revision("some-org/some-model", model) == "hub:" + "0123abcd" * 5


def test_the_committed_example_summaries_follow_the_schema():
    examples = sorted((ROOT / "docs" / "probe").glob("*-summary.json"))
    assert examples
    for path in examples:
        validate_summary(json.loads(path.read_text()), str(path))

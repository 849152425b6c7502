"""The probe command end to end on tiny models, its output folder, and its errors."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pandas as pd
import pytest

import oodlens
from oodlens import errors as probe_errors
from oodlens import probe
from oodlens.evaluate import budget
from oodlens.probe import report
from oodlens.probe.collect import read_summary, validate_summary
from oodlens.probe.result import _held
from oodlens.stats import Estimate, describe_ratio

TINY_RUN = ["--length", "400", "--new-tokens", "8", "--no-progress", "--bucket", "64"]


def run_cli(tmp_path, *extra, name="out"):
    out = tmp_path / name
    code = probe.main(["--model", "tiny:llama", "--out", str(out), *TINY_RUN, *extra])
    return code, out


@pytest.fixture(scope="module")
def probe_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    code, out = run_cli(tmp, "--stream-tokens", "300")
    assert code == 0
    return out


def test_summary_schema(probe_folder):
    summary = json.loads((probe_folder / "summary.json").read_text())
    validate_summary(summary, str(probe_folder))  # every summary a probe writes follows the schema
    for key in ("model", "train_length", "length", "corpus", "versions", "methods", "verdict"):
        assert key in summary
    assert summary["train_length"] == 64 and summary["length"] == 400
    assert set(summary["methods"]) == {"vanilla", "lm-infinite", "vanilla-truncated"}
    for name in ("vanilla", "lm-infinite"):
        block = summary["methods"][name]
        buckets = block["perplexity_by_position"]
        assert buckets[0]["start"] == 0 and buckets[-1]["end"] == 400
        assert all(set(b) == {"start", "end", "ppl", "ppl_low", "ppl_high"} for b in buckets)
        for key in ("max_logit_within", "max_logit_beyond", "entropy_within", "entropy_beyond"):
            assert isinstance(block["diagnosis"][key], float)
        assert set(block["passkey"]) == {"400"}
    stream = summary["streaming"]
    assert stream["n_tokens"] == 300
    interval = stream["intervals"]["ppl"]
    assert interval["n"] == len(stream["buckets"]) and interval["method"] == "bootstrap-buckets"
    assert interval["n"] == 1 and interval["low"] is None  # 300 tokens fill one bucket: no interval
    row = oodlens.collect(probe_folder).query("metric == 'stream_ppl@300'").iloc[0]
    assert (row["method"], row["n"]) == (stream["method"], interval["n"])
    assert row["value"] == pytest.approx(stream["ppl"])


def test_figures_are_real_images(probe_folder):
    pngs = sorted((probe_folder / "figures").glob("*.png"))
    expected = {
        "logits_by_distance",
        "entropy_by_position",
        "hidden_pca",
        "perplexity_by_position",
        "passkey",
        "generation_quality",
        "method_comparison",
        "sink_mass",
        "streaming_perplexity",
    }
    assert expected <= {p.stem for p in pngs}
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas
        assert png.with_suffix(".pdf").stat().st_size > 1000


def test_report_mentions_every_method_and_figure(probe_folder):
    text = (probe_folder / "report.md").read_text()
    for method in ("vanilla", "lm-infinite", "vanilla-truncated"):
        assert method in text
    for png in (probe_folder / "figures").glob("*.png"):
        assert f"figures/{png.name}" in text


def test_saved_diagnosis_loads(probe_folder):
    from oodlens.capture import Diagnosis

    diagnosis = Diagnosis.load(probe_folder / "diagnosis" / "lm-infinite")
    assert not diagnosis.logits_by_distance().empty


def test_an_earlier_report_needs_overwrite_and_other_folders_are_never_replaced(tmp_path, capsys):
    code, out = run_cli(tmp_path, "--no-passkey", "--no-generation")
    assert code == 0
    code, out = run_cli(tmp_path, "--no-passkey", "--no-generation")
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert run_cli(tmp_path, "--no-passkey", "--no-generation", "--overwrite")[0] == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        code, _ = run_cli(tmp_path, "--no-passkey", "--no-generation", *extra, name="notes")
        assert code == 2 and "was not written by oodlens" in capsys.readouterr().err
        assert (notes / "keep.txt").read_text() == "precious"


def test_interrupted_report_leaves_nothing_half_written(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report.plotting, "plot_hidden_pca", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_cli(tmp_path, "--no-passkey", "--no-generation")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging copy


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "vanilla,streaming"], "unknown method"),
        (["--length", "0"], "--length must be an integer ≥ 2"),
        (["--length", "999999999"], "tokens in its longest"),
        (["--device", "cuda"], "CUDA"),
        (["--passkey-depths", "1.5"], "depths"),
        (["--milestones", "399"], "milestone"),
    ],
)
def test_bad_input_is_a_clear_one_line_error(tmp_path, capsys, extra, message):
    code, out = run_cli(tmp_path, "--no-passkey", *extra)
    err = capsys.readouterr().err
    assert code == 2
    *progress, last = err.rstrip("\n").split("\n")  # progress messages (INFO) may come before the error
    assert message in last and last.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


def test_learned_positions_skip_the_fix_but_diagnose(tmp_path):
    out = tmp_path / "gpt2"
    code = probe.main(
        [
            "--model",
            "tiny:gpt2",
            "--out",
            str(out),
            "--length",
            "64",
            "--train-length",
            "32",
            "--no-passkey",
            "--no-generation",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary, str(out))  # every summary a probe writes follows the schema
    assert "rotary" in summary["methods"]["lm-infinite"]["skipped"]
    assert "diagnosis" in summary["methods"]["vanilla"]


def test_length_within_training_warns(tmp_path):
    with pytest.warns(UserWarning, match="nothing is out of distribution"):
        code, out = run_cli(tmp_path, "--length", "60", "--no-passkey", "--no-generation")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary, str(out))  # every summary a probe writes follows the schema
    assert "nothing is out of distribution" in summary["warnings"][0]


def test_memory_estimate_refuses_impossible_requests(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda device: 2**20)
    code, _ = run_cli(tmp_path, "--no-passkey")
    err = capsys.readouterr().err
    assert code == 2 and "try --length" in err


@pytest.mark.slow
def test_smollm2_short_probe(tmp_path, smollm2):
    config = probe.ProbeConfig(
        length=1024, train_length=512, passkey_lengths=(1024,), new_tokens=16, progress=False
    )
    result = probe.run_probe(config, loaded=smollm2)
    folder = report.write_report(result, tmp_path / "smollm2")
    summary = json.loads((folder / "summary.json").read_text())
    validate_summary(summary, str(folder))  # every summary a probe writes follows the schema
    within = summary["methods"]["vanilla"]["ppl_within_train_length"]
    assert 1.0 < within < 30.0  # real English prose under a real model
    assert summary["methods"]["lm-infinite"]["ppl_beyond_train_length"] is not None


def test_every_config_field_is_an_option_with_its_help():
    from dataclasses import fields

    parser = probe.build_parser()
    options = {action.dest: action for action in parser._actions}
    for spec in fields(probe.ProbeConfig):
        action = options[spec.name]
        assert action.help.startswith(spec.metadata["help"])
        assert action.help.count("(default") <= 1 and "(default: None)" not in action.help
    assert probe.build_parser().parse_args([]).length is None


def test_config_file_runs_the_same_probe_and_options_win(tmp_path):
    from oodlens.probe.cli import parse_args

    settings = {"model": "tiny:llama", "length": 400, "methods": ["vanilla", "window"], "passkey": False}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    (tmp_path / "run.yaml").write_text(
        "model: tiny:llama\nlength: 400\nmethods: [vanilla, window]\npasskey: false\n"
    )
    flags = ["--model", "tiny:llama", "--length", "400", "--methods", "vanilla,window", "--no-passkey"]
    expected, _ = parse_args(flags)
    for name in ("run.json", "run.yaml"):
        from_file, _ = parse_args(["--config", str(tmp_path / name)])
        assert from_file == expected
    overridden, _ = parse_args(["--config", str(tmp_path / "run.json"), "--length", "300"])
    assert overridden.length == 300 and overridden.methods == ("vanilla", "window")


@pytest.mark.parametrize(
    "content, message",
    [('{"lenght": 400}', "unknown option 'lenght'"), ("[1, 2]", "mapping"), ("{", "not valid")],
)
def test_bad_config_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "run.json").write_text(content)
    code = probe.main(["--config", str(tmp_path / "run.json"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    *progress, last = err.rstrip("\n").split("\n")
    assert code == 2 and message in last and last.startswith("error: ")


def test_options_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from oodlens.probe import run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, _ = run_cli(tmp_path, "--methods", "vanilla,streaming")
    assert code == 2 and "unknown method 'streaming'" in capsys.readouterr().err


def test_model_args_reach_from_pretrained(tmp_path, capsys, monkeypatch):
    from oodlens.probe import run

    seen = {}

    def fake_load(name, **options):
        seen.update(options)
        raise probe_errors.OodlensError("stop here")

    monkeypatch.setattr(run, "load_model", fake_load)
    code = probe.main(
        [
            "--model",
            "org/model",
            "--model-args",
            "device_map=auto,revision=v2,trust_remote_code=true",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert (
        code == 2
        and seen["device_map"] == "auto"
        and seen["revision"] == "v2"
        and seen["trust_remote_code"] is True
    )
    code = probe.main(["--model-args", "device_map", "--out", str(tmp_path / "out")])
    assert code == 2 and "key=value pairs" in capsys.readouterr().err


def _paired(value: float, low: float, high: float, n: int) -> Estimate:
    return Estimate(value, low, high, n, "paired-bootstrap-windows")


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (_paired(1.01, 0.99, 1.03, 4), "the fix held (indistinguishable from the baseline over 4 windows)"),
        (_paired(1.075, 1.05, 1.10, 4), "within 10 % of it, but measurably higher (the paired interval"),
        (_paired(0.95, 0.93, 0.97, 4), "the fix held, below the baseline (the paired interval excludes 1)"),
        (_paired(1.01, math.nan, math.nan, 1), "the fix held in this one window (no interval"),
        (_paired(1.125, 1.06, 1.19, 4), "the fix did not fully hold (the paired interval excludes 1)"),
        (_paired(1.125, 0.98, 1.27, 4), "higher, but within the uncertainty of 4 windows"),
        (_paired(1.125, math.nan, math.nan, 1), "the fix did not fully hold in this one window"),
        (_paired(math.nan, math.nan, math.nan, 4), "no ratio to tell"),
    ],
)
def test_the_fix_is_called_held_only_as_strongly_as_the_interval_allows(ratio, expected):
    # 1.075 is within the 10 % goal, yet its paired interval lies wholly above 1
    assert _held(ratio.value, describe_ratio(ratio), ratio.n).startswith(expected)


def test_comparison_table_carries_each_numbers_interval(probe_folder):
    table = pd.read_csv(probe_folder / "tables" / "comparison.csv")
    methods = read_summary(probe_folder)["methods"]
    intervals = {method: block["intervals"] for method, block in methods.items() if "intervals" in block}
    passkey = table[table.metric.str.startswith("passkey")]
    assert len(passkey) == sum(len(block.get("passkey", {})) for block in intervals.values()) > 0
    for row in passkey.itertuples():
        estimate = intervals[row.method]["passkey"][row.metric.rsplit(" ", 1)[1]]
        assert (row.value, row.low, row.high, row.n) == pytest.approx(
            (estimate["value"], estimate["low"], estimate["high"], estimate["n"])
        )
        assert row.low <= row.value <= row.high
    beyond = table[table.metric == "ppl beyond train length"].set_index("method")
    for method, block in intervals.items():  # the headline number, with its interval's ends and n beside it
        assert beyond.loc[method, "value"] == pytest.approx(methods[method]["ppl_beyond_train_length"])
        estimate = block["ppl_beyond_train_length"]
        ends = [math.nan if end is None else end for end in (estimate["low"], estimate["high"])]
        assert [beyond.loc[method, "low"], beyond.loc[method, "high"]] == pytest.approx(ends, nan_ok=True)
        assert beyond.loc[method, "n"] == estimate["n"]

"""What oodlens guarantees (docs/guarantees.md): nothing of the user's is lost, bad numbers are caught, and
bad input is refused in one line before the work. Each test reproduces a way this once went wrong."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

import oodlens
from oodlens import probe
from oodlens.capture import Diagnosis, diagnose
from oodlens.data import load_corpus
from oodlens.errors import OodlensError
from oodlens.models import load_model
from oodlens.policies import apply_policy, distance_limit, lm_infinite, window
from oodlens.probe import run
from oodlens.probe.collect import validate_summary
from oodlens.probe.report import prepare_output
from oodlens.tiny import byte_tokenizer, tiny_model

TINY = ["--model", "tiny:llama", "--length", "128", "--no-passkey", "--no-generation", "--no-progress"]


def main(*argv: str) -> int:
    return probe.main([*TINY, *argv])


def one_line_error(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err
    *progress, last = err.rstrip("\n").split("\n")  # progress messages (INFO) may come before the error
    assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err, err


@pytest.fixture
def never_loads(monkeypatch):
    """Fail the test if the probe loads its model: these mistakes must be refused before that."""
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


# ------------------------------------------------------------------------------------------- data loss


@pytest.mark.parametrize("out", ["", ".", "notes", "model"])
def test_overwrite_never_replaces_a_folder_oodlens_did_not_write(tmp_path, monkeypatch, capsys, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    tiny_model("llama").model.save_pretrained(tmp_path / "model")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()  # what saving the model printed
    one_line_error(capsys, main("--out", out, "--overwrite"), "oodlens will not replace it")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_second_run_on_the_same_output_fails_while_the_first_holds_it(tmp_path, capsys, never_loads):
    out = tmp_path / "out"
    with prepare_output(out, overwrite=False):  # the first run, still computing
        one_line_error(capsys, main("--out", str(out)), f"another process (pid {os.getpid()})")


def test_saving_a_diagnosis_onto_a_file_keeps_the_file(tmp_path):
    model = tiny_model("llama").model
    diagnosis = diagnose(model, torch.randint(3, 200, (1, 80)), progress=False)
    target = tmp_path / "results.txt"
    target.write_text("precious")
    with pytest.raises(OodlensError, match="is a file"):
        diagnosis.save(target)
    assert target.read_text() == "precious"


@pytest.mark.parametrize("out", ["/proc/oodlens-out", "under-a-file/out"])
def test_a_bad_output_location_fails_before_any_work(tmp_path, monkeypatch, capsys, never_loads, out):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "under-a-file").write_text("a file, not a folder")
    code = main("--out", out)
    assert code == 2 and capsys.readouterr().err.rstrip("\n").split("\n")[-1].startswith("error: ")


# ------------------------------------------------------------------------------------ silent wrong results


def test_an_overflowing_float16_run_is_reported_not_crashed(tmp_path, monkeypatch, recwarn):
    loaded = load_model("tiny:llama", dtype="float16")
    with torch.no_grad():  # the last layer's MLP gives activations beyond float16's range (65,504)
        mlp = loaded.model.model.layers[-1].mlp
        mlp.gate_proj.weight.fill_(1.0), mlp.up_proj.weight.fill_(1.0), mlp.down_proj.weight.fill_(100.0)
    out = tmp_path / "out"
    config = probe.ProbeConfig(length=128, passkey=False, generation=False, progress=False)
    result = run.run_probe(config, loaded=loaded)
    probe.write_report(result, out)
    summary = json.loads((out / "summary.json").read_text())
    validate_summary(summary, str(out))  # every summary a probe writes follows the schema
    assert any(
        "non-finite values" in note and "float16" in note and "float32" in note
        for note in summary["warnings"]
    )
    assert summary["methods"]["vanilla"]["ppl_beyond_train_length"] is None  # marked, not a number
    assert "n/a" in (out / "report.md").read_text() or "–" in (out / "report.md").read_text()


def test_a_second_policy_is_refused_and_either_order_restores_the_model():
    model = tiny_model("llama").model
    implementation = model.config._attn_implementation
    ids = torch.randint(3, 200, (1, 40))
    with torch.no_grad():
        plain = model(ids).logits
    for first, second in ((lm_infinite(), window(20)), (window(20), lm_infinite())):
        handle = apply_policy(model, first)
        with pytest.raises(OodlensError, match="already runs under an oodlens policy"):
            apply_policy(model, second)
        handle.remove()
        handle.remove()  # idempotent
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain)


def test_a_binary_corpus_is_refused_and_stray_bytes_are_counted(tmp_path):
    binary = tmp_path / "program"
    binary.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(OodlensError, match="is not text"):
        load_corpus(str(binary))
    mostly = tmp_path / "notes.txt"
    mostly.write_bytes(b"plain English text. " * 200 + b"\xff\xfe")
    with pytest.warns(UserWarning, match=r"2 characters \(0.05%\) were replaced"):
        corpus = load_corpus(str(mostly))
    assert corpus.documents[0].startswith("plain English text.")


def test_a_model_folder_without_its_length_asks_for_it(tmp_path):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("max_position_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(
        OodlensError, match="states no max_position_embeddings.*default, 2048.*--train-length"
    ):
        load_model(str(tmp_path))
    assert load_model(str(tmp_path), train_length=512).info.train_length_source == "user"


def test_policy_lengths_that_would_be_out_of_distribution_are_refused():
    with pytest.raises(OodlensError, match=r"distance_limit 100 exceeds the pretraining length \(64\)"):
        lm_infinite(distance_limit=100).resolve(64)
    with pytest.raises(OodlensError, match="distance_limit 40 exceeds the window 20"):
        lm_infinite(n_local=20, distance_limit=40).resolve(64)
    with pytest.raises(OodlensError, match="n_global must be an integer ≥ 0, got 2.5"):
        lm_infinite(n_global=2.5).resolve(64)
    with pytest.raises(OodlensError, match="n_local/window must be an integer ≥ 1, got 10.5"):
        window(10.5).resolve(64)
    assert distance_limit(30).resolve(64).distance_limit == 30


# --------------------------------------------------------------------- refused early, in one line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--query-stride", "0"], "--query-stride must be an integer ≥ 1"),
        (["--methods", "vanilla,vanilla"], "names 'vanilla' twice"),
        (["--passkey", "--passkey-depths", ""], "--passkey-depths is empty"),
        (["--stream-tokens", "1"], "--stream-tokens (0 turns streaming off) must be an integer ≥ 2"),
        (["--length", "1"], "--length must be an integer ≥ 2"),
        (["--seed", "-1"], "--seed must be an integer ≥ 0"),
        (["--methods", "lm-infinte"], "unknown method 'lm-infinte'"),
        (["--tasks", "niah_singel"], "unknown task 'niah_singel'"),
        (["--tasks", "vt,vt"], "names a task twice"),
    ],
)
def test_refused_before_the_model_loads(capsys, never_loads, tmp_path, argv, message):
    one_line_error(capsys, main("--out", str(tmp_path / "out"), *argv), message)


def test_lengths_that_cannot_run_are_refused_before_the_work(capsys, tmp_path):
    out = str(tmp_path / "out")
    one_line_error(
        capsys, main("--out", out, "--passkey", "--passkey-lengths", "100"), "too short for the passkey"
    )
    one_line_error(
        capsys, main("--out", out, "--passkey", "--passkey-lengths", "50000000"), "try --passkey-lengths"
    )
    assert not (tmp_path / "out").exists()


def test_damaged_model_files_are_one_line_errors(tmp_path, capsys):
    tiny = tmp_path / "gguf"
    tiny.mkdir()
    (tiny / "small.gguf").write_bytes(b"GGUF" + bytes(96))
    truncated = tmp_path / "truncated"
    tiny_model("llama").model.save_pretrained(truncated)
    byte_tokenizer().save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(
        json.dumps({"model_type": "not-a-family", "max_position_embeddings": 64})
    )
    bloom = tmp_path / "bloom"
    AutoModelForCausalLM.from_config(
        BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=300)
    ).save_pretrained(bloom)
    byte_tokenizer().save_pretrained(bloom)
    cases = [
        ([str(tiny / "small.gguf")], "may be truncated or not a GGUF"),
        ([str(truncated)], "cannot load model folder"),
        ([str(unknown)], "does not know model_type 'not-a-family'"),
        ([str(bloom), "--train-length", "32", "--length", "64"], "attention"),
    ]
    for model, message in cases:
        code = probe.main(
            ["--model", *model, "--out", str(tmp_path / "out"), "--no-passkey", "--no-generation"]
        )
        one_line_error(capsys, code, message)


def test_damaged_diagnosis_folders_are_one_line_errors(tmp_path):
    model = tiny_model("llama").model
    saved = diagnose(model, torch.randint(3, 200, (1, 80)), progress=False).save(tmp_path / "d")
    assert Diagnosis.load(saved).summary()["entropy_within"] > 0
    damage = {
        "diagnosis.json": lambda path: path.write_text("{not json"),
        "entropy_by_position.parquet": lambda path: path.write_bytes(path.read_bytes()[:50]),
        "hidden_samples.npz": lambda path: path.write_bytes(b"PK\x03\x04 damaged"),
    }
    for name, hurt in damage.items():
        copy = tmp_path / f"copy-{name}"
        diagnose(model, torch.randint(3, 200, (1, 80)), progress=False).save(copy)
        hurt(copy / name)
        with pytest.raises(OodlensError, match=f"damaged diagnosis: {name.replace('.', '[.]')}"):
            Diagnosis.load(copy)


def test_empty_input_is_refused():
    with pytest.raises(OodlensError, match="at least 2 real tokens"):
        oodlens.diagnose(tiny_model("llama").model, torch.zeros(1, 0, dtype=torch.long))

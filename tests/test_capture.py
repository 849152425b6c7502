"""The capture against independent dense references, on tiny models of every family; plus restoration,
output invariance, save/load, and one slow check of the OOD factors on the real SmolLM2."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from oodlens import attention
from oodlens.capture import (
    TABLE_KINDS,
    CaptureConfig,
    Diagnosis,
    capture,
    decoder_layers,
    diagnose,
    position_probe,
    resolve_geometry,
)
from oodlens.capture.stats import BinnedMoments
from oodlens.errors import OodlensError
from oodlens.policies import attention_modules, lm_infinite, vanilla
from oodlens.tiny import TINY_FAMILIES, tiny_model

from .reference import DenseReference

LENGTH = 96
TRAIN = 64
TOL = 1e-5
SINKS = 4
LM_INFINITE = dict(n_global=3, n_local=20, distance_limit=16)
RECORDER_NAME = "oodlens_test_recorder"

CASES = [(family, "vanilla") for family in TINY_FAMILIES] + [
    (family, "lm-infinite")
    for family in TINY_FAMILIES
    if family != "gpt2"  # learned positions: no RoPE
]


def _model(family: str):
    # GPT-J (RoPE) and GPT-2 (learned positions) look positions up in tables of max_position_embeddings
    # rows; make them longer than the test length (the capture still uses train_length=64).
    overrides = {"max_position_embeddings": 256} if family in ("gptj", "gpt2") else {}
    return tiny_model(family, **overrides).model


def _ids(model, batch=1, length=LENGTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)


# --------------------------------------------------------------------------------------------------------
# The independent reference: attention weights from eager attention (vanilla) or the dense LM-Infinite
# reference, plus each query's own logit, which pins the weights' log down to absolute logits.
# --------------------------------------------------------------------------------------------------------


class DiagonalRecorder:
    """Registers an attention function that calls ``inner`` and records, per layer, each query's logit on
    its own key (``cap(q_i · k_i · scale)``, ``[B, H, Q]``), computed here by hand.

    With the weights ``w`` that ``inner`` returns, ``logit_ij = log w_ij - log w_ii + logit_ii``.
    """

    def __init__(self, model, inner, mask_function):
        self.model, self.inner, self.mask_function = model, inner, mask_function
        self.diagonal: dict[int, torch.Tensor] = {}
        self.previous = model.config._attn_implementation

    def attend(self, module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
        diagonal = (query.float() * keys.float()).sum(-1) * scale
        if softcap is not None:
            diagonal = torch.tanh(diagonal / softcap) * softcap
        self.diagonal[module.layer_idx] = diagonal
        return self.inner(
            module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs
        )

    def __enter__(self):
        AttentionInterface.register(RECORDER_NAME, self.attend)
        AttentionMaskInterface.register(RECORDER_NAME, self.mask_function)
        self.model.set_attn_implementation(RECORDER_NAME)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)


def _eager(module, query, key, value, attention_mask, **kwargs):
    """The family's own eager attention (it returns the softmax weights)."""
    return sys.modules[type(module).__module__].eager_attention_forward(
        module, query, key, value, attention_mask, **kwargs
    )


def reference_rows(model, ids, policy_name):
    """Per layer: absolute logits ``[B, H, Q, K]`` (-inf where not attended) and weights, from a reference."""
    if policy_name == "vanilla":
        recorder = DiagonalRecorder(model, _eager, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    else:
        dense = DenseReference(
            model,
            window=LM_INFINITE["n_local"],
            n_global=LM_INFINITE["n_global"],
            distance_limit=LM_INFINITE["distance_limit"],
        )
        recorder = DiagonalRecorder(model, dense.attend, lambda *args, **kwargs: None)
    with torch.no_grad(), recorder:
        weights = model(ids, output_attentions=True).attentions
    rows = {}
    for layer, w in enumerate(weights):
        w = w.float()
        log_w = torch.log(w)
        own = torch.diagonal(log_w, dim1=-2, dim2=-1)  # [B, H, Q]
        logits = log_w - own.unsqueeze(-1) + recorder.diagonal[layer].unsqueeze(-1)
        rows[layer] = (logits, w)
    return rows


def _policy(name):
    return vanilla() if name == "vanilla" else lm_infinite(**LM_INFINITE)


# --------------------------------------------------------------------------------------------------------
# Statistics against the reference
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "policy_name"), CASES)
def test_statistics_match_dense_reference(family, policy_name):
    model = _model(family)
    ids = _ids(model)
    unit_edges = list(range(LENGTH + 1))  # one bin per distance and per position: values compare directly
    config = CaptureConfig(
        query_stride=1, distance_edges=unit_edges, position_edges=unit_edges, n_global=SINKS
    )
    got = diagnose(model, ids, _policy(policy_name), config=config, train_length=TRAIN)
    reference = reference_rows(model, ids, policy_name)
    distance = torch.arange(LENGTH)[:, None] - torch.arange(LENGTH)[None, :]

    by_distance = got.logits_by_distance().set_index(["layer", "head", "bin_start"])
    by_query = got.max_logit_by_position().set_index(["layer", "head", "position"])
    by_position = got.entropy_by_position().set_index(["layer", "head", "bin_start"])
    for layer, (logits, weights) in reference.items():
        logits, weights = logits[0], weights[0]  # [H, Q, K]
        attended = torch.isfinite(logits)
        for head in range(logits.shape[0]):
            values, keep = logits[head], attended[head]
            expected = []
            for d in range(LENGTH):
                selected = values[(distance == d) & keep]
                if selected.numel():
                    expected.append(
                        (
                            d,
                            selected.numel(),
                            selected.mean(),
                            selected.min(),
                            selected.max(),
                            selected.std(unbiased=False),
                            values[-1, -1 - d],
                        )
                    )
            exp = pd.DataFrame(expected, columns=["d", "count", "mean", "min", "max", "std", "last"]).astype(
                float
            )
            row = by_distance.loc[(layer, head)].loc[exp["d"].astype(int)]
            assert (row["count"].to_numpy() == exp["count"].to_numpy()).all()
            for column in ("mean", "min", "max", "std"):
                np.testing.assert_allclose(row[column], exp[column], atol=TOL, rtol=0, err_msg=column)
            last = exp["last"].to_numpy()
            np.testing.assert_allclose(row["last_query_max"].fillna(-np.inf), last, atol=TOL, rtol=0)
            np.testing.assert_allclose(
                row["running_max"],
                np.maximum.accumulate(np.where(np.isfinite(last), last, -np.inf)),
                atol=TOL,
            )

            queries = by_query.loc[(layer, head)]
            np.testing.assert_allclose(queries["max_logit"], values.amax(-1), atol=TOL, rtol=0)
            np.testing.assert_allclose(
                queries["min_logit"], values.masked_fill(~keep, np.inf).amin(-1), atol=TOL
            )
            assert (queries["n_keys"].to_numpy() == keep.sum(-1).numpy()).all()

            p = weights[head]
            entropy = -(p * torch.log(p).nan_to_num(neginf=0.0)).sum(-1)
            sink = p[:, :SINKS].sum(-1)
            positions = by_position.loc[(layer, head)]
            assert (positions["count"] == 1).all() and len(positions) == LENGTH
            np.testing.assert_allclose(positions["mean"], entropy, atol=TOL, rtol=0)
            np.testing.assert_allclose(queries["entropy"], entropy, atol=TOL, rtol=0)
            np.testing.assert_allclose(positions["sink_mass"], sink, atol=TOL, rtol=0)


def test_default_bins_pool_windows_and_blocks():
    """Default (multi-width) bins, two windows, several query blocks: per-bin pools match numpy's binning."""
    model = _model("llama")
    ids = _ids(model, batch=2)
    config = CaptureConfig(query_stride=1, block_size=16)
    got = diagnose(model, ids, config=config, train_length=TRAIN)
    geometry = resolve_geometry(config, LENGTH, TRAIN)
    assert TRAIN in geometry.distance_edges and TRAIN // 2 in geometry.position_edges
    pooled = [reference_rows(model, ids[i : i + 1], "vanilla") for i in range(2)]
    distance = (torch.arange(LENGTH)[:, None] - torch.arange(LENGTH)[None, :]).numpy()
    distance_bin = np.digitize(distance, geometry.distance_edges) - 1
    position_bin = np.digitize(np.arange(LENGTH), geometry.position_edges) - 1
    table = got.logits_by_distance().set_index(["layer", "head", "bin_start"])
    entropy_table = got.entropy_by_position().set_index(["layer", "head", "bin_start"])
    for layer in range(model.config.num_hidden_layers):
        logits = torch.cat([rows[layer][0][0] for rows in pooled], dim=1).numpy()  # [H, 2Q, K]
        weights = torch.cat([rows[layer][1][0] for rows in pooled], dim=1).numpy()
        bins = np.concatenate([distance_bin, distance_bin])
        log_weights = np.log(weights, out=np.zeros_like(weights), where=weights > 0)
        entropy = -(weights * log_weights).sum(-1)  # [H, 2Q]
        query_bins = np.concatenate([position_bin, position_bin])
        for head in range(logits.shape[0]):
            for k, start in enumerate(geometry.distance_edges[:-1]):
                selected = logits[head][(bins == k) & np.isfinite(logits[head])]
                if selected.size:
                    row = table.loc[(layer, head, start)]
                    assert row["count"] == selected.size
                    np.testing.assert_allclose(
                        [row["mean"], row["min"], row["max"], row["std"]],
                        [selected.mean(), selected.min(), selected.max(), selected.std()],
                        atol=TOL,
                        rtol=0,
                    )
            for k, start in enumerate(geometry.position_edges[:-1]):
                selected = entropy[head][query_bins == k]
                row = entropy_table.loc[(layer, head, start)]
                assert row["count"] == selected.size
                np.testing.assert_allclose(
                    [row["mean"], row["max"]], [selected.mean(), selected.max()], atol=TOL
                )


def test_query_stride_samples_every_stride_and_the_last_query():
    model = _model("qwen2")
    got = diagnose(model, _ids(model), config=CaptureConfig(query_stride=10), train_length=TRAIN)
    positions = sorted(got.max_logit_by_position()["position"].unique())
    assert positions == [*range(0, LENGTH, 10), LENGTH - 1]
    assert got.meta["n_sampled_queries"] == len(positions)


# --------------------------------------------------------------------------------------------------------
# The model is left as it was, and its outputs do not change
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_outputs_unchanged_by_capture(family):
    model = _model(family)
    ids = _ids(model)
    with torch.no_grad():
        plain = model(ids).logits
        with capture(model, train_length=TRAIN) as session:
            captured = model(ids).logits
    assert session.result().meta["n_windows"] == 1
    assert (captured - plain).abs().max().item() < TOL


def _assert_restored(model, implementation):
    assert model.config._attn_implementation == implementation
    assert all(attention.binding_of(module) is None for module in attention_modules(model))
    for layer in decoder_layers(model):
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_restored_after_capture_and_after_errors():
    model = _model("mistral")
    implementation = model.config._attn_implementation
    with capture(model, lm_infinite(**LM_INFINITE), train_length=TRAIN) as session:
        assert model.config._attn_implementation != implementation
        session.run(_ids(model))
    _assert_restored(model, implementation)

    with pytest.raises(RuntimeError, match="inside"):
        with capture(model, train_length=TRAIN):
            raise RuntimeError("inside the block")
    _assert_restored(model, implementation)

    with pytest.raises(OodlensError, match="capture each length separately"):
        with capture(model, train_length=TRAIN) as session:
            session.run(_ids(model, length=LENGTH // 2))
            session.run(_ids(model))  # longer than the bins the first forward fixed
    _assert_restored(model, implementation)


def test_only_chosen_layers_are_observed():
    model = _model("gemma3")  # three layers
    config = CaptureConfig(layers=[2], hidden_layers=[0, -1])
    got = diagnose(model, _ids(model), config=config, train_length=TRAIN)
    assert set(got.logits_by_distance()["layer"]) == {2}
    assert set(got.entropy_by_position()["layer"]) == {2}
    assert set(got.hidden_by_position()["layer"]) == {0, 2}
    with pytest.raises(OodlensError):
        diagnose(model, _ids(model), config=CaptureConfig(layers=[3]), train_length=TRAIN)


# --------------------------------------------------------------------------------------------------------
# Hidden states, probe, save/load
# --------------------------------------------------------------------------------------------------------


def test_hidden_statistics_match_direct_computation():
    model = _model("llama")
    ids = _ids(model)
    config = CaptureConfig(
        hidden_layers=[0, 1],
        position_edges=list(range(LENGTH + 1)),
        hidden_head_positions=10,
        hidden_stratified_positions=20,
    )
    got = diagnose(model, ids, config=config, train_length=TRAIN)
    table = got.hidden_by_position().set_index(["layer", "bin_start"])
    for layer in (0, 1):
        h = _layer_output(model, ids, layer)
        norm = h.norm(dim=-1)
        later_mean = torch.stack([h[i + 1 :].mean(0) for i in range(LENGTH - 1)])
        cosine = torch.nn.functional.cosine_similarity(h[:-1], later_mean, dim=-1)
        np.testing.assert_allclose(table.loc[layer]["norm"], norm, rtol=1e-5)
        np.testing.assert_allclose(table.loc[layer]["cosine_to_later"].iloc[:-1], cosine, atol=1e-5)
        positions, vectors = got.hidden_samples(layer)
        assert len(positions) == 30 and (positions[:10] == np.arange(10)).all()
        np.testing.assert_allclose(vectors, h[positions].numpy(), rtol=1e-5, atol=1e-6)


def _layer_output(model, ids, layer):
    """Decoder layer ``layer``'s output ``[T, d]`` (float64) for one window (the last layer's is before the
    final norm, so transformers' hidden_states would not give it)."""
    outputs = {}
    handle = decoder_layers(model)[layer].register_forward_hook(lambda m, a, out: outputs.update(h=out))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    hidden = outputs["h"][0] if isinstance(outputs["h"], tuple) else outputs["h"]
    return hidden[0].double()


def test_position_probe_finds_starting_tokens():
    model = _model("llama")
    got = diagnose(model, _ids(model, batch=4), train_length=TRAIN)
    probe = got.position_probe()
    scores = probe.set_index(["target", "metric"])["score"]
    assert scores.notna().all() and scores[("start_token", "roc_auc")] > 0.5
    assert set(probe["n_samples"]) == {4 * LENGTH} and set(probe["n_folds"]) == {5}


def test_position_probe_separates_a_planted_start_cluster():
    """Start tokens far from the rest are found; with one start token there is nothing to cross-validate."""
    generator = np.random.default_rng(0)
    positions = np.tile(np.arange(100), 3)
    vectors = generator.normal(scale=0.1, size=(300, 8)).astype(np.float32)
    vectors[positions < 4, 0] += 10.0
    vectors[:, 1] += np.log1p(positions)  # and log-position is linearly readable
    scores = position_probe({0: (positions, vectors)}, n_global=4, seed=0).set_index("metric")["score"]
    assert scores["roc_auc"] == 1.0 and scores["balanced_accuracy"] == 1.0 and scores["r2"] > 0.9
    lonely = position_probe({0: (np.arange(50), vectors[:50])}, n_global=1, seed=0).set_index("metric")
    assert np.isnan(lonely.loc["roc_auc", "score"]) and np.isfinite(lonely.loc["r2", "score"])


def test_save_load_round_trip(tmp_path):
    model = _model("phi3")
    got = diagnose(model, _ids(model, batch=2), lm_infinite(**LM_INFINITE), train_length=TRAIN)
    folder = got.save(tmp_path / "diagnosis")
    got.save(folder)  # replacing an existing diagnosis works too
    loaded = Diagnosis.load(folder)
    for kind in TABLE_KINDS:
        pd.testing.assert_frame_equal(loaded.to_dataframe(kind), got.to_dataframe(kind))
    for layer in got.samples:
        for a, b in zip(loaded.hidden_samples(layer), got.hidden_samples(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    assert loaded.meta == got.meta
    assert loaded.summary() == pytest.approx(got.summary(), nan_ok=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnosis"]  # no staging folders left behind


def test_gpt2_vanilla_capture_works():
    model = _model("gpt2")
    got = diagnose(model, _ids(model), train_length=TRAIN)
    summary = got.summary()
    assert np.isfinite(summary["entropy_beyond"]) and np.isfinite(summary["max_logit_beyond"])


# --------------------------------------------------------------------------------------------------------
# The real model past its pretraining length
# --------------------------------------------------------------------------------------------------------

SMOLLM2_LENGTH = 9216  # 1,024 tokens past SmolLM2's pretraining length of 8,192


@pytest.fixture(scope="module")
def smollm2_diagnosis(smollm2):
    from oodlens.data import load_corpus, token_windows

    assert smollm2.info.train_length == 8192
    ids = token_windows(load_corpus("python-docs"), smollm2.tokenizer, SMOLLM2_LENGTH, n_windows=1)
    config = CaptureConfig(query_stride=64, hidden_layers=[2, -1])
    diagnosis = diagnose(smollm2.model, ids, config=config, name="smollm2")
    print({key: round(value, 4) for key, value in diagnosis.summary().items()})
    return diagnosis


@pytest.mark.slow
def test_smollm2_entropy_grows_beyond_pretraining_length(smollm2_diagnosis):
    """Factor 2: queries past 8,192 spread their attention more than queries in [4,096, 8,192)."""
    summary = smollm2_diagnosis.summary()
    assert summary["entropy_beyond"] > summary["entropy_late_within"]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured (docs/capture.md): at 9,216 tokens SmolLM2's largest logit at distances ≥ 8,192 (10.5) "
    "stays below the largest within (18.0), also per head and for the last token; the paper's last-token "
    "running max rises past 8,192 only because the first tokens (attention sinks, high logits at every "
    "distance) enter that range. At 16,384 tokens it holds clearly (48.2 against 19.4), too slow for a test",
)
def test_smollm2_max_logit_beyond_exceeds_within(smollm2_diagnosis):
    """Factor 1 as the paper states it; kept strict so that a change in the measurement shows up."""
    summary = smollm2_diagnosis.summary()
    assert summary["max_logit_beyond"] > summary["max_logit_within"]


def test_padded_rows_count_only_their_real_tokens():
    model = _model("llama")
    long, short = _ids(model, length=80)[0], _ids(model, length=50, seed=1)[0]
    padded = torch.full((2, 80), 7)
    padded[0], padded[1, 30:] = long, short
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[1, :30] = 0  # left padding
    with capture(model, train_length=TRAIN) as session:
        session.fix_length(80)
        session.run(long[None])
        session.run(short[None])
    expected = session.result()
    for given in ({"input_ids": padded, "attention_mask": mask}, padded):
        got = diagnose(
            model, given, attention_mask=None if isinstance(given, dict) else mask, train_length=TRAIN
        )
        assert got.meta["length"] == 80 and got.meta["n_windows"] == 2
        counts = got.entropy_by_position().groupby(["layer", "head"])["count"].sum()
        assert (counts == 80 + 50).all()  # never 2 × 80: the padding is not text
        for kind in ("entropy_by_position", "logits_by_distance", "hidden_by_position"):
            pd.testing.assert_frame_equal(got.to_dataframe(kind), expected.to_dataframe(kind))
    holes = mask.clone()
    holes[0, 40] = 0
    with pytest.raises(OodlensError, match="padding between real tokens"):
        diagnose(model, padded, attention_mask=holes, train_length=TRAIN)
    with pytest.raises(OodlensError, match="at least 2 real tokens"):
        diagnose(model, torch.zeros(1, 0, dtype=torch.long), train_length=TRAIN)


def test_capture_under_autograd_keeps_gradients_and_statistics():
    model = _model("llama")
    ids = _ids(model)

    def gradient():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    plain = gradient()
    with capture(model, train_length=TRAIN) as session:
        observed = gradient()
    assert torch.allclose(observed, plain, atol=1e-5, rtol=1e-4)  # the engine's vanilla, with its backward
    assert session.result().summary()["entropy_within"] > 0


def test_diagnose_shows_progress_per_layer(capsys):
    model = _model("llama")
    diagnose(model, _ids(model), train_length=TRAIN, progress=True)
    assert "capture vanilla, window 1" in capsys.readouterr().err


@pytest.mark.parametrize("ordered", [False, True], ids=["scattered bins", "runs of bins"])
def test_binned_moments_equal_a_loop_over_bins(ordered):
    """Count, sums, extremes per head and bin against a plain loop; empty bins stay empty (two calls pool)."""
    generator = torch.Generator().manual_seed(1)
    heads, n_bins, n = 3, 12, 400
    bins = torch.randint(0, n_bins - 2, (n,), generator=generator)  # the last two bins stay empty
    bins = bins.sort().values if ordered else bins
    values = torch.randn(heads, n, generator=generator)
    moments = BinnedMoments(heads, n_bins, torch.device("cpu"))
    moments.add(values[:, :150], bins[:150])
    moments.add(values[:, 150:], bins[150:])
    moments.add(values[:, :0], bins[:0])  # nothing to add
    for b in range(n_bins):
        chosen = values[:, bins == b]
        assert moments.count[0, b] == chosen.shape[1]
        if chosen.shape[1]:
            torch.testing.assert_close(moments.total[:, b], chosen.double().sum(1))
            torch.testing.assert_close(moments.total_sq[:, b], chosen.double().square().sum(1))
            assert torch.equal(moments.max[:, b], chosen.amax(1))
            assert torch.equal(moments.min[:, b], chosen.amin(1))
        else:
            assert moments.max[0, b] == -math.inf and moments.min[0, b] == math.inf
            assert moments.total[0, b] == 0

"""Figures from small synthetic frames in the documented schemas: files, axes, lines, markers, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from PIL import Image  # noqa: E402

from oodlens import plotting  # noqa: E402
from oodlens.display import format_number
from oodlens.errors import OodlensError
from oodlens.stats import wilson_interval  # noqa: E402

TRAIN = 64
LAYERS = (0, 1)
HEADS = 3


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------- synthetic frames


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def logits_frame(fixed: bool = False, seed: int = 0) -> pd.DataFrame:
    edges = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    rows = []
    for layer in LAYERS:
        for head in range(HEADS):
            level = 4 + head + _rng(seed + head).normal(0, 0.2, len(edges) - 1)
            growth = 0 if fixed else np.clip(np.log2(edges[1:] / TRAIN), 0, None) * 3
            maxes = level + growth
            for i, (start, end) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
                rows.append(
                    dict(
                        layer=layer,
                        head=head,
                        bin_start=start,
                        bin_end=end,
                        count=end - start,
                        mean=maxes[i] - 3,
                        std=1.0,
                        min=maxes[i] - 6,
                        max=maxes[i],
                        last_query_max=maxes[i] - 0.5,
                        running_max=maxes[: i + 1].max(),
                    )
                )
    return pd.DataFrame(rows)


def max_logit_frame(fixed: bool = False) -> pd.DataFrame:
    positions = np.arange(0, 256, 4)
    rows = [
        dict(
            layer=layer,
            head=head,
            position=p,
            max_logit=5 + head + (0 if fixed or p < TRAIN else 2 * np.log2(p / TRAIN)),
        )
        for layer in LAYERS
        for head in range(HEADS)
        for p in positions
    ]
    return pd.DataFrame(rows)


def entropy_frame(fixed: bool = False) -> pd.DataFrame:
    edges = np.arange(0, 257, 16)
    rows = []
    for layer in LAYERS:
        for head in range(HEADS):
            for start, end in zip(edges[:-1], edges[1:], strict=True):
                centre = (start + end) / 2
                entropy = np.log(min(centre, TRAIN) + 1) if fixed else np.log(centre + 1)
                rows.append(
                    dict(
                        layer=layer,
                        head=head,
                        bin_start=start,
                        bin_end=end,
                        count=end - start,
                        mean=entropy * (0.6 + 0.1 * head),
                        std=0.2,
                        max=entropy,
                        sink_mass=0.6 - 0.1 * head if fixed or centre < TRAIN else 0.2,
                    )
                )
    return pd.DataFrame(rows)


def hidden_frame(fixed: bool = False) -> pd.DataFrame:
    edges = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256])
    rows = [
        dict(
            layer=layer,
            bin_start=s,
            bin_end=e,
            norm=(80 if s == 0 else 10) * (layer + 1),
            cosine_to_later=0.1 if s == 0 else 0.8 - (0 if fixed or s < TRAIN else 0.3),
        )
        for layer in LAYERS
        for s, e in zip(edges[:-1], edges[1:], strict=True)
    ]
    return pd.DataFrame(rows)


def hidden_samples(seed: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rng = _rng(seed)
    positions = np.tile(np.arange(150), 2)
    samples = {}
    for layer in LAYERS:
        vectors = rng.normal(size=(len(positions), 8)) + np.outer(np.log1p(positions), np.ones(8)) * 0.3
        vectors[positions < 5] += 6  # starting tokens far away
        samples[layer] = (positions, vectors)
    return samples


def perplexity_frame(methods: tuple[str, ...] = ("vanilla", "lm-infinite")) -> pd.DataFrame:
    starts = np.arange(0, 256, 32)
    rows = [
        dict(
            method=m,
            start=s,
            end=s + 32,
            nll=np.log(8.0 * (1 if m != "vanilla" or s < TRAIN else s / 8)),
            n_tokens=32,
        )
        for m in methods
        for s in starts
    ]
    frame = pd.DataFrame(rows)
    frame["ppl"] = np.exp(frame["nll"])
    return frame


def passkey_frame(methods: tuple[str, ...] = ("vanilla", "lm-infinite")) -> pd.DataFrame:
    rows = [
        dict(
            method=m,
            length=length,
            depth=depth,
            sample=s,
            passkey="12345",
            generated="12345" if (m != "vanilla" or length <= TRAIN) and s < 2 else "99",
            correct=None,
        )
        for m in methods
        for length in (32, 64, 128, 256)
        for depth in (0.1, 0.5, 0.9)
        for s in range(3)
    ]
    frame = pd.DataFrame(rows)
    frame["correct"] = frame["generated"] == frame["passkey"]
    return frame


def generation_frame(methods: tuple[str, ...] = ("vanilla", "lm-infinite")) -> pd.DataFrame:
    rows = [
        dict(
            method=m,
            milestone=ms,
            bleu=(0.0 if m == "vanilla" and ms > TRAIN else 0.3) + 0.02 * s,
            rouge_l=(0.05 if m == "vanilla" and ms > TRAIN else 0.4) + 0.02 * s,
        )
        for m in methods
        for ms in (32, 64, 128, 256)
        for s in range(3)
    ]
    return pd.DataFrame(rows)


def comparison_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(method=m, metric=metric, value=v)
            for m, values in (("vanilla", (0.0, 0.1)), ("lm-infinite", (0.8, 0.4)), ("window", (0.3, 0.2)))
            for metric, v in zip(("passkey accuracy", "ROUGE-L"), values, strict=True)
        ]
    )


# ------------------------------------------------------------------------------------------- helpers


def data_lines(ax) -> list:
    """Lines that draw data (not the train-length marker or the ln n reference)."""
    return [
        line
        for line in ax.get_lines()
        if line.get_gid() not in (plotting.TRAIN_LENGTH_GID, plotting.LN_N_GID)
    ]


def has_train_marker(ax, x: float = TRAIN) -> bool:
    (marker,) = [line for line in ax.get_lines() if line.get_gid() == plotting.TRAIN_LENGTH_GID]
    return (
        marker.get_label() == "pretraining length (64)"
        and marker.get_linestyle() == "--"
        and (list(marker.get_xdata()) == [x, x])
    )


def bands(ax) -> list:
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def legend_labels(fig) -> list[str]:
    """The labels of the figure's one legend (in a panel or beside them)."""
    (legend,) = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for t in legend.get_texts()]


def assert_saved(fig, tmp_path: Path, name: str = "figure") -> None:
    pdf, png = plotting.save_figure(fig, tmp_path / name)
    assert (pdf.suffix, png.suffix) == (".pdf", ".png")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    with Image.open(png) as image:
        dpi = image.info["dpi"]
        size = image.size
    assert np.allclose(dpi, 300, atol=0.5)
    # saved with a tight bounding box: about the figure's size at 300 dpi, never clipped to a sliver
    width, height = fig.get_size_inches() * 300
    assert 0.6 * width < size[0] < 1.5 * width and 0.6 * height < size[1] < 1.5 * height
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.pdf", f"{name}.png"]  # no temp files left


# ----------------------------------------------------------------------------------------------- style


def test_method_colors_are_fixed_and_colour_blind_safe():
    assert (
        plotting.method_color("vanilla")
        == plotting.method_color("before")
        == plotting.method_color("Vanilla")
    )
    assert (
        plotting.method_color("lm-infinite")
        == plotting.method_color("after")
        == plotting.method_color("lm_infinite")
    )
    # every method has its own look (colour, dashes, marker), the distance limit and ReRoPE being one method
    looks = {name: str(style) for name, style in plotting.METHOD_STYLES.items() if name != "rerope"}
    assert len(set(looks.values())) == len(looks)
    assert plotting.METHOD_STYLES["rerope"] == plotting.METHOD_STYLES["distance-limit"]
    # bars have colour and hatch only: those two tell the methods apart too
    bars = {name: (plotting.method_color(name), plotting.method_hatch(name)) for name in looks}
    assert len(set(bars.values())) == len(bars)
    assert plotting.method_hatch("rerope") == plotting.method_hatch("distance-limit")
    assert plotting.method_hatch("vanilla") is None  # the first of a colour is plain
    darkened_yellow = {"#8C6D00"}
    assert set(plotting.METHOD_COLORS.values()) <= set(plotting.OKABE_ITO.values()) | darkened_yellow
    assert plotting.method_color("some-new-method") == plotting.method_color("some-new-method")


def test_style_context_restores_settings():
    before = dict(matplotlib.rcParams)
    with plotting.style():
        assert matplotlib.rcParams["pdf.fonttype"] == 42 and not matplotlib.rcParams["axes.spines.top"]
    assert dict(matplotlib.rcParams) == before


def test_save_figure_accepts_suffix_and_creates_folders(tmp_path):
    fig = plt.figure(figsize=(2, 1))
    pdf, png = plotting.save_figure(fig, tmp_path / "sub" / "ppl.pdf")
    assert (pdf.name, png.name) == ("ppl.pdf", "ppl.png") and pdf.exists() and png.exists()


# --------------------------------------------------------------------------------------- per function


def test_logits_by_distance_overlays_before_after(tmp_path):
    fig = plotting.plot_logits_by_distance(
        {"before": logits_frame(), "after": logits_frame(fixed=True)}, TRAIN
    )
    (ax,) = fig.axes
    assert len(data_lines(ax)) == 2 and len(bands(ax)) == 2 and has_train_marker(ax)
    assert legend_labels(fig) == ["before", "after", "pretraining length (64)"]
    assert ax.get_xscale() == "linear"  # as in the paper: the distances beyond L get the room they need
    before = data_lines(ax)[0]
    assert before.get_color() == plotting.method_color("vanilla")
    assert np.all(np.diff(before.get_ydata()) >= 0)  # running max never falls
    assert list(before.get_xdata()) == [1, 2, 4, 8, 16, 32, 64, 128, 256]  # over distances below bin_end
    assert_saved(fig, tmp_path)


def test_logits_by_distance_facets_and_stats():
    fig = plotting.plot_logits_by_distance(logits_frame(), TRAIN, facet=True, stat="mean", band="std")
    assert data_lines(fig.axes[0])[0].get_xdata()[0] == 0.5  # bin [0, 1) at its centre
    assert [ax.get_title() for ax in fig.axes] == ["layer 0", "layer 1"]
    assert all(len(data_lines(ax)) == 1 and has_train_marker(ax) for ax in fig.axes)
    assert legend_labels(fig) == ["pretraining length (64)"] and fig.legends  # one legend beside the panels
    fig = plotting.plot_logits_by_distance(logits_frame(), layers=[1], band=None)
    assert len(bands(fig.axes[0])) == 0 and not any(line.get_gid() for line in fig.axes[0].get_lines())
    with pytest.raises(OodlensError, match="stat"):
        plotting.plot_logits_by_distance(logits_frame(), stat="median")
    with pytest.raises(OodlensError, match="layer 7"):
        plotting.plot_logits_by_distance(logits_frame(), layers=[7])


def test_existing_ax_is_used_and_facet_with_ax_refused():
    fig, (left, right) = plt.subplots(1, 2)
    assert plotting.plot_entropy_by_position(entropy_frame(), TRAIN, ax=right) is fig
    assert len(data_lines(right)) == 1 and not left.get_lines()
    with pytest.raises(OodlensError, match="ax=None"):
        plotting.plot_logits_by_distance(logits_frame(), facet=True, ax=left)


def test_plots_given_an_ax_keep_their_legend_inside_it():
    fig, axes = plt.subplots(1, 4)
    plotting.plot_logits_by_distance(
        {"before": logits_frame(), "after": logits_frame(fixed=True)}, TRAIN, ax=axes[0]
    )
    plotting.plot_perplexity_by_position(perplexity_frame(), TRAIN, ax=axes[1])
    plotting.plot_passkey(passkey_frame(), TRAIN, ax=axes[2])
    plotting.plot_method_comparison(comparison_frame(), ax=axes[3])
    assert fig.legends == []  # nothing drawn over the other panels
    assert all(ax.get_legend() is not None for ax in axes)


def test_max_logit_by_position(tmp_path):
    fig = plotting.plot_max_logit_by_position([max_logit_frame(), max_logit_frame(fixed=True)], TRAIN)
    (ax,) = fig.axes
    assert len(data_lines(ax)) == 2 and has_train_marker(ax)
    assert legend_labels(fig) == ["run 1", "run 2", "pretraining length (64)"]
    assert_saved(fig, tmp_path)


def test_entropy_by_position_has_ln_n_reference(tmp_path):
    fig = plotting.plot_entropy_by_position(
        {"before": entropy_frame(), "after": entropy_frame(fixed=True)}, TRAIN
    )
    (ax,) = fig.axes
    assert len(data_lines(ax)) == 2 and len(bands(ax)) == 2 and has_train_marker(ax)
    (ln_n,) = [line for line in ax.get_lines() if line.get_gid() == plotting.LN_N_GID]
    assert ln_n.get_label() == "ln n (uniform)" and ln_n.get_linestyle() == "--"
    np.testing.assert_allclose(ln_n.get_ydata(), np.log(ln_n.get_xdata() + 0.5))  # bin [0, 16): mean n 8.5
    assert legend_labels(fig) == ["before", "after", "ln n (uniform)", "pretraining length (64)"]
    assert_saved(fig, tmp_path)


def test_sink_mass(tmp_path):
    fig = plotting.plot_sink_mass({"before": entropy_frame(), "after": entropy_frame(fixed=True)}, TRAIN)
    (ax,) = fig.axes
    assert len(data_lines(ax)) == 2 and has_train_marker(ax) and ax.get_ylim()[0] == 0
    assert_saved(fig, tmp_path)


def test_hidden_norm_rows_are_metrics_columns_layers(tmp_path):
    fig = plotting.plot_hidden_norm({"before": hidden_frame(), "after": hidden_frame(fixed=True)}, TRAIN)
    assert len(fig.axes) == 2 * len(LAYERS)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear", "linear"]
    assert all(len(data_lines(ax)) == 2 and has_train_marker(ax) for ax in fig.axes)
    assert_saved(fig, tmp_path)


def test_hidden_pca_single_and_before_after(tmp_path):
    samples = hidden_samples()
    fig = plotting.plot_hidden_pca(samples, n_global=5)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1"]
    for ax in panels:  # every point drawn once: the rest, the first tokens, and any off-scale ones
        assert sum(len(c.get_offsets()) for c in ax.collections) == len(samples[0][0])
    assert len(fig.axes) == 3  # two panels and the colour bar
    fig = plotting.plot_hidden_pca({"before": hidden_samples(0), "after": hidden_samples(1)}, layers=[1])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["before · layer 1", "after · layer 1"]
    assert_saved(fig, tmp_path)


def test_hidden_pca_is_not_taken_over_by_position_zero():
    positions, vectors = hidden_samples()[0]
    vectors = vectors.copy()
    vectors[positions == 0] *= 1000  # a massive activation, as real models have at position 0
    fig = plotting.plot_hidden_pca({0: (positions, vectors)}, n_global=5)
    panel = fig.axes[0]
    share = float(panel.get_xlabel().split("(")[1].rstrip("%)"))
    assert share < 90  # PC1 describes the other positions, not position 0 alone
    offscale = [c for c in panel.collections if c.get_label() == "off-scale (at the edge)"]
    assert offscale and (offscale[0].get_array() == 1).sum() == 2  # position 0 of both sequences, pinned
    assert len(np.unique(np.round(panel.collections[0].get_offsets()[:, 0], 3))) > 50  # structure, not a line


def test_hidden_pca_reads_objects_and_subsamples():
    class Diagnosis:
        meta = {"hidden_layers": [1]}

        def hidden_samples(self, layer):
            return hidden_samples()[layer]

    fig = plotting.plot_hidden_pca(Diagnosis(), max_points=100, n_global=5)
    (panel,) = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert sum(len(c.get_offsets()) for c in panel.collections) == 100
    kept = [c for c in panel.collections if c.get_label() in ("positions < 5", "off-scale (at the edge)")]
    assert sum(len(c.get_offsets()) for c in kept) >= 10  # the first tokens are always kept
    with pytest.raises(OodlensError, match="no layer 5"):
        plotting.plot_hidden_pca(hidden_samples(), layers=[5])


def test_perplexity_by_position(tmp_path):
    fig = plotting.plot_perplexity_by_position(perplexity_frame(("vanilla", "lm-infinite", "window")), TRAIN)
    (ax,) = fig.axes
    assert len(data_lines(ax)) == 3 and has_train_marker(ax) and ax.get_yscale() == "log"
    assert legend_labels(fig) == ["vanilla", "lm-infinite", "window", "pretraining length (64)"]
    vanilla = data_lines(ax)[0]
    assert vanilla.get_xdata()[0] == 16  # bucket centre
    np.testing.assert_allclose(vanilla.get_ydata()[0], 8.0)
    assert_saved(fig, tmp_path)


def test_perplexity_pools_documents_by_tokens():
    frame = pd.DataFrame(
        dict(method="vanilla", start=0, end=10, nll=[np.log(2), np.log(8)], ppl=[2, 8], n_tokens=[1, 3])
    )
    fig = plotting.plot_perplexity_by_position(frame)
    np.testing.assert_allclose(
        data_lines(fig.axes[0])[0].get_ydata(), [np.exp((np.log(2) + 3 * np.log(8)) / 4)]
    )


def test_perplexity_bucket_with_nan_is_left_off():
    frame = perplexity_frame(("vanilla",))
    frame.loc[frame["start"] == 224, "nll"] = np.nan
    frame = pd.concat([frame, perplexity_frame(("vanilla",))])  # a second document, finite everywhere
    (line,) = data_lines(plotting.plot_perplexity_by_position(frame).axes[0])
    assert np.isfinite(line.get_ydata()[:-1]).all() and not np.isfinite(line.get_ydata()[-1])


def test_perplexity_accepts_streaming_frames_without_method():
    stream = perplexity_frame(("lm-infinite",)).drop(columns="method")  # StreamingResult.to_dataframe()
    fig = plotting.plot_perplexity_by_position({"lm-infinite": stream}, TRAIN)
    assert data_lines(fig.axes[0])[0].get_color() == plotting.method_color("lm-infinite")


def test_streaming_pools_fine_buckets_by_tokens_with_an_interval_and_the_largest_memory(tmp_path):
    # two display buckets of 200 tokens, each holding two fine buckets of 100
    nll = np.log([2.0, 8.0, 4.0, 4.0])
    stream = pd.DataFrame(
        dict(
            start=[0, 100, 200, 300],
            end=[100, 200, 300, 400],
            nll=nll,
            ppl=np.exp(nll),
            n_tokens=[50, 100, 100, 100],
            peak_memory_gib=[1.0, 1.5, 1.2, 1.1],
            seconds=1.0,
        )
    )
    fig = plotting.plot_streaming({"lm-infinite": stream}, bucket=200, train_length=TRAIN)
    quality, memory = fig.axes
    (line,) = data_lines(quality)
    np.testing.assert_allclose(line.get_xdata(), [100, 300])
    np.testing.assert_allclose(line.get_ydata(), [np.exp((50 * np.log(2) + 100 * np.log(8)) / 150), 4.0])
    assert len(bands(quality)) == 1  # the first bucket's two fine buckets disagree
    np.testing.assert_allclose(data_lines(memory)[0].get_ydata(), [1.5, 1.2])
    assert has_train_marker(quality) and memory.get_ylim()[0] == 0
    assert_saved(fig, tmp_path)


def test_streaming_compares_methods_on_the_same_tokens(tmp_path):
    """A second method's perplexity relative to the first, bucket by bucket over the same tokens: 1 % and 3 %
    higher in the two display buckets here, its band a paired bootstrap over the fine buckets."""
    nll = np.log([2.0, 8.0, 4.0, 4.0])
    first = pd.DataFrame(
        dict(start=[0, 100, 200, 300], end=[100, 200, 300, 400], nll=nll, ppl=np.exp(nll),
             n_tokens=[100] * 4, peak_memory_gib=1.0, seconds=1.0)
    )  # fmt: skip
    higher = np.log([1.01, 1.01, 1.02, 1.04])  # the last display bucket: 2 % and 4 % higher
    second = first.assign(nll=nll + higher, ppl=np.exp(nll + higher))
    fig = plotting.plot_streaming({"lm-infinite": first, "streaming-llm": second}, bucket=200)
    quality, relative, memory = fig.axes
    (line,) = data_lines(relative)[:1]
    np.testing.assert_allclose(line.get_xdata(), [100, 300])
    np.testing.assert_allclose(line.get_ydata(), [1.0, 100 * (np.sqrt(1.02 * 1.04) - 1)], rtol=1e-9)
    assert len(bands(relative)) == 1  # one band, of zero width where the fine buckets agree
    assert relative.get_ylabel() == "perplexity vs lm-infinite (%)"
    assert len(data_lines(quality)) == 2 and len(data_lines(memory)) == 2
    assert_saved(fig, tmp_path)


def test_streaming_refuses_a_bucket_below_one_token():
    with pytest.raises(OodlensError, match="bucket of at least 1"):
        plotting.plot_streaming(perplexity_frame(("lm-infinite",)), bucket=0)


def test_perplexity_before_after_dict_uses_labels():
    fig = plotting.plot_perplexity_by_position(
        {"before": perplexity_frame(("vanilla",)), "after": perplexity_frame(("lm-infinite",))}, TRAIN
    )
    assert legend_labels(fig) == ["before", "after", "pretraining length (64)"]


def errorbar_points(ax) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per labelled errorbar series: x, y and the (low, high) ends of its bars."""
    found = {}
    for container in ax.containers:
        if isinstance(container, ErrorbarContainer) and container.get_label():
            line, _, (bars,) = container.lines
            ends = np.array([segment[:, 1] for segment in bars.get_segments()])
            found[container.get_label()] = (line.get_xdata(), line.get_ydata(), ends)
    return found


def test_passkey_accuracy_with_wilson_intervals(tmp_path):
    frame = passkey_frame()
    fig = plotting.plot_passkey(frame, TRAIN)
    (ax,) = fig.axes
    points = errorbar_points(ax)
    assert list(points) == ["vanilla", "lm-infinite"] and has_train_marker(ax)
    for method, (x, y, ends) in points.items():
        cells = frame[frame["method"] == method].groupby("length")["correct"]
        k, n = cells.sum().to_numpy(), cells.size().to_numpy()
        low, high = wilson_interval(k, n)
        assert np.allclose(y, k / n) and np.allclose(ends[:, 0], low) and np.allclose(ends[:, 1], high)
        assert np.all(np.abs(x - cells.sum().index.to_numpy()) < 0.1 * 32)  # only nudged apart
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "128", "256"]
    assert_saved(fig, tmp_path)


def test_method_comparison_grouped_and_faceted(tmp_path):
    fig = plotting.plot_method_comparison(comparison_frame())
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 3 and all(len(c) == 2 for c in bars)  # one bar per metric for each method
    assert legend_labels(fig) == ["vanilla", "lm-infinite", "window"]
    assert matplotlib.colors.to_hex(bars[0][0].get_facecolor()) == plotting.method_color("vanilla").lower()
    assert [t.get_text() for t in ax.get_xticklabels()] == list(comparison_frame()["metric"].unique())
    assert_saved(fig, tmp_path)
    fig = plotting.plot_method_comparison(comparison_frame(), facet=True, metrics=["ROUGE-L"])
    assert [ax.get_title() for ax in fig.axes] == ["ROUGE-L"] and fig.axes[0].get_ylabel() == "ROUGE-L"
    # each value is written above its bar's interval; a panel whose bars share one n says it in its title
    frame = comparison_frame().assign(low=lambda f: f["value"] - 0.05, high=lambda f: f["value"] + 0.1, n=4)
    fig = plotting.plot_method_comparison(frame, facet=True, metrics=["ROUGE-L"], ylabel="score")
    (ax,) = fig.axes
    assert ax.get_title() == "ROUGE-L (n = 4)" and ax.get_ylabel() == "score"
    rouge = frame[frame["metric"] == "ROUGE-L"]
    labels = {text.get_text(): text.xy[1] for text in ax.texts}
    assert labels == {format_number(v): pytest.approx(v + 0.1) for v in rouge["value"]}
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    hatches = [plotting.method_hatch(method) for method in rouge["method"]]
    assert [bar[0].get_hatch() for bar in bars] == hatches
    # fractions share one 0-1 scale in every panel, whatever each panel's largest value
    fig = plotting.plot_method_comparison(frame, facet=True, fractions=True)
    assert all(list(ax.get_yticks()) == [0, 0.25, 0.5, 0.75, 1] for ax in fig.axes)
    assert len({ax.get_ylim() for ax in fig.axes}) == 1 and fig.axes[0].get_ylim()[0] == 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["vanilla", "lm-infinite", "window"]
    with pytest.raises(OodlensError, match="'BLEU'"):
        plotting.plot_method_comparison(comparison_frame(), metrics=["BLEU"])


def test_generation_quality(tmp_path):
    frame = generation_frame()
    fig = plotting.plot_generation_quality(frame, TRAIN)
    assert [ax.get_ylabel() for ax in fig.axes] == ["BLEU", "ROUGE-L"]
    for ax, column in zip(fig.axes, ("bleu", "rouge_l"), strict=True):
        points = errorbar_points(ax)
        assert list(points) == ["vanilla", "lm-infinite"] and has_train_marker(ax)
        cells = frame[frame["method"] == "vanilla"].groupby("milestone")[column]
        x, y, ends = points["vanilla"]
        assert np.allclose(y, cells.mean().to_numpy())
        assert np.all(ends[:, 0] <= y + 1e-12) and np.all(ends[:, 1] >= y - 1e-12)
        assert np.all(ends[:, 1] > ends[:, 0])  # several windows: a real interval
    assert_saved(fig, tmp_path)


def test_result_objects_are_asked_for_their_frame():
    class PerplexityResult:
        def to_dataframe(self):
            return perplexity_frame(("vanilla",))

    class Diagnosis:
        def logits_by_distance(self):
            return logits_frame()

    assert len(data_lines(plotting.plot_perplexity_by_position(PerplexityResult()).axes[0])) == 1
    assert len(data_lines(plotting.plot_logits_by_distance({"before": Diagnosis()}).axes[0])) == 1
    with pytest.raises(OodlensError, match="DataFrame"):
        plotting.plot_perplexity_by_position(42)


MISSING_COLUMN_CASES: list[tuple[Callable, Callable[[], pd.DataFrame], str]] = [
    (plotting.plot_logits_by_distance, logits_frame, "running_max"),
    (plotting.plot_max_logit_by_position, max_logit_frame, "max_logit"),
    (plotting.plot_entropy_by_position, entropy_frame, "mean"),
    (plotting.plot_sink_mass, entropy_frame, "sink_mass"),
    (plotting.plot_hidden_norm, hidden_frame, "cosine_to_later"),
    (plotting.plot_perplexity_by_position, perplexity_frame, "n_tokens"),
    (plotting.plot_passkey, passkey_frame, "correct"),
    (plotting.plot_generation_quality, generation_frame, "rouge_l"),
    (plotting.plot_method_comparison, comparison_frame, "metric"),
]


@pytest.mark.parametrize(
    ("plot", "make", "column"), MISSING_COLUMN_CASES, ids=lambda c: getattr(c, "__name__", c)
)
def test_missing_column_is_named(plot, make, column):
    with pytest.raises(OodlensError, match=f"lacks column '{column}'"):
        plot(make().drop(columns=column))
    with pytest.raises(OodlensError, match=f"lacks column '{column}'"):
        plot({"before": make(), "after": make().drop(columns=column)})


def test_empty_frame_is_refused():
    with pytest.raises(OodlensError, match="no rows"):
        plotting.plot_perplexity_by_position(perplexity_frame().iloc[:0])


def test_repair_map_colours_the_distance_from_one_either_way():
    frame = pd.DataFrame(
        {
            "method": ["vanilla", "vanilla", "lm-infinite", "lm-infinite"],
            "quantity": ["factor 1: logits", "retrieval", "factor 1: logits", "retrieval"],
            "ratio": [8.0, float("nan"), 0.125, 1.0],
            "label": [None, "0/4", None, "4/4"],
        }
    )
    fig = plotting.plot_repair_map(frame)
    ax = fig.axes[0]
    shades = ax.images[0].get_array()
    # rows in the standard method order (vanilla first), columns in order of appearance
    assert [t.get_text() for t in ax.get_yticklabels()] == ["vanilla", "lm-infinite"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["factor 1\nlogits", "retrieval"]
    assert shades[0, 0] == pytest.approx(np.log(8)) and shades[1, 0] == pytest.approx(np.log(8))  # 8× ≡ 1/8
    assert shades[1, 1] == 0 and np.ma.is_masked(shades[0, 1])  # 1× is white; a missing ratio is hatched
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.125×", "0/4", "4/4", "8×"]
    plt.close(fig)


def test_repair_map_shows_nothing_retrieved_and_an_overflow_as_the_farthest():
    frame = pd.DataFrame(
        {
            "method": ["vanilla", "vanilla"],
            "quantity": ["perplexity", "retrieval"],
            "ratio": [float("inf"), 0.0],
            "label": [None, "0/2"],
        }
    )
    fig = plotting.plot_repair_map(frame)
    shades = fig.axes[0].images[0].get_array()
    assert not np.ma.is_masked(shades[0, 1]) and shades[0, 1] == pytest.approx(np.log(8))
    assert shades[0, 0] == pytest.approx(np.log(8))
    assert "0/2" in [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)


def test_a_log_axis_over_many_decades_keeps_its_tick_labels():
    # 11 methods, perplexity from 3 to 13,000: matplotlib's 1-2-5 locator drops every tick on such an axis
    positions = np.arange(0, 4096, 128)
    rows = [
        {"method": f"m{k}", "start": p, "end": p + 128, "nll": np.log(3.0) + k * np.log(13000 / 3) / 10,
         "n_tokens": 128}
        for k in range(11)
        for p in positions
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(3.4, 1.2))  # a short panel, as in a grid of figures
    plotting.plot_perplexity_by_position(pd.DataFrame(rows), 1024, ax=ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert {"10", "100", "1000", "10k"} <= set(labels)
    plt.close(fig)

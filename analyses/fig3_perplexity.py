"""Figure 3 of the paper: perplexity by position far beyond the pretraining length (also the quality
benchmark of LM-Infinite).

Methods: LM-Infinite and the content-matched baseline ``vanilla-truncated`` (vanilla with its context cut to
the pretraining length) to ``--length`` (default 4 × train length), vanilla to ``--vanilla-length`` (default
2 × train length; it has exploded well before). Prints perplexity over [L, 2L) and [2L, 4L) and the ratio
LM-Infinite / baseline (goal ≤ 1.10), and vanilla's ratio past 1.5 L (goal > 10). Every perplexity carries
its 95 % bootstrap interval over the windows (the figure's bands, the table's brackets), every ratio its
paired interval over the same windows (near 1 written as a difference in percent).

    python analyses/fig3_perplexity.py               # 4 windows from different offsets of the corpus
"""

from __future__ import annotations

import common
import numpy as np
import pandas as pd

from oodlens import plotting
from oodlens.display import estimate_text, ratio_text
from oodlens.evaluate import TRUNCATED_BASELINE, PerplexityResult, perplexity_by_position
from oodlens.policies import lm_infinite, vanilla


def add_arguments(parser) -> None:
    parser.add_argument("--length", type=int, default=None, help="default: 4 × train length")
    parser.add_argument("--vanilla-length", type=int, default=None, help="default: 2 × train length")
    parser.add_argument(
        "--bucket", type=int, default=None, help="position bucket (default: train length / 8)"
    )


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("fig3_perplexity", __doc__.splitlines()[0], add_arguments, argv, windows=4)
    loaded = common.model(settings)
    train = loaded.info.train_length
    length = settings.extra.length or 4 * train
    vanilla_length = min(settings.extra.vanilla_length or 2 * train, length)
    bucket = settings.extra.bucket or max(train // 8, 1)
    ids = common.windows(settings, length)
    long = common.cached(
        settings,
        "long",
        {"length": length, "stored": "per-window"},
        lambda: common.window_nll_frame(
            perplexity_by_position(loaded.model, ids, [lm_infinite()], train_length=train, bucket=bucket)
        ),
    )
    short = common.cached(
        settings,
        "vanilla",
        {"length": vanilla_length, "stored": "per-window"},
        lambda: common.window_nll_frame(
            perplexity_by_position(
                loaded.model,
                ids[:, :vanilla_length],
                [vanilla()],
                train_length=train,
                bucket=bucket,
                truncated_baseline=False,
            )
        ),
    )
    token_nll = {method: common.window_nll(long, method, settings.windows) for method in long}
    # vanilla was run on the first tokens only: NaN beyond, so its buckets there stay empty
    token_nll["vanilla"] = np.concatenate(
        [
            common.window_nll(short, "vanilla", settings.windows),
            np.full((settings.windows, length - vanilla_length), np.nan),
        ],
        axis=1,
    )
    result = PerplexityResult(token_nll, train, length, settings.windows, bucket)
    frame = result.to_dataframe().dropna(subset=["nll"])
    common.save(settings, plotting.plot_perplexity_by_position(frame, train), "fig3_perplexity_by_position")

    rows = []
    for start, end in ((train, 2 * train), (2 * train, 4 * train), (3 * train // 2, 2 * train)):
        if end <= length:
            line = {"tokens": f"{start}-{end}"}
            estimates = {
                method: result.estimate(method, start, end)
                for method in ("vanilla", "lm-infinite", TRUNCATED_BASELINE)
            }
            line |= {method: estimate_text(e.to_dict()) for method, e in estimates.items()}
            for method in ("lm-infinite", "vanilla"):  # on the same windows: a paired interval
                ratio = result.ratio(method, TRUNCATED_BASELINE, start, end)
                line[f"{method} / baseline"] = ratio_text(ratio.to_dict())
            rows.append(line)
    summary = pd.DataFrame(rows)
    common.print_table(f"perplexity ({settings.windows} window(s), train length {train})", summary)
    summary.to_csv(settings.cache / "summary.csv", index=False)
    return summary


if __name__ == "__main__":
    run()

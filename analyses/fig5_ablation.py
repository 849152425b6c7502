"""Figure 5 of the paper: ablation of LM-Infinite's parts on perplexity by position.

Vanilla, window only (sliding window of the pretraining length, no starting tokens), Λ-mask only (starting
tokens + window, distances untouched), distance limit only (ReRoPE-like), and the full LM-Infinite, on the
same windows; only the full method should stay flat beyond the pretraining length. Each perplexity carries
its 95 % bootstrap interval over the windows (default 4), and each method's perplexity beyond L its paired
ratio to LM-Infinite's on the same windows (the figure's bands and error bars, the table's brackets).

    python analyses/fig5_ablation.py
"""

from __future__ import annotations

import common
import pandas as pd

from oodlens import plotting
from oodlens.display import estimate_text, ratio_text
from oodlens.evaluate import PerplexityResult, perplexity_by_position
from oodlens.plotting.base import format_tokens
from oodlens.policies import ABLATIONS, policy_by_name


def add_arguments(parser) -> None:
    parser.add_argument("--length", type=int, default=None, help="default: 1.5 × train length")
    parser.add_argument(
        "--bucket", type=int, default=None, help="position bucket (default: train length / 8)"
    )


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("fig5_ablation", __doc__.splitlines()[0], add_arguments, argv, windows=4)
    loaded = common.model(settings)
    train = loaded.info.train_length
    length = settings.extra.length or 3 * train // 2
    bucket = settings.extra.bucket or max(train // 8, 1)
    ids = common.windows(settings, length)
    policies = [policy_by_name(name) for name in ABLATIONS]
    token_nll = common.cached(
        settings,
        "token_nll",
        {"length": length, "methods": list(ABLATIONS), "stored": "per-window"},
        lambda: common.window_nll_frame(
            perplexity_by_position(
                loaded.model, ids, policies, train_length=train, bucket=bucket, truncated_baseline=False
            )
        ),
    )
    result = PerplexityResult(
        {m: common.window_nll(token_nll, m, settings.windows) for m in token_nll},
        train,
        length,
        settings.windows,
        bucket,
    )
    common.save(settings, plotting.plot_perplexity_by_position(result, train), "fig5_ablation")
    within = f"perplexity within L (0–{format_tokens(train)})"
    beyond = f"perplexity beyond L ({format_tokens(train)}–{format_tokens(length)})"
    estimates = {m: (result.estimate(m, 1, train), result.estimate(m, train, length)) for m in token_nll}
    table = pd.DataFrame(
        [
            {
                "method": m,
                within: estimate_text(inside.to_dict()),
                beyond: estimate_text(outside.to_dict()),
                "beyond L / lm-infinite": ratio_text(result.ratio(m, "lm-infinite", train, length).to_dict()),
            }
            for m, (inside, outside) in estimates.items()
        ]
    )
    common.print_table(
        f"ablation at {length} tokens (train length {train}), {settings.windows} window(s)", table
    )
    bars = pd.DataFrame(
        [
            {"method": m, "metric": metric, "value": e.value, "low": e.low, "high": e.high}
            for m, pair in estimates.items()
            for metric, e in zip((within, beyond), pair, strict=True)
        ]
    )
    common.save(settings, plotting.plot_method_comparison(bars, facet=True), "fig5_ablation_bars")
    table.to_csv(settings.cache / "summary.csv", index=False)
    return table

if __name__ == "__main__":
    run()

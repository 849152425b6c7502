"""Figure 5 of the paper: ablation of LM-Infinite's parts on perplexity by position.

Vanilla, window only (sliding window of the pretraining length, no starting tokens), Λ-mask only (starting
tokens + window, distances untouched), distance limit only (ReRoPE-like), and the full LM-Infinite, on the
same windows; only the full method should stay flat beyond the pretraining length.

    python analyses/fig5_ablation.py
"""

from __future__ import annotations

import common
import pandas as pd

from oodlens import plotting
from oodlens.evaluate import PerplexityResult, perplexity_by_position
from oodlens.plotting.base import format_tokens
from oodlens.policies import POLICIES, policy_by_name


def add_arguments(parser) -> None:
    parser.add_argument("--length", type=int, default=None, help="default: 1.5 × train length")
    parser.add_argument(
        "--bucket", type=int, default=None, help="position bucket (default: train length / 8)"
    )


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("fig5_ablation", __doc__.splitlines()[0], add_arguments, argv)
    loaded = common.model(settings)
    train = loaded.info.train_length
    length = settings.extra.length or 3 * train // 2
    bucket = settings.extra.bucket or max(train // 8, 1)
    ids = common.windows(settings, length)
    policies = [policy_by_name(name) for name in POLICIES]
    token_nll = common.cached(
        settings,
        "token_nll",
        {"length": length, "methods": list(POLICIES)},
        lambda: pd.DataFrame(
            perplexity_by_position(
                loaded.model, ids, policies, train_length=train, bucket=bucket, truncated_baseline=False
            ).token_nll
        ),
    )
    result = PerplexityResult(
        {m: token_nll[m].to_numpy() for m in token_nll}, train, length, settings.windows, bucket
    )
    common.save(settings, plotting.plot_perplexity_by_position(result, train), "fig5_ablation")
    within = f"perplexity within L (0–{format_tokens(train)})"
    beyond = f"perplexity beyond L ({format_tokens(train)}–{format_tokens(length)})"
    table = pd.DataFrame(
        [
            {"method": m, within: result.ppl(m, 1, train), beyond: result.ppl(m, train, length)}
            for m in token_nll
        ]
    )
    common.print_table(f"ablation at {length} tokens (train length {train})", table)
    comparison = table.melt(id_vars="method", var_name="metric", value_name="value")
    common.save(settings, plotting.plot_method_comparison(comparison, facet=True), "fig5_ablation_bars")
    return table


if __name__ == "__main__":
    run()

"""Table 3 of the paper: quality of text generated after long contexts (BLEU, ROUGE-L against the real
continuation of the corpus), vanilla against LM-Infinite, over ``--windows`` windows of the corpus
(default 4), each score with its 95 % bootstrap interval over the windows.

    python analyses/table3_generation.py --milestones 4096,8192,12288 --new-tokens 64
"""

from __future__ import annotations

import common
import pandas as pd

from oodlens import plotting
from oodlens.display import estimate_text
from oodlens.evaluate import GenerationResult, generation_quality
from oodlens.policies import lm_infinite, vanilla


def add_arguments(parser) -> None:
    parser.add_argument("--milestones", default=None, help="comma-separated (default: L/2, L, 1.5 L)")
    parser.add_argument("--new-tokens", type=int, default=64)


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("table3_generation", __doc__.splitlines()[0], add_arguments, argv, windows=4)
    loaded = common.model(settings)
    train = loaded.info.train_length
    milestones = (
        [int(n) for n in settings.extra.milestones.split(",")]
        if settings.extra.milestones
        else [train // 2, train, 3 * train // 2]
    )
    new_tokens = settings.extra.new_tokens
    ids = common.windows(settings, max(milestones) + new_tokens)
    rows = common.cached(
        settings,
        "rows",
        {"milestones": milestones, "new_tokens": new_tokens},
        lambda: generation_quality(
            loaded.model,
            loaded.tokenizer,
            ids,
            [vanilla(), lm_infinite()],
            milestones=milestones,
            new_tokens=new_tokens,
            train_length=train,
        ).to_dataframe(),
    )
    common.save(settings, plotting.plot_generation_quality(rows, train), "table3_generation")
    intervals = GenerationResult(rows=rows.to_dict("records")).intervals()
    table = pd.DataFrame(
        [
            {"method": method, "milestone": int(milestone)}
            | {metric: estimate_text(estimate) for metric, estimate in scores.items()}
            for method, by_milestone in intervals.items()
            for milestone, scores in by_milestone.items()
        ]
    )
    common.print_table(
        f"generation quality, {new_tokens} new tokens, {settings.windows} windows [95 % bootstrap interval] "
        f"(train length {train})",
        table,
    )
    table.to_csv(settings.cache / "table.csv", index=False)
    return table


if __name__ == "__main__":
    run()

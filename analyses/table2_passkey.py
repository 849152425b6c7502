"""Table 2 of the paper: passkey retrieval accuracy by context length and needle depth.

Vanilla, vanilla with the prompt truncated to the pretraining length (its last L tokens), and LM-Infinite
with its top-k middle tokens (k = 5 from layer 4, as the paper uses for retrieval).

    python analyses/table2_passkey.py --lengths 4096,12288,16384 --depths 0.1,0.5,0.9
"""

from __future__ import annotations

import common
import pandas as pd

from oodlens import plotting
from oodlens.evaluate import PasskeyResult, passkey_retrieval
from oodlens.policies import lm_infinite, vanilla


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default=None, help="comma-separated (default: L/2, 1.5 L)")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=1, help="prompts per cell")
    parser.add_argument("--top-k", type=int, default=5)


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("table2_passkey", __doc__.splitlines()[0], add_arguments, argv)
    loaded = common.model(settings)
    train = loaded.info.train_length
    lengths = (
        [int(n) for n in settings.extra.lengths.split(",")]
        if settings.extra.lengths
        else [train // 2, 3 * train // 2]
        if not settings.quick
        else [400, 500]
    )
    depths = [float(d) for d in settings.extra.depths.split(",")]
    policies = [vanilla(), lm_infinite(top_k=settings.extra.top_k)]
    rows = common.cached(
        settings,
        "rows",
        {
            "lengths": lengths,
            "depths": depths,
            "samples": settings.extra.samples,
            "top_k": settings.extra.top_k,
        },
        lambda: passkey_retrieval(
            loaded.model,
            loaded.tokenizer,
            policies,
            lengths=lengths,
            depths=depths,
            samples_per_cell=settings.extra.samples,
            train_length=train,
            seed=settings.seed,
        ).to_dataframe(),
    )
    result = PasskeyResult(rows=rows.to_dict("records"))
    common.save(settings, plotting.plot_passkey(rows, train), "table2_passkey")
    table = result.accuracy().pivot(index="method", columns="length", values="accuracy")
    common.print_table(f"passkey accuracy (train length {train})", table.reset_index())
    table.to_csv(settings.cache / "accuracy.csv")
    return table


if __name__ == "__main__":
    run()

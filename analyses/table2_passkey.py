"""Table 2 of the paper: passkey retrieval accuracy by context length, with 95 % Wilson intervals.

Vanilla, the truncated baseline (vanilla on the prompt's last L tokens) and LM-Infinite with its top-k
middle tokens (k = 5 from layer 4, as the paper uses for retrieval), at lengths from below the pretraining
length L to 3 L (default L/2, L, 1.5 L, 2 L, 3 L: 4k–24k for SmolLM2), ``--prompts`` per length (default 20)
with their needles at depths spread evenly over the filler ((k + ½) / prompts), each with its own key.
Each length is cached on its own, so a run that stops resumes at the length it was on, and the table and
figure show every length computed so far with the same settings (prompts, top-k, seed), asked for or not
(``--recompute`` draws only the lengths it recomputes): lengths run in separate sessions add up.

    python analyses/table2_passkey.py                             # SmolLM2: hours on 2 cores
    python analyses/table2_passkey.py --lengths 4096,12288 --prompts 6
"""

from __future__ import annotations

import re

import common
import pandas as pd

from oodlens import plotting
from oodlens.display import estimate_text
from oodlens.evaluate import PasskeyResult, passkey_retrieval
from oodlens.policies import lm_infinite, vanilla


def add_arguments(parser) -> None:
    parser.add_argument("--lengths", default=None, help="comma-separated (default: L/2, L, 1.5 L, 2 L, 3 L)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per length (default 20, quick 4)")
    parser.add_argument("--top-k", type=int, default=5)


def spread_depths(n: int) -> list[float]:
    """``n`` needle depths spread evenly over the filler, none at its very ends."""
    return [(k + 0.5) / n for k in range(n)]


def stored_lengths(settings, params) -> list[int]:
    """The lengths whose rows are cached with ``params(length)``: those a run with these settings reuses."""
    names = (path.stem.removeprefix("rows-") for path in settings.cache.glob("rows-*.json"))
    lengths = [int(name) for name in names if re.fullmatch(r"[0-9]+", name)]
    return [length for length in lengths if common.is_stored(settings, f"rows-{length}", params(length))]


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse("table2_passkey", __doc__.splitlines()[0], add_arguments, argv)
    loaded = common.model(settings)
    train = loaded.info.train_length
    lengths = (
        [int(n) for n in settings.extra.lengths.split(",")]
        if settings.extra.lengths
        else [400, 500]
        if settings.quick
        else [train // 2, train, 3 * train // 2, 2 * train, 3 * train]
    )
    prompts = settings.extra.prompts or settings.scale(20, 4)
    if prompts < 1:
        raise SystemExit(f"--prompts must be at least 1, got {prompts}")
    depths = spread_depths(prompts)
    policies = [vanilla(), lm_infinite(top_k=settings.extra.top_k)]
    def params(length: int) -> dict:
        return {"length": length, "depths": depths, "top_k": settings.extra.top_k}

    frames = []
    for length in sorted(set(lengths) | set(stored_lengths(settings, params))):
        frames.append(
            common.cached(
                settings,
                f"rows-{length}",
                params(length),
                lambda length=length: passkey_retrieval(
                    loaded.model,
                    loaded.tokenizer,
                    policies,
                    lengths=[length],
                    depths=depths,
                    train_length=train,
                    seed=settings.seed,
                ).to_dataframe(),
            )
        )
    rows = pd.concat(frames, ignore_index=True)
    result = PasskeyResult(rows=rows.to_dict("records"))
    common.save(settings, plotting.plot_passkey(rows, train), "table2_passkey")
    cells = {
        method: {int(length): estimate_text(estimate, count=True) for length, estimate in lengths.items()}
        for method, lengths in result.intervals().items()
    }
    table = pd.DataFrame(cells).T
    common.print_table(
        f"passkey: correct/n [95 % Wilson interval], {prompts} prompts per length (train length {train})",
        table.reset_index(names="method"),
    )
    table.to_csv(settings.cache / "accuracy.csv", index_label="method")
    return table


if __name__ == "__main__":
    run()

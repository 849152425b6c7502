"""Streaming a million tokens through LM-Infinite and StreamingLLM: perplexity and peak memory per 64k bucket.

The embedded corpus, trimmed to a whole number of ``--bucket`` tokens, is repeated end to end up to
``--tokens`` (default 1,000,000) and fed ``--chunk`` tokens at a time through each method's bounded cache
(``streaming_perplexity``). Every copy of the corpus is the same text, so with a window shorter than one
copy each copy after the first is scored from the same context at ever larger positions: equal perplexity
copy after copy means nothing drifts as the stream grows. Peak memory (this process's resident set on a
CPU, the allocator's peak on a GPU) is kept per bucket. Each method is cached on its own, so a run that
stops resumes at the method it was on.

    python analyses/streaming_1m.py                          # SmolLM2: about 100 min per method on 2 cores
    python analyses/streaming_1m.py --methods lm-infinite    # one method
    python analyses/streaming_1m.py --quick                  # tiny random model, seconds
"""

from __future__ import annotations

import common
import pandas as pd

from oodlens import plotting
from oodlens.data import DEFAULT_CORPUS, corpus_tokens, load_corpus
from oodlens.evaluate import cycle_tokens, streaming_perplexity
from oodlens.policies import policy_by_name
from oodlens.stats import perplexity_interval

DISPLAY_BUCKET = 65_536


def add_arguments(parser) -> None:
    parser.add_argument("--methods", default="lm-infinite,streaming-llm")
    parser.add_argument("--tokens", type=int, default=None, help="stream length (default 1,000,000)")
    parser.add_argument(
        "--chunk", type=int, default=None, help="tokens per forward (default 1,024, quick 16)"
    )
    parser.add_argument(
        "--bucket", type=int, default=None, help="measurement bucket (default 4,096, quick 64)"
    )


def copies(frame: pd.DataFrame, copy_length: int) -> pd.DataFrame:
    """Perplexity and peak memory per copy of the corpus: buckets pooled by their tokens, with the bootstrap
    interval over the copy's buckets (``ppl_low``, ``ppl_high``, ``n_buckets``); memory the max."""
    frame = frame.assign(copy=frame["start"] // copy_length)
    rows = []
    for (method, copy), buckets in frame.groupby(["method", "copy"], sort=False):
        ppl, low, high, n = perplexity_interval(buckets["nll"], buckets["n_tokens"])
        tokens = int(buckets["n_tokens"].sum())
        rows.append(
            {
                "method": method,
                "copy": copy,
                "n_tokens": tokens,
                "peak_memory_gib": buckets["peak_memory_gib"].max(),
                "ppl": ppl,
                "ppl_low": low,
                "ppl_high": high,
                "n_buckets": n,
                "ms_per_token": 1000 * buckets["seconds"].sum() / tokens,
            }
        )
    return pd.DataFrame(rows)


def run(argv: list[str] | None = None) -> pd.DataFrame:
    settings = common.parse(
        "streaming_1m", __doc__.splitlines()[0], add_arguments, argv, reuse_memory=False
    )
    loaded = common.model(settings)
    bucket = settings.extra.bucket or settings.scale(4096, 64)
    tokens = settings.extra.tokens or settings.scale(1_000_000, 3_000)
    chunk = settings.extra.chunk or settings.scale(1024, 16)
    corpus = corpus_tokens(load_corpus(DEFAULT_CORPUS), loaded.tokenizer)
    corpus = corpus[: settings.scale(corpus.numel(), 1_000) // bucket * bucket]  # copies end on a bucket
    device = loaded.model.get_output_embeddings().weight.device.type
    frames = []
    for name in settings.extra.methods.split(","):
        policy = policy_by_name(name)
        frame = common.cached(
            settings,
            name,
            # memory and seconds are the device's: a CPU's result never stands for a GPU's
            {"tokens": tokens, "chunk": chunk, "bucket": bucket, "copy": corpus.numel(), "device": device},
            lambda policy=policy: streaming_perplexity(
                loaded.model,
                cycle_tokens(corpus, tokens),
                policy,
                train_length=loaded.info.train_length,
                chunk=chunk,
                bucket=bucket,
                max_tokens=tokens,
            ).to_dataframe(),
        )
        frames.append(frame.assign(method=name))
    frame = pd.concat(frames, ignore_index=True)
    display = max(DISPLAY_BUCKET // bucket, 1) * bucket if not settings.quick else 8 * bucket
    figure = plotting.plot_streaming(frame, display, loaded.info.train_length)
    common.save(settings, figure, "streaming_1m")
    table = copies(frame, corpus.numel())
    common.print_table(f"per copy of the corpus ({corpus.numel():,} tokens)", table)
    table.to_csv(settings.cache / "copies.csv", index=False)
    return table


if __name__ == "__main__":
    run()

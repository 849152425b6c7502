"""The main job: ``python -m oodlens.probe`` — diagnose a model beyond its training length, before and after
the fix, and write a report folder.

A thin command line over one function, :func:`run_probe`, which returns a :class:`ProbeResult`; the folder is
written by :func:`oodlens.report.write_report` (schema in ``docs/report-schema.md``).

Per method (default ``vanilla`` and ``lm-infinite``), on the same token windows:

1. one forward per window that captures the three OOD factors (logits by distance, entropy by position,
   starting-token hidden states) *and* scores every token (perplexity by position), plus the content-matched
   baseline ``vanilla-truncated`` (context cut to the training length);
2. passkey retrieval over lengths × depths;
3. generation quality after long context (BLEU, ROUGE-L against the real continuation);
4. optionally, streaming perplexity through LM-Infinite's bounded cache, far past what one forward holds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .capture import CaptureConfig, Diagnosis, capture, json_ready, runtime_versions
from .data import corpus_tokens, load_corpus, token_windows
from .errors import OodlensError
from .evaluate import (
    TRUNCATED_BASELINE,
    GenerationResult,
    PasskeyResult,
    PerplexityResult,
    StreamingResult,
    cycle_tokens,
    estimate_forward_memory,
    generation_quality,
    passkey_retrieval,
    sequence_nll,
    streaming_perplexity,
    truncated_sequence_nll,
)
from .models import DEFAULT_MODEL, DEVICES, DTYPES, LoadedModel, ModelInfo, load_model
from .policies import POLICIES, Policy, lm_infinite, policy_by_name
from .theory import TheoryReport, check_theory


@dataclass
class ProbeConfig:
    """Everything a probe run depends on (``None`` lengths resolve against the model's training length)."""

    model: str = DEFAULT_MODEL
    corpus: str = "python-docs"
    length: int | None = None  # default 1.5 × training length
    methods: tuple[str, ...] = ("vanilla", "lm-infinite")
    windows: int = 1
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    train_length: int | None = None
    join_documents: bool = True
    n_global: int = 10
    top_k: int = 0
    bucket: int = 1024
    query_stride: int | None = None
    passkey: bool = True
    passkey_lengths: tuple[int, ...] | None = None  # default: (length,)
    passkey_depths: tuple[float, ...] = (0.5,)
    passkey_samples: int = 1
    generation: bool = True
    milestones: tuple[int, ...] | None = None  # default: (length - new_tokens,)
    new_tokens: int = 32
    stream_tokens: int = 0
    progress: bool = True

    def resolved(self, train_length: int) -> ProbeConfig:
        """A copy with every default length filled in and every value checked."""
        length = self.length if self.length is not None else int(1.5 * train_length)
        for label, value in (
            ("--length", length),
            ("--windows", self.windows),
            ("--bucket", self.bucket),
            ("--new-tokens", self.new_tokens),
        ):
            if value <= 0:
                raise OodlensError(f"{label} must be a positive number, got {value}")
        if not self.methods:
            raise OodlensError("--methods is empty; name at least one of " + ", ".join(POLICIES))
        for method in self.methods:
            policy_by_name(method)  # raises with the list of known names
        passkey_lengths = self.passkey_lengths or (length,)
        milestones = self.milestones or (max(1, length - self.new_tokens),)
        if any(m + self.new_tokens > length for m in milestones):
            raise OodlensError(
                f"a generation milestone plus --new-tokens ({self.new_tokens}) exceeds --length {length}; "
                "use smaller milestones"
            )
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise OodlensError("--passkey-depths must lie in [0, 1]")
        if self.stream_tokens < 0:
            raise OodlensError("--stream-tokens must be ≥ 0 (0 turns streaming off)")
        return ProbeConfig(
            **{
                **asdict(self),
                "length": length,
                "passkey_lengths": tuple(passkey_lengths),
                "milestones": tuple(milestones),
                "methods": tuple(self.methods),
            }
        )

    def policies(self) -> list[Policy]:
        """The methods as policies, LM-Infinite with this run's ``n_global`` and ``top_k``."""
        return [
            lm_infinite(n_global=self.n_global, top_k=self.top_k)
            if name == "lm-infinite"
            else policy_by_name(name)
            for name in self.methods
        ]


@dataclass
class ProbeResult:
    """What a probe run found; :func:`oodlens.report.write_report` turns it into a folder."""

    config: ProbeConfig
    info: ModelInfo
    diagnoses: dict[str, Diagnosis]
    theory: dict[str, TheoryReport]
    perplexity: PerplexityResult
    passkey: PasskeyResult | None
    generation: GenerationResult | None
    streaming: StreamingResult | None
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def train_length(self) -> int:
        return self.info.train_length

    def method_summary(self, method: str) -> dict[str, Any]:
        """The per-method block of ``summary.json``."""
        ppl = self.perplexity.summary()["methods"].get(method, {})
        block: dict[str, Any] = {
            "perplexity_by_position": ppl.get("buckets", []),
            "ppl_within_train_length": ppl.get("ppl_within_train_length"),
            "ppl_beyond_train_length": ppl.get("ppl_beyond_train_length"),
        }
        if method in self.diagnoses:
            block["diagnosis"] = json_ready(self.diagnoses[method].summary())
            block["theory"] = json_ready(self.theory[method].summary())
        if self.passkey is not None:
            block["passkey"] = self.passkey.summary().get(method, {})
        if self.generation is not None:
            block["generation"] = self.generation.summary().get(method, {})
        return block

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json`` (schema in ``docs/report-schema.md``)."""
        methods = {name: self.method_summary(name) for name in self.perplexity.token_nll}
        for name, reason in self.skipped.items():
            methods[name] = {"skipped": reason}
        return {
            "schema_version": 1,
            "model": self.info.name,
            "model_info": self.info.to_dict(),
            "train_length": self.train_length,
            "length": self.config.length,
            "corpus": self.config.corpus,
            "n_windows": self.config.windows,
            "seed": self.config.seed,
            "config": json_ready(asdict(self.config)),
            "versions": runtime_versions(),
            "seconds": round(self.seconds, 1),
            "methods": methods,
            "streaming": None if self.streaming is None else json_ready(self.streaming.summary()),
            "warnings": self.warnings,
            "verdict": self.verdict(),
        }

    def verdict(self) -> str:
        """One paragraph: where vanilla breaks and whether the fix held."""
        return _verdict(self)


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "∞" if value is not None and value > 0 else "n/a"
    return f"{value:.3g}" if value < 1e4 else f"{value:.2e}"


def _verdict(result: ProbeResult) -> str:
    train, length = result.train_length, result.config.length
    parts = []
    if length <= train:
        parts.append(
            f"The run stays within the pretraining length ({train} tokens), so nothing is out of "
            "distribution and all methods should agree."
        )
    ppl = result.perplexity
    methods = list(ppl.token_nll)
    baseline = TRUNCATED_BASELINE if TRUNCATED_BASELINE in methods else None
    if "vanilla" in methods and length > train:
        within, beyond = ppl.ppl("vanilla", 1, train), ppl.ppl("vanilla", train, length)
        first_bad = next(
            (
                row
                for row in ppl.to_dataframe().query("method == 'vanilla'").itertuples()
                if row.start >= train and row.ppl > 2 * within
            ),
            None,
        )
        verdict = (
            "it holds up"
            if first_bad is None
            else (
                f"it breaks: its perplexity first exceeds twice the in-distribution value at tokens "
                f"{first_bad.start}–{first_bad.end}"
            )
        )
        parts.append(
            f"Vanilla attention has perplexity {_fmt(within)} within the pretraining length and "
            f"{_fmt(beyond)} beyond it; {verdict}."
        )
    for method in methods:
        if method in ("vanilla", TRUNCATED_BASELINE) or length <= train:
            continue
        beyond = ppl.ppl(method, train, length)
        sentence = f"{method} has perplexity {_fmt(beyond)} beyond the pretraining length"
        if baseline:
            reference = ppl.ppl(baseline, train, length)
            ratio = beyond / reference if reference and math.isfinite(reference) else math.nan
            held = ratio <= 1.10
            sentence += (
                f", {_fmt(ratio)}× the content-matched baseline with truncated context ({_fmt(reference)}): "
                f"{'the fix held' if held else 'the fix did not fully hold'}"
            )
        parts.append(sentence + ".")
    for method, diagnosis in result.diagnoses.items():
        summary = diagnosis.summary()
        within, beyond = summary.get("max_logit_within"), summary.get("max_logit_beyond")
        ent_in, ent_out = summary.get("entropy_within"), summary.get("entropy_beyond")
        if beyond is not None and math.isfinite(beyond):
            parts.append(
                f"[{method}] max attention logit {_fmt(within)} within vs {_fmt(beyond)} beyond; mean "
                f"entropy {_fmt(ent_in)} vs {_fmt(ent_out)} nats."
            )
    if result.passkey is not None:
        acc = result.passkey.summary()
        parts.append(
            "Passkey accuracy: "
            + "; ".join(
                f"{m} " + ", ".join(f"{k}: {_fmt(v)}" for k, v in by_len.items()) for m, by_len in acc.items()
            )
            + "."
        )
    for method, reason in result.skipped.items():
        parts.append(f"{method} was skipped: {reason}")
    return " ".join(parts)


def _available_memory(device: torch.device) -> int | None:
    """Bytes the forward may use: free GPU memory, or MemAvailable on Linux; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(
    info: ModelInfo, length: int, policies: list[Policy], device: torch.device, resident_bytes: int = 0
) -> None:
    """Refuse a run that would not fit, saying which length would.

    Args:
        resident_bytes: memory the loaded model already holds (counted in the estimate, gone from "available").
    """
    available = _available_memory(device)
    if available is None:
        return
    dtype_bytes = torch.finfo(getattr(torch, info.dtype)).bits // 8

    def need(n: int) -> int:
        return (
            max(estimate_forward_memory(info, n, dtype_bytes=dtype_bytes, policy=p) for p in policies)
            - resident_bytes
        )

    if need(length) <= available:
        return
    fits = length
    while fits > 256 and need(fits) > available:
        fits = int(fits * 0.8)
    raise OodlensError(
        f"a {length}-token forward needs about {need(length) / 2**30:.1f} GiB more but only "
        f"{available / 2**30:.1f} GiB is available on {device}; try --length {fits} or a smaller model/dtype"
    )


def _score_and_diagnose(
    loaded: LoadedModel, windows: torch.Tensor, policy: Policy, cfg: ProbeConfig
) -> tuple[np.ndarray, Diagnosis]:
    """One forward per window that both captures the diagnosis and scores every token."""
    capture_config = (
        CaptureConfig() if cfg.query_stride is None else CaptureConfig(query_stride=cfg.query_stride)
    )
    total = np.zeros(windows.shape[1], dtype=np.float64)
    with capture(loaded.model, policy, capture_config, loaded.info.train_length, loaded.info.name) as session:
        for window in tqdm(
            windows, desc=f"{policy.name}: diagnose + score", disable=not cfg.progress, leave=False
        ):
            total += sequence_nll(loaded.model, window).numpy()
    return (total / windows.shape[0]).astype(np.float32), session.result()


def _truncated_nll(loaded: LoadedModel, windows: torch.Tensor, cfg: ProbeConfig) -> np.ndarray:
    total = np.zeros(windows.shape[1], dtype=np.float64)
    for window in tqdm(windows, desc="vanilla-truncated: score", disable=not cfg.progress, leave=False):
        total += truncated_sequence_nll(loaded.model, window, loaded.info.train_length).numpy()
    return (total / windows.shape[0]).astype(np.float32)


def run_probe(
    config: ProbeConfig, *, loaded: LoadedModel | None = None, log: Callable[[str], None] = print
) -> ProbeResult:
    """Run every evaluation of a probe; see the module docstring. Returns the result (nothing is written).

    Args:
        config: the run's settings.
        loaded: an already loaded model (else ``config.model`` is loaded).
        log: where progress messages go.
    """
    started = time.perf_counter()
    if loaded is None:
        log(f"loading {config.model} …")
        loaded = load_model(
            config.model, device=config.device, dtype=config.dtype, train_length=config.train_length
        )
    if config.train_length is not None and config.train_length != loaded.info.train_length:
        loaded = LoadedModel(
            loaded.model,
            loaded.tokenizer,
            replace(loaded.info, train_length=config.train_length, train_length_source="user"),
        )
    info = loaded.info
    cfg = config.resolved(info.train_length)
    notes: list[str] = []
    if cfg.length <= info.train_length:
        notes.append(
            f"--length {cfg.length} is within the pretraining length {info.train_length}: nothing is out "
            "of distribution; use a longer --length to see the factors"
        )
        warnings.warn(notes[-1], stacklevel=2)
    corpus = load_corpus(cfg.corpus)
    windows = token_windows(
        corpus,
        loaded.tokenizer,
        cfg.length,
        n_windows=cfg.windows,
        seed=cfg.seed,
        join_documents=cfg.join_documents,
    )
    policies = cfg.policies()
    device = next(loaded.model.parameters()).device
    resident = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    check_memory(info, cfg.length, policies, device, resident)

    runnable, skipped = [], {}
    for policy in policies:
        if policy.name != "vanilla" and info.position_encoding != "rope":
            skipped[policy.name] = (
                f"the model uses {info.position_encoding} position encoding; {policy.name} "
                "needs rotary position embeddings (the diagnosis still runs under vanilla)"
            )
            log(f"skipping {policy.name}: {skipped[policy.name]}")
        else:
            runnable.append(policy)

    token_nll, diagnoses, theory = {}, {}, {}
    for policy in runnable:
        log(f"[{policy.name}] diagnosis and perplexity on {cfg.windows} × {cfg.length} tokens")
        token_nll[policy.name], diagnoses[policy.name] = _score_and_diagnose(loaded, windows, policy, cfg)
        theory[policy.name] = check_theory(diagnoses[policy.name])
    if cfg.length > info.train_length:
        log(f"[{TRUNCATED_BASELINE}] content-matched baseline (context ≤ {info.train_length})")
        token_nll[TRUNCATED_BASELINE] = _truncated_nll(loaded, windows, cfg)
    perplexity = PerplexityResult(token_nll, info.train_length, cfg.length, cfg.windows, cfg.bucket)

    passkey = None
    if cfg.passkey:
        log(f"passkey retrieval at lengths {list(cfg.passkey_lengths)} × depths {list(cfg.passkey_depths)}")
        passkey = passkey_retrieval(
            loaded.model,
            loaded.tokenizer,
            runnable,
            lengths=cfg.passkey_lengths,
            depths=cfg.passkey_depths,
            samples_per_cell=cfg.passkey_samples,
            train_length=info.train_length,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    generation = None
    if cfg.generation:
        log(f"generation quality after {list(cfg.milestones)} tokens ({cfg.new_tokens} new tokens)")
        generation = generation_quality(
            loaded.model,
            loaded.tokenizer,
            windows[:1],
            runnable,
            milestones=cfg.milestones,
            new_tokens=cfg.new_tokens,
            train_length=info.train_length,
            progress=cfg.progress,
        )
    streaming = None
    streamable = [p for p in runnable if p.window is not None or p.name == "lm-infinite"]
    if cfg.stream_tokens and streamable:
        log(
            f"streaming perplexity over {cfg.stream_tokens} tokens with {streamable[-1].name}'s bounded cache"
        )
        corpus_ids = corpus_tokens(corpus, loaded.tokenizer)
        streaming = streaming_perplexity(
            loaded.model,
            cycle_tokens(corpus_ids, cfg.stream_tokens),
            streamable[-1],
            train_length=info.train_length,
            max_tokens=cfg.stream_tokens,
            progress=cfg.progress,
        )
    elif cfg.stream_tokens:
        notes.append("--stream-tokens needs a method with a bounded cache (lm-infinite or window); skipped")

    return ProbeResult(
        cfg,
        info,
        diagnoses,
        theory,
        perplexity,
        passkey,
        generation,
        streaming,
        skipped,
        notes,
        time.perf_counter() - started,
    )


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _number_list(cast: type) -> Callable[[str], tuple]:
    """An argparse type for comma-separated numbers of type ``cast``."""

    def parse(text: str) -> tuple:
        try:
            return tuple(cast(part) for part in text.split(",") if part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {cast.__name__}s, got {text!r}") from None

    return parse


_int_list, _float_list = _number_list(int), _number_list(float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m oodlens.probe",
        description="Diagnose a language model beyond its pretraining length, before and after LM-Infinite, "
        "and write a report folder (summary.json, figures, report.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = ProbeConfig()
    run = parser.add_argument_group("what to run")
    run.add_argument(
        "--model",
        default=d.model,
        help="'smollm2' (embedded SmolLM2-135M-Instruct), a .gguf file, a model folder, "
        "'tiny:<family>' (random test model) or a hub id",
    )
    run.add_argument(
        "--corpus",
        default=d.corpus,
        help="'python-docs' (embedded), a text file, a folder of "
        "text files, or hf:<dataset>[:<split>] (local copy)",
    )
    run.add_argument(
        "--length", type=int, default=None, help="tokens per window (default: 1.5 × pretraining length)"
    )
    run.add_argument(
        "--methods", default=",".join(d.methods), help=f"comma-separated methods from: {', '.join(POLICIES)}"
    )
    run.add_argument("--windows", type=int, default=d.windows, help="token windows to average over")
    run.add_argument("--seed", type=int, default=d.seed, help="seed for window offsets and passkeys")
    run.add_argument(
        "--join-documents",
        action=argparse.BooleanOptionalAction,
        default=d.join_documents,
        help="concatenate the corpus's documents so windows may span several",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--device", default=d.device, help=f"{' | '.join(DEVICES)} | cuda:N")
    model.add_argument("--dtype", default=d.dtype, help=f"auto | {' | '.join(DTYPES)}")
    model.add_argument(
        "--train-length", type=int, default=None, help="pretraining length (default: from the model)"
    )
    fix = parser.add_argument_group("LM-Infinite")
    fix.add_argument("--n-global", type=int, default=d.n_global, help="starting tokens kept visible")
    fix.add_argument("--top-k", type=int, default=d.top_k, help="top-k middle tokens per head (0: off)")
    evals = parser.add_argument_group("evaluations")
    evals.add_argument("--bucket", type=int, default=d.bucket, help="position bucket width for perplexity")
    evals.add_argument(
        "--query-stride",
        type=int,
        default=None,
        help="sample every k-th query for the logit-by-distance statistics (1: every query)",
    )
    evals.add_argument(
        "--passkey", action=argparse.BooleanOptionalAction, default=d.passkey, help="run passkey retrieval"
    )
    evals.add_argument(
        "--passkey-lengths", type=_int_list, default=None, help="prompt lengths (default: --length)"
    )
    evals.add_argument(
        "--passkey-depths", type=_float_list, default=d.passkey_depths, help="needle depths in [0, 1]"
    )
    evals.add_argument("--passkey-samples", type=int, default=d.passkey_samples, help="prompts per cell")
    evals.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=d.generation,
        help="score generation after long context (BLEU, ROUGE-L)",
    )
    evals.add_argument(
        "--milestones",
        type=_int_list,
        default=None,
        help="context lengths before generating (default: --length minus --new-tokens)",
    )
    evals.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per milestone")
    evals.add_argument(
        "--stream-tokens",
        type=int,
        default=d.stream_tokens,
        help="streaming perplexity over this many tokens through LM-Infinite's bounded cache "
        "(the corpus repeats as needed; 0: off; 1000000+ works in constant memory)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="runs/probe", help="output folder")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> ProbeConfig:
    return ProbeConfig(
        model=args.model,
        corpus=args.corpus,
        length=args.length,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        windows=args.windows,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        train_length=args.train_length,
        join_documents=args.join_documents,
        n_global=args.n_global,
        top_k=args.top_k,
        bucket=args.bucket,
        query_stride=args.query_stride,
        passkey=args.passkey,
        passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths,
        passkey_samples=args.passkey_samples,
        generation=args.generation,
        milestones=args.milestones,
        new_tokens=args.new_tokens,
        stream_tokens=args.stream_tokens,
        progress=not args.no_progress,
    )


def print_summary(result: ProbeResult, folder: Path) -> None:
    table = result.perplexity.summary()["methods"]
    print(
        f"\n{result.info.name}: pretraining length {result.train_length}, {result.config.windows} × "
        f"{result.config.length} tokens of {result.config.corpus}, {result.seconds:.0f} s"
    )
    print(f"{'method':20s} {'ppl ≤ train':>12s} {'ppl > train':>12s}")
    for method, block in table.items():
        print(
            f"{method:20s} {_fmt(block['ppl_within_train_length']):>12s} "
            f"{_fmt(block['ppl_beyond_train_length']):>12s}"
        )
    print("\n" + result.verdict())
    print(f"\nreport: {folder / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    """Run the probe from the command line; returns the exit code (2 for a user mistake)."""
    from .report import prepare_output, write_report

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        folder = prepare_output(Path(args.out), overwrite=args.overwrite)
        result = run_probe(config)
        write_report(result, folder, overwrite=True)
    except OodlensError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print_summary(result, folder)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

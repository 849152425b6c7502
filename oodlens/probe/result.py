"""What a probe run found: :class:`ProbeResult`, its ``summary.json`` content, and its verdict worded from
the numbers (with the one number format of reports)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..capture import Diagnosis
from ..evaluate import TRUNCATED_BASELINE, GenerationResult, PasskeyResult, PerplexityResult, StreamingResult
from ..models import ModelInfo
from ..storage import json_ready, runtime_versions
from ..theory import TheoryReport
from .config import ProbeConfig


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
        return verdict(self)


def format_number(value: float | int | None) -> str:
    """A number as reports show it: 3 significant digits, scientific from 10⁴, ∞ for overflow, – for none."""
    if value is None:
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not math.isfinite(value):
        return "∞" if value > 0 else ("n/a" if math.isnan(value) else "-∞")
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def verdict(result: ProbeResult) -> str:
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
        outcome = (
            "it holds up"
            if first_bad is None
            else (
                f"it breaks: its perplexity first exceeds twice the in-distribution value at tokens "
                f"{first_bad.start}–{first_bad.end}"
            )
        )
        parts.append(
            f"Vanilla attention has perplexity {format_number(within)} within the pretraining length and "
            f"{format_number(beyond)} beyond it; {outcome}."
        )
    for method in methods:
        if method in ("vanilla", TRUNCATED_BASELINE) or length <= train:
            continue
        beyond = ppl.ppl(method, train, length)
        sentence = f"{method} has perplexity {format_number(beyond)} beyond the pretraining length"
        if baseline:
            reference = ppl.ppl(baseline, train, length)
            ratio = beyond / reference if reference and math.isfinite(reference) else math.nan
            held = ratio <= 1.10
            sentence += (
                f", {format_number(ratio)}× the content-matched baseline with truncated context ({format_number(reference)}): "
                f"{'the fix held' if held else 'the fix did not fully hold'}"
            )
        parts.append(sentence + ".")
    for method, diagnosis in result.diagnoses.items():
        summary = diagnosis.summary()
        within, beyond = summary.get("max_logit_within"), summary.get("max_logit_beyond")
        ent_in, ent_out = summary.get("entropy_within"), summary.get("entropy_beyond")
        if beyond is not None and math.isfinite(beyond):
            parts.append(
                f"[{method}] max attention logit {format_number(within)} within vs {format_number(beyond)} beyond; mean "
                f"entropy {format_number(ent_in)} vs {format_number(ent_out)} nats."
            )
    if result.passkey is not None:
        acc = result.passkey.summary()
        parts.append(
            "Passkey accuracy: "
            + "; ".join(
                f"{m} " + ", ".join(f"{k}: {format_number(v)}" for k, v in by_len.items())
                for m, by_len in acc.items()
            )
            + "."
        )
    for method, reason in result.skipped.items():
        parts.append(f"{method} was skipped: {reason}")
    return " ".join(parts)

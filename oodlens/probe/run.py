"""One probe run: :func:`run_probe` loads (or takes) a model, runs every evaluation for every method on the
same windows, and returns a :class:`ProbeResult`; nothing is written here (see :mod:`.report`).

Per method (default ``vanilla`` and ``lm-infinite``), on the same token windows:

1. one forward per window that captures the three OOD factors (logits by distance, entropy by position,
   starting-token hidden states) *and* scores every token (perplexity by position), plus the content-matched
   baseline ``vanilla-truncated`` (context cut to the training length);
2. passkey retrieval over lengths × depths;
3. generation quality after long context (BLEU, ROUGE-L against the real continuation);
4. optionally, streaming perplexity through a bounded cache, far past what one forward holds;
5. optionally, RULER-style tasks (``--tasks``), every accuracy with its interval.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import CaptureConfig, Diagnosis, capture
from ..data import Corpus, corpus_tokens, load_corpus, passkey_minimum_length, token_windows
from ..errors import OodlensError
from ..evaluate import (
    TRUNCATED_BASELINE,
    GenerationResult,
    PasskeyResult,
    PerplexityResult,
    StreamingResult,
    TaskResult,
    cycle_tokens,
    generation_quality,
    passkey_retrieval,
    sequence_nll,
    streaming_perplexity,
    task_accuracy,
    truncated_sequence_nll,
)
from ..evaluate.budget import check_memory
from ..models import LoadedModel, ModelInfo, load_model, model_revision, parse_model_args
from ..models.anatomy import check_positions
from ..policies import Policy
from ..storage import git_commit
from ..tasks import generate as generate_task
from ..theory import TheoryReport, check_theory
from .config import ProbeConfig
from .result import ProbeResult

log = logging.getLogger("oodlens")


def score_and_diagnose(
    model: nn.Module,
    windows: torch.Tensor,
    policy: Policy,
    *,
    train_length: int | None = None,
    config: CaptureConfig | None = None,
    name: str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, Diagnosis]:
    """One forward per window of ``windows [n, length]`` that both captures the diagnosis and scores every
    token: the NLL of every position of every window ``[n, length]`` (what
    :class:`~oodlens.evaluate.PerplexityResult` averages and resamples for its intervals) and the
    :class:`Diagnosis`."""
    rows = []
    with capture(model, policy, config, train_length, name) as session:
        for window in tqdm(
            windows, desc=f"{policy.name}: diagnose + score", disable=not progress, leave=False
        ):
            rows.append(sequence_nll(model, window).numpy())
    return np.stack(rows).astype(np.float32), session.result()


def truncated_baseline_nll(
    model: nn.Module, windows: torch.Tensor, train_length: int, *, progress: bool = True
) -> np.ndarray:
    """NLL of every position of ``windows [n, length]`` (``[n, length]``) under vanilla with at most
    ``train_length`` tokens of context (:func:`~oodlens.evaluate.truncated_sequence_nll`)."""
    rows = [
        truncated_sequence_nll(model, window, train_length).numpy()
        for window in tqdm(windows, desc=f"{TRUNCATED_BASELINE}: score", disable=not progress, leave=False)
    ]
    return np.stack(rows).astype(np.float32)


def run_probe(config: ProbeConfig, *, loaded: LoadedModel | None = None) -> ProbeResult:
    """Run every evaluation of a probe; see the module docstring. Returns the result (nothing is written).
    Progress goes to the ``oodlens`` logger.

    Args:
        config: the run's settings.
        loaded: an already loaded model (else ``config.model`` is loaded).
    """
    started, date = time.perf_counter(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    config.validate()
    loaded = _with_train_length(loaded or _load(config), config.train_length)
    info = loaded.info
    provenance = {
        "date": date,
        "model_revision": model_revision(info.name, loaded.model),
        "oodlens_commit": git_commit(),
    }
    cfg = config.resolved(info.train_length)
    _check_lengths(loaded, cfg)
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
    for task in cfg.tasks:  # a length too short for a task fails now, not after the long forwards
        for length in cfg.task_lengths:
            generate_task(task, loaded.tokenizer, length, 1, cfg.seed, corpus)
    policies = cfg.policies()
    resident = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    device = next(loaded.model.parameters()).device
    for label, lengths in (
        ("--length", [cfg.length]),
        ("--passkey-lengths", cfg.passkey_lengths if cfg.passkey else []),
        ("--task-lengths", cfg.task_lengths if cfg.tasks else []),
    ):
        for length in lengths:  # every forward the run will make must fit, passkey prompts included
            check_memory(info, length, policies, device, resident, label)
    runnable, skipped = _runnable(policies, info)
    token_nll, diagnoses, theory = _diagnose_and_score(loaded, windows, runnable, cfg)
    notes += [
        f"{name}: {note}" for name, diagnosis in diagnoses.items() for note in diagnosis.meta["non_finite"]
    ]
    perplexity = PerplexityResult(token_nll, info.train_length, cfg.length, cfg.windows, cfg.bucket)
    passkey = _passkey(loaded, runnable, cfg) if cfg.passkey else None
    generation = _generation(loaded, windows, runnable, cfg) if cfg.generation else None
    streaming = _streaming(loaded, corpus, runnable, cfg, notes) if cfg.stream_tokens else None
    tasks = _tasks(loaded, corpus, runnable, cfg) if cfg.tasks else None
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
        provenance,
        tasks,
    )


def _load(config: ProbeConfig) -> LoadedModel:
    log.info("loading %s …", config.model)
    options = parse_model_args(config.model_args)
    return load_model(
        config.model, device=config.device, dtype=config.dtype, train_length=config.train_length, **options
    )


def _with_train_length(loaded: LoadedModel, train_length: int | None) -> LoadedModel:
    """``loaded`` with the run's pretraining length, where the run sets one."""
    if train_length is None or train_length == loaded.info.train_length:
        return loaded
    info = replace(loaded.info, train_length=train_length, train_length_source="user")
    return LoadedModel(loaded.model, loaded.tokenizer, info)


def _check_lengths(loaded: LoadedModel, cfg: ProbeConfig) -> None:
    """Every length the run asks for fits the model's learned position table, if it has one, and every
    passkey prompt fits its intro, needle and question."""
    check_positions(loaded.model, cfg.length, "--length")
    shortest = passkey_minimum_length(loaded.tokenizer) if cfg.passkey else 0
    for length in cfg.passkey_lengths if cfg.passkey else ():
        if length < shortest:
            raise OodlensError(
                f"--passkey-lengths {length} is too short for the passkey prompt: use at least {shortest}"
            )
        check_positions(loaded.model, length, "--passkey-lengths")
    for milestone in cfg.milestones if cfg.generation else ():
        check_positions(loaded.model, milestone + cfg.new_tokens, "a milestone plus --new-tokens")


def _runnable(policies: list[Policy], info: ModelInfo) -> tuple[list[Policy], dict[str, str]]:
    """The policies this model can run, and why each other one is skipped (every fix needs RoPE)."""
    runnable, skipped = [], {}
    for policy in policies:
        if policy.name != "vanilla" and info.position_encoding != "rope":
            skipped[policy.name] = (
                f"the model uses {info.position_encoding} position encoding; {policy.name} "
                "needs rotary position embeddings (the diagnosis still runs under vanilla)"
            )
            log.warning("skipping %s: %s", policy.name, skipped[policy.name])
        else:
            runnable.append(policy)
    return runnable, skipped


def _diagnose_and_score(
    loaded: LoadedModel, windows: torch.Tensor, policies: list[Policy], cfg: ProbeConfig
) -> tuple[dict[str, np.ndarray], dict[str, Diagnosis], dict[str, TheoryReport]]:
    """Per method: NLL per window and position, diagnosis and theory check; plus the truncated baseline's."""
    info = loaded.info
    token_nll, diagnoses, theory = {}, {}, {}
    for policy in policies:
        log.info("[%s] diagnosis and perplexity on %d × %d tokens", policy.name, cfg.windows, cfg.length)
        token_nll[policy.name], diagnoses[policy.name] = score_and_diagnose(
            loaded.model,
            windows,
            policy,
            train_length=info.train_length,
            config=CaptureConfig(query_stride=cfg.query_stride),
            name=info.name,
            progress=cfg.progress,
        )
        theory[policy.name] = check_theory(diagnoses[policy.name])
    if cfg.length > info.train_length:
        log.info("[%s] content-matched baseline (context ≤ %d)", TRUNCATED_BASELINE, info.train_length)
        token_nll[TRUNCATED_BASELINE] = truncated_baseline_nll(
            loaded.model, windows, info.train_length, progress=cfg.progress
        )
    return token_nll, diagnoses, theory


def _passkey(loaded: LoadedModel, policies: list[Policy], cfg: ProbeConfig) -> PasskeyResult:
    log.info(
        "passkey retrieval at lengths %s × depths %s", list(cfg.passkey_lengths), list(cfg.passkey_depths)
    )
    return passkey_retrieval(
        loaded.model,
        loaded.tokenizer,
        policies,
        lengths=cfg.passkey_lengths,
        depths=cfg.passkey_depths,
        samples_per_cell=cfg.passkey_samples,
        train_length=loaded.info.train_length,
        seed=cfg.seed,
        progress=cfg.progress,
    )


def _tasks(loaded: LoadedModel, corpus: Corpus, policies: list[Policy], cfg: ProbeConfig) -> TaskResult:
    log.info(
        "tasks %s at lengths %s, %d prompts each", list(cfg.tasks), list(cfg.task_lengths), cfg.task_samples
    )
    return task_accuracy(
        loaded.model,
        loaded.tokenizer,
        policies,
        cfg.tasks,
        lengths=cfg.task_lengths,
        n_samples=cfg.task_samples,
        seed=cfg.seed,
        train_length=loaded.info.train_length,
        corpus=corpus,
        progress=cfg.progress,
    )


def _generation(
    loaded: LoadedModel, windows: torch.Tensor, policies: list[Policy], cfg: ProbeConfig
) -> GenerationResult:
    log.info("generation quality after %s tokens (%d new tokens)", list(cfg.milestones), cfg.new_tokens)
    return generation_quality(
        loaded.model,
        loaded.tokenizer,
        windows,
        policies,
        milestones=cfg.milestones,
        new_tokens=cfg.new_tokens,
        train_length=loaded.info.train_length,
        progress=cfg.progress,
    )


def _streaming(
    loaded: LoadedModel, corpus: Corpus, policies: list[Policy], cfg: ProbeConfig, notes: list[str]
) -> StreamingResult | None:
    """Streaming perplexity with the last method that decodes with a bounded cache (noted if none does)."""
    bounded = [p for p in policies if p.cache_plan(loaded.info.train_length).bounded]
    if not bounded:
        notes.append(
            "--stream-tokens needs a method with a bounded cache (lm-infinite, lambda or window); skipped"
        )
        return None
    policy = bounded[-1]
    log.info("streaming perplexity over %d tokens with %s's bounded cache", cfg.stream_tokens, policy.name)
    stream = cycle_tokens(corpus_tokens(corpus, loaded.tokenizer), cfg.stream_tokens)
    return streaming_perplexity(
        loaded.model,
        stream,
        policy,
        train_length=loaded.info.train_length,
        max_tokens=cfg.stream_tokens,
        progress=cfg.progress,
    )

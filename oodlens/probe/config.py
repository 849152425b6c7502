"""Everything a probe run depends on: :class:`ProbeConfig`, the one source of the command line's options.

Each field carries its help text and option group; :mod:`.cli` builds the parser from these fields, and a
``--config`` file (JSON or YAML) sets the same fields. :meth:`ProbeConfig.validate` checks every value that
does not depend on the model, before it loads; :meth:`ProbeConfig.resolved` fills the lengths that default
from the model's pretraining length and checks what depends on them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data import DEFAULT_CORPUS
from ..errors import OodlensError, check_count
from ..models import DEFAULT_MODEL, DEVICES, DTYPES, parse_model_args
from ..policies import POLICIES, Policy, check_method, policy_by_name
from ..tasks import RULER_TASKS, TASKS


def option(default: Any, group: str, help: str, *, metavar: str | None = None) -> Any:
    """A field of :class:`ProbeConfig` with what its command-line option says about it."""
    return field(default=default, metadata={"group": group, "help": help, "metavar": metavar})


# By measurement on SmolLM2 (trained at 8,192): at 1.5 × L the largest logit at unseen distances stays below
# the largest within (17.4 vs 20.3), so Factor 1 does not show; at 2 × L it does (docs/results.md).
DEFAULT_LENGTH_FACTOR = 2
RUN, MODEL, FIX, EVALUATIONS, OUTPUT = "what to run", "model", "methods", "evaluations", "output"


@dataclass
class ProbeConfig:
    """The settings of one probe run; ``None`` lengths resolve against the model's pretraining length."""

    model: str = option(
        DEFAULT_MODEL,
        RUN,
        "'smollm2' (embedded SmolLM2-135M-Instruct), a .gguf file, a model folder, 'tiny:<family>' (random "
        "test model) or a hub id",
    )
    corpus: str = option(
        DEFAULT_CORPUS,
        RUN,
        f"'{DEFAULT_CORPUS}' (embedded), a text file, a folder of text files, or hf:<dataset>[:<split>] "
        "(local copy)",
    )
    length: int | None = option(
        None, RUN, "tokens per window (default: 2 × the pretraining length, where all three factors show)"
    )
    methods: tuple[str, ...] = option(
        ("vanilla", "lm-infinite"), RUN, f"comma-separated methods from: {', '.join(POLICIES)}"
    )
    windows: int = option(1, RUN, "token windows to average over")
    seed: int = option(0, RUN, "seed for window offsets and passkeys")
    join_documents: bool = option(True, RUN, "concatenate the corpus's documents so windows may span several")
    device: str = option("auto", MODEL, f"{' | '.join(DEVICES)} | cuda:N")
    dtype: str = option("auto", MODEL, f"auto | {' | '.join(DTYPES)}")
    train_length: int | None = option(None, MODEL, "pretraining length (default: from the model)")
    model_args: str = option(
        "",
        MODEL,
        "from_pretrained options as key=value pairs separated by commas "
        "(lm-evaluation-harness' --model_args), e.g. device_map=auto,revision=main,trust_remote_code=true",
    )
    n_global: int = option(10, FIX, "starting tokens kept visible by the Λ-shaped methods")
    top_k: int = option(0, FIX, "LM-Infinite's top-k middle tokens per head (0: off)")
    bucket: int | None = option(
        None, EVALUATIONS, "position bucket width for perplexity (default: about --length / 12, a power of 2)"
    )
    query_stride: int | None = option(
        None, EVALUATIONS, "sample every k-th query for the logit-by-distance statistics (1: every query)"
    )
    passkey: bool = option(True, EVALUATIONS, "run passkey retrieval")
    passkey_lengths: tuple[int, ...] | None = option(None, EVALUATIONS, "prompt lengths (default: --length)")
    passkey_depths: tuple[float, ...] = option((0.5,), EVALUATIONS, "needle depths in [0, 1]")
    passkey_samples: int = option(1, EVALUATIONS, "prompts per (length, depth)")
    generation: bool = option(True, EVALUATIONS, "score generation after long context (BLEU, ROUGE-L)")
    milestones: tuple[int, ...] | None = option(
        None, EVALUATIONS, "context lengths before generating (default: --length minus --new-tokens)"
    )
    new_tokens: int = option(32, EVALUATIONS, "tokens generated per milestone")
    tasks: tuple[str, ...] = option(
        (),
        EVALUATIONS,
        "RULER-style tasks, comma-separated, from: " + ", ".join([*TASKS, *RULER_TASKS]),
    )
    task_lengths: tuple[int, ...] | None = option(
        None, EVALUATIONS, "task prompt lengths (default: --length)"
    )
    task_samples: int = option(20, EVALUATIONS, "prompts per task and length (needle depths spread evenly)")
    stream_tokens: int = option(
        0,
        EVALUATIONS,
        "streaming perplexity over this many tokens through a bounded cache (the last method that has one; "
        "the corpus repeats as needed; 0: off; 1000000+ runs in constant memory)",
    )
    progress: bool = option(True, OUTPUT, "show progress bars")

    def validate(self) -> ProbeConfig:
        """Check every value that does not need the model (run before it loads); returns ``self``."""
        for name, minimum in (
            ("windows", 1), ("new_tokens", 1), ("passkey_samples", 1), ("task_samples", 1), ("seed", 0)
        ):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name), minimum)
        for name in ("n_global", "top_k"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        for name, minimum in (("length", 2), ("train_length", 2), ("query_stride", 1), ("bucket", 1)):
            if getattr(self, name) is not None:
                check_count(f"--{name.replace('_', '-')}", getattr(self, name), minimum)
        if self.stream_tokens != 0:
            check_count("--stream-tokens (0 turns streaming off)", self.stream_tokens, minimum=2)
        parse_model_args(self.model_args)
        if not self.methods:
            raise OodlensError("--methods is empty; name at least one of " + ", ".join(POLICIES))
        for method in self.methods:
            check_method(method)
        repeated = sorted({method for method in self.methods if self.methods.count(method) > 1})
        if repeated:
            raise OodlensError(f"--methods names {repeated[0]!r} twice: name each method once")
        if any(not 0.0 <= depth <= 1.0 for depth in self.passkey_depths):
            raise OodlensError("--passkey-depths must lie in [0, 1]")
        for length in self.passkey_lengths or ():
            check_count("--passkey-lengths", length, minimum=2)
        if self.passkey and not self.passkey_depths:
            raise OodlensError(
                "--passkey-depths is empty: give at least one depth in [0, 1] (or --no-passkey)"
            )
        if self.passkey and self.passkey_lengths == ():
            raise OodlensError("--passkey-lengths is empty: give at least one length (or leave it out)")
        for task in self.tasks:
            if task not in TASKS and task not in RULER_TASKS:
                raise OodlensError(f"unknown task {task!r}; choose from {', '.join([*TASKS, *RULER_TASKS])}")
        if len(set(self.tasks)) != len(self.tasks):
            raise OodlensError("--tasks names a task twice: name each task once")
        for length in self.task_lengths or ():
            check_count("--task-lengths", length, minimum=2)
        if self.task_lengths == ():
            raise OodlensError("--task-lengths is empty: give at least one length (or leave it out)")
        for milestone in self.milestones or ():
            check_count("--milestones", milestone, minimum=1)
        return self

    def resolved(self, train_length: int) -> ProbeConfig:
        """A copy with every default length filled in and every value checked."""
        self.validate()
        length = self.length if self.length is not None else DEFAULT_LENGTH_FACTOR * train_length
        passkey_lengths = self.passkey_lengths or (length,)
        milestones = self.milestones or (max(1, length - self.new_tokens),)
        if self.generation and any(m + self.new_tokens > length for m in milestones):
            raise OodlensError(
                f"a generation milestone plus --new-tokens ({self.new_tokens}) exceeds --length {length}; "
                "use smaller milestones"
            )
        return ProbeConfig(
            **{
                **asdict(self),
                "length": length,
                "bucket": self.bucket or default_bucket(length),
                "passkey_lengths": tuple(passkey_lengths),
                "task_lengths": tuple(self.task_lengths or (length,)),
                "tasks": tuple(self.tasks),
                "milestones": tuple(milestones),
                "methods": tuple(self.methods),
            }
        )

    def policies(self) -> list[Policy]:
        """The methods as policies, each with this run's ``n_global``, ``top_k`` and length (RoPE scaling's
        target) where it takes them."""
        settings = {"n_global": self.n_global, "top_k": self.top_k, "target_length": self.length}
        return [policy_by_name(name, **settings) for name in self.methods]


def default_bucket(length: int) -> int:
    """About a twelfth of ``length``, rounded to a power of 2 (12,288 tokens → 1,024)."""
    return 2 ** max(0, round(math.log2(length / 12)))

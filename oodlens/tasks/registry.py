"""The task registry (:data:`TASKS`, and RULER's names, :data:`RULER_TASKS`), :func:`generate`, :func:`score`.

The tasks follow NVIDIA's RULER (``scripts/data/synthetic/``, ``synthetic.yaml``; templates from its
``constants.py``) plus LM-Infinite's passkey:

=================  ======================================================================  ============
task               construction                                                            shares prefix
=================  ======================================================================  ============
niah_single        noise haystack, one word key -> 7-digit number (RULER niah_single_1)    yes
niah_multikey      haystack made only of distractor needles; ``value_type="numbers"``      yes
                   (word -> number, niah_multikey_2) or ``"uuids"`` (uuid -> uuid, _3)
niah_essay         a corpus as the haystack; ``variant`` single / multikey / multivalue /  yes
                   multiquery (niah_single_2/_3, niah_multikey_1, niah_multivalue,
                   niah_multiquery)
variable_tracking  noise haystack with a chain "VAR ABCDE = 12345", "VAR X = VAR Y", ...   no
                   and RULER's one in-context example (vt)
common_words       numbered word list, 10 common words x 30, the rest x 3 (cwe)            no
frequent_words     coded words with Zipf counts, answer ranks 2-4 (fwe)                    no
passkey            LM-Infinite's passkey prompt, compatible with ``oodlens.data``          yes
=================  ======================================================================  ============

RULER's own names (``niah_single_1`` ... ``vt``, ``cwe``, ``fwe``) are accepted by :func:`generate` and
:func:`score` too (:data:`RULER_TASKS`).

Sharing. For the tasks marked "yes" the text before the (first) needle is the same for every sample at
one depth, and a prefix of it at any larger depth: the haystack runs in a fixed order and the needle goes
in at ``depth`` of it. ``TaskSample.shared_prefix_tokens`` counts the ids that every sample of the task
at that depth (same tokenizer, length, seed) starts with. vt, cwe and fwe cannot share beyond their
constant head: RULER's vt begins with a randomised in-context example and places its chain at random
lines, and cwe/fwe are shuffled lists.

How prompts are sized: :mod:`.prompt`; each task's deliberate deviations from RULER: :mod:`.needles`,
:mod:`.tracing`, :mod:`.aggregation`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import OodlensError
from .aggregation import common_words, frequent_words
from .retrieval import niah_essay, niah_multikey, niah_single, passkey
from .sample import GROWING_METRICS, METRICS, TaskSample, metric
from .tracing import variable_tracking

if TYPE_CHECKING:
    from ..data import Corpus

TASKS: dict[str, Callable[..., list[TaskSample]]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_essay": niah_essay,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "passkey": passkey,
}

RULER_TASKS: dict[str, tuple[str, dict[str, Any]]] = {  # RULER's task name -> (task, options)
    "niah_single_1": ("niah_single", {}),
    "niah_single_2": ("niah_essay", {"variant": "single"}),
    "niah_single_3": ("niah_essay", {"variant": "single", "value_type": "uuids"}),
    "niah_multikey_1": ("niah_essay", {"variant": "multikey"}),
    "niah_multikey_2": ("niah_multikey", {"value_type": "numbers"}),
    "niah_multikey_3": ("niah_multikey", {"value_type": "uuids"}),
    "niah_multivalue": ("niah_essay", {"variant": "multivalue"}),
    "niah_multiquery": ("niah_essay", {"variant": "multiquery"}),
    "vt": ("variable_tracking", {}),
    "cwe": ("common_words", {}),
    "fwe": ("frequent_words", {}),
}


def generate(
    task: str,
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    corpus: Corpus | None = None,
    **options: Any,
) -> list[TaskSample]:
    """Generate ``n_samples`` prompts of ``task`` (a :data:`TASKS` or :data:`RULER_TASKS` name) for a total of
    ``length`` tokens of ``tokenizer`` (any Hugging Face tokenizer). ``corpus`` is niah_essay's haystack
    (ignored by the other tasks). options: the task function's keywords, e.g. ``depths`` (None: evenly
    spaced over [0, 1] across samples; a number: every sample; a sequence: cycled over samples),
    ``tokens_to_generate``, ``add_bos``, ``value_type``, ``variant``."""
    name, preset = _canonical(task)
    if name == "niah_essay":
        options["corpus"] = corpus
    return TASKS[name](tokenizer, length, n_samples, seed, **{**preset, **options})


def score(task: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction with the metric RULER uses for ``task`` (LM-Infinite's for passkey)."""
    return METRICS[metric(_canonical(task)[0])](prediction, answers)


def settled(task: str, prediction: str, answers: Sequence[str]) -> bool:
    """Whether no further text can change ``prediction``'s score: RULER's string matches only count answers
    found, so a full score is final (generation may stop there without changing any score). A passkey
    answer is never settled early (its first number could still grow)."""
    return metric(_canonical(task)[0]) in GROWING_METRICS and score(task, prediction, answers) == 1.0


def _canonical(task: str) -> tuple[str, dict[str, Any]]:
    if task in TASKS:
        return task, {}
    if task in RULER_TASKS:
        return RULER_TASKS[task]
    raise OodlensError(f"unknown task {task!r}: use one of {sorted(TASKS)} or RULER's {sorted(RULER_TASKS)}")

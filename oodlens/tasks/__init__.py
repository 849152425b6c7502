"""RULER-style synthetic long-context tasks, generated offline for any Hugging Face tokenizer and scored
without a model.

:func:`generate` makes ``n_samples`` prompts of a task (:data:`TASKS`: needle in a haystack, variable
tracking, common and frequent words, passkey; RULER's own names in :data:`RULER_TASKS`) that fill an exact
number of tokens, as :class:`TaskSample` objects; :func:`score` grades a model's output with the task's
metric, and :func:`settled` says when more output could no longer change that score. The registry and the
task table are in :mod:`.registry`; the tasks in :mod:`.retrieval` (on the engine in :mod:`.needles`),
:mod:`.tracing` and :mod:`.aggregation`; the prompt building they share in :mod:`.prompt`."""

from .aggregation import (
    CWE_ANSWER_PREFIX,
    CWE_HEAD,
    CWE_QUESTION,
    FWE_ANSWER_PREFIX,
    FWE_HEAD,
    FWE_NOISE_WORD,
    FWE_QUESTION,
    common_words,
    frequent_words,
)
from .needles import (
    ESSAY_UNIT_WORDS,
    NEEDLE,
    NIAH_ANSWER_PREFIX,
    NIAH_HEAD,
    NIAH_QUESTION,
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
)
from .prompt import DEFAULT_TOKENS_TO_GENERATE, NOISE
from .registry import RULER_TASKS, TASKS, generate, score, settled
from .retrieval import ESSAY_VARIANTS, niah_essay, niah_multikey, niah_single, passkey
from .sample import GROWING_METRICS, METRICS, TaskSample, passkey_match, string_match_all, string_match_part
from .tracing import VT_ANSWER_PREFIX, VT_EXAMPLE_TOKENS, VT_HEAD, VT_QUESTION, variable_tracking

__all__ = [
    "CWE_ANSWER_PREFIX",
    "CWE_HEAD",
    "CWE_QUESTION",
    "DEFAULT_TOKENS_TO_GENERATE",
    "ESSAY_UNIT_WORDS",
    "ESSAY_VARIANTS",
    "FWE_ANSWER_PREFIX",
    "FWE_HEAD",
    "FWE_NOISE_WORD",
    "FWE_QUESTION",
    "GROWING_METRICS",
    "METRICS",
    "NEEDLE",
    "NIAH_ANSWER_PREFIX",
    "NIAH_HEAD",
    "NIAH_QUESTION",
    "NOISE",
    "PASSKEY_ANSWER_PREFIX",
    "PASSKEY_INTRO",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "RULER_TASKS",
    "TASKS",
    "TaskSample",
    "VT_ANSWER_PREFIX",
    "VT_EXAMPLE_TOKENS",
    "VT_HEAD",
    "VT_QUESTION",
    "common_words",
    "frequent_words",
    "generate",
    "niah_essay",
    "niah_multikey",
    "niah_single",
    "passkey",
    "passkey_match",
    "score",
    "settled",
    "string_match_all",
    "string_match_part",
    "variable_tracking",
]

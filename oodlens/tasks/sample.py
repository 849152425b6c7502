"""One generated prompt, :class:`TaskSample`, and the scorers that grade a model's output for it.

The scorers (:data:`METRICS`) are RULER's ``string_match_all`` and ``string_match_part`` and LM-Infinite's
passkey accuracy; each task is graded with one of them (:func:`metric`; :func:`oodlens.tasks.score` looks
it up by task name). Scores are per sample fractions in [0, 1] (RULER reports the batch mean x 100)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import OodlensError


@dataclass
class TaskSample:
    """One generated prompt.

    input_ids: the prompt's token ids (no special tokens unless ``add_bos``), ending with the answer prefix,
    which the model continues. answers: the strings a correct output contains. length: the requested total
    (prompt + max_new_tokens). prompt_tokens: ``len(input_ids)``. max_new_tokens: tokens reserved for the
    output. depth: the requested needle depth in [0, 1] (None for tasks without one). needle_positions:
    index of each inserted needle's first token (the chain statements for vt). shared_prefix_tokens: the
    leading ids every sample of this task at this depth shares (see :mod:`oodlens.tasks.registry`). text:
    the prompt as text. metric: the scorer :func:`oodlens.tasks.score` applies."""

    task: str
    input_ids: list[int]
    answers: list[str]
    length: int
    prompt_tokens: int
    max_new_tokens: int
    answer_prefix: str
    seed: int
    index: int
    depth: float | None
    needle_positions: list[int]
    shared_prefix_tokens: int
    text: str
    metric: str


# --- scoring -------------------------------------------------------------------------------------------


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found in ``prediction`` (case-insensitive substring), as RULER scores."""
    if not answers:
        raise OodlensError("answers is empty: pass the sample's answers (TaskSample.answers)")
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is in ``prediction`` (case-insensitive substring), else 0.0."""
    if not answers:
        raise OodlensError("answers is empty: pass the sample's answers (TaskSample.answers)")
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


def passkey_match(prediction: str, answers: Sequence[str]) -> float:
    """LM-Infinite's passkey accuracy: 1.0 if the first integer in ``prediction`` equals the key."""
    if not answers:
        raise OodlensError("answers is empty: pass the sample's answers (TaskSample.answers)")
    found = re.search(r"\d+", prediction)
    return float(found is not None and int(found.group()) == int(answers[0]))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "passkey_match": passkey_match,
}
# the scorers whose score only grows as a prediction grows (they count answers found in it)
GROWING_METRICS = frozenset({"string_match_all", "string_match_part"})


def metric(task: str) -> str:
    """The name of the scorer in :data:`METRICS` for ``task`` (a :data:`oodlens.tasks.TASKS` name)."""
    return "passkey_match" if task == "passkey" else "string_match_all"

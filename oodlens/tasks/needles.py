"""The needle-in-a-haystack engine: :func:`niah` builds every retrieval task of :mod:`.retrieval`.

A prompt is a head, a haystack run in a fixed order (noise sentences, a corpus's sentences or distractor
needles), the needle(s) at the requested depth, then the question.
``niah_multikey`` fills with whole distractor needles, chosen from a pool so that their lengths add up
exactly; only where every distractor has the same token count (uuids under a byte tokenizer) can it fall
short, by less than one distractor.

Deviations from RULER, all deliberate: needles go in at a requested depth instead of a random one (for
several needles the first sits at ``depth`` and the rest at random places after it); ``niah_multikey``'s
distractors before the needle come from a per-seed stream shared by all samples, those after it are drawn
per sample; keys and values never repeat a distractor's or occur in the essay text, so the needle for a
key is found exactly once; essay sentences are split with a regular expression (not nltk) and sentences
over 64 words cut into pieces; the essay's first sentence follows the head on its own line as in RULER
(any corpus may serve, Python's documentation topics by default)."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import OodlensError
from .prompt import (
    NOISE,
    Encoder,
    Prompt,
    Stream,
    bos_ids,
    check_common,
    code,
    draw,
    draw_new,
    slot_bound,
    template_bound,
    too_short,
)
from .sample import TaskSample

if TYPE_CHECKING:
    from ..data import Corpus

# --- task text (RULER's templates and needle sentences; LM-Infinite's passkey, as in oodlens.data) ------

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_HEAD = (
    "{some} special magic {kind} {are} hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
NIAH_QUESTION = "\nWhat {are_all} the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {kind} for {query} mentioned in the provided text {are}"

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key?"
PASSKEY_ANSWER_PREFIX = " The pass key is"

ESSAY_UNIT_WORDS = 64  # longer sentences are cut into pieces of this many words


# --- needle-in-a-haystack engine (niah_*, passkey) -----------------------------------------------------


@dataclass(frozen=True)
class NeedleSpec:
    """One retrieval task's construction: its haystack, its key and value kinds, how many of each."""

    task: str
    haystack: str  # "noise", "essay", "needle" (distractor needles) or "passkey" (noise joined by spaces)
    key_type: str = "words"
    value_type: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1


def niah(
    spec: NeedleSpec,
    tokenizer: Any,
    length: int,
    n_samples: int,
    seed: int,
    depths: Any,
    tokens_to_generate: int | None,
    add_bos: bool,
    corpus: Corpus | None = None,
) -> list[TaskSample]:
    """``n_samples`` prompts of the task ``spec`` describes (the other arguments as the task functions')."""
    task = spec.task
    length, n_samples, seed, ttg = check_common(task, length, n_samples, seed, tokens_to_generate)
    depth_list = _depths(depths, n_samples)
    encoder = Encoder(tokenizer)
    bos = bos_ids(tokenizer, add_bos)
    budget = length - ttg
    passkey = spec.haystack == "passkey"
    plural = spec.num_queries * spec.num_values > 1
    kind = spec.value_type if plural else spec.value_type[:-1]
    if passkey:
        head = PASSKEY_INTRO
        sep = first_sep = " "
        needle_template = PASSKEY_NEEDLE.replace("{key}", "{value}")
    else:
        head = NIAH_HEAD.format(some="Some" if plural else "A", kind=kind, are="are" if plural else "is")
        sep, first_sep = ("\n", "\n") if spec.haystack != "essay" else (" ", "\n")
        needle_template = NEEDLE.replace("{kind}", spec.value_type)
    head_ids = encoder.start(head)

    def question(query: str) -> tuple[str, str]:
        if passkey:
            return PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX
        forms = {"kind": kind, "query": query, "are": "are" if plural else "is"}
        return (
            NIAH_QUESTION.format(are_all="are all" if plural else "is", **forms),
            NIAH_ANSWER_PREFIX.format(**forms),
        )

    # Upper bounds on what each sample adds, so one haystack prefix serves every sample at a depth.
    key_bound = 0 if passkey else slot_bound(encoder, spec.key_type)
    value_bound = slot_bound(encoder, spec.value_type)
    needle_bound = template_bound(encoder, sep + needle_template, {"key": key_bound, "value": value_bound})
    query_bound = spec.num_queries * (key_bound + 2)
    question_bound = sum(
        template_bound(encoder, part, {"query": query_bound}) for part in question("{query}")
    )
    n_needles = spec.num_keys * spec.num_values
    reserve = n_needles * needle_bound + question_bound
    if spec.haystack == "needle":  # room after the needle to fill the length exactly with distractors
        probe_rng = np.random.default_rng([seed, code(task), 1 << 20])
        probe = encoder.many(
            [
                sep
                + needle_template.format(
                    key=draw(probe_rng, spec.key_type), value=draw(probe_rng, spec.value_type)
                )
                for _ in range(_POOL_SIZE)
            ]
        )
        lengths = np.array([len(ids) for ids in probe])
        reserve += _pool_count(lengths) * int(lengths.max())

    shared_rng = np.random.default_rng([seed, code(task)])
    shared_keys: set[str] = set()
    shared_values: set[str] = set()
    if spec.haystack in ("noise", "passkey"):
        stream = Stream(encoder, itertools.repeat(NOISE), sep, first_sep)
    elif spec.haystack == "essay":
        stream = Stream(encoder, itertools.cycle(_essay_units(corpus)), sep, first_sep)
    else:

        def distractors() -> Iterator[str]:
            while True:
                key = draw_new(shared_rng, spec.key_type, shared_keys)
                value = draw_new(shared_rng, spec.value_type, shared_values)
                yield needle_template.format(key=key, value=value)

        stream = Stream(encoder, distractors(), sep, first_sep)

    haystack_tokens = budget - len(bos) - len(head_ids) - reserve
    if haystack_tokens < 0:
        raise too_short(task, length, length - haystack_tokens, ttg)
    # Keys and values must not occur anywhere in the haystack a sample could use.
    covered = stream.covering(budget)
    haystack_text = "".join(stream.raw[:covered]) if spec.haystack == "essay" else ""

    prefixes: dict[float, int] = {}
    samples = []
    shortfalls: list[int] = []  # the length each sample that did not fit needs
    for index, depth in enumerate(depth_list):
        rng = np.random.default_rng([seed, code(task), index])
        keys_used, values_used = set(shared_keys), set(shared_values)
        if passkey:
            keys: list[str] = [""]
            values = [[str(rng.integers(1, 10**7))]]
        else:
            keys = [draw_new(rng, spec.key_type, keys_used, haystack_text) for _ in range(spec.num_keys)]
            values = [
                [draw_new(rng, spec.value_type, values_used, haystack_text) for _ in range(spec.num_values)]
                for _ in keys
            ]
        needles = [
            needle_template.format(key=key, value=value)
            for key, key_values in zip(keys, values, strict=True)
            for value in key_values
        ]
        needles = [needles[i] for i in rng.permutation(len(needles))]
        queried = sorted(rng.choice(len(keys), size=spec.num_queries, replace=False).tolist())
        answers = [value for i in queried for value in values[i]]
        query_keys = [keys[i] for i in queried]
        query = (
            query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
        )
        question_text, answer_prefix = question(query)
        question_ids = encoder(question_text + answer_prefix)
        rest_ids = [encoder(sep + needle) for needle in needles[1:]]

        if depth not in prefixes:
            prefixes[depth] = stream.count_within(math.floor(depth * haystack_tokens))
        units_before = prefixes[depth]
        fixed = len(bos) + len(head_ids) + len(question_ids) + sum(map(len, rest_ids))
        first_ids = encoder((first_sep if units_before == 0 else sep) + needles[0])
        while units_before > 0 and fixed + stream.cum[units_before] + len(first_ids) > budget:
            units_before -= 1  # the bounds failed for this sample: it shares less (never seen)
            first_ids = encoder((first_sep if units_before == 0 else sep) + needles[0])
        room = budget - fixed - stream.cum[units_before] - len(first_ids)
        if room < 0:
            shortfalls.append(length - room)
            continue

        prompt = Prompt(bos)
        prompt.add(head, head_ids)
        for i in range(units_before):
            prompt.add(*stream.unit(i, first=i == 0))
        positions = [
            prompt.add((first_sep if units_before == 0 else sep) + needles[0], first_ids, varies=True)
        ]
        if spec.haystack == "needle":
            after = _distractor_fill(encoder, rng, spec, needle_template, sep, room, keys_used, values_used)
            tail: tuple[str, list[int]] | None = None
        else:
            after, tail = _stream_fill(encoder, stream, units_before, room)
        slots = sorted(rng.integers(0, len(after) + 1, size=len(rest_ids)).tolist())
        for j, (text, ids) in enumerate(after):
            while slots and slots[0] == j:
                slots.pop(0)
                needle_index = len(positions)
                positions.append(prompt.add(sep + needles[needle_index], rest_ids[needle_index - 1]))
            prompt.add(text, ids)
        while slots:
            slots.pop(0)
            needle_index = len(positions)
            positions.append(prompt.add(sep + needles[needle_index], rest_ids[needle_index - 1]))
        if tail is not None:
            prompt.add(*tail)
        prompt.add(question_text + answer_prefix, question_ids)
        samples.append(
            prompt.sample(task, answers, length, ttg, answer_prefix, seed, index, depth, positions)
        )
    if shortfalls:
        raise too_short(task, length, max(shortfalls), ttg)
    return samples


def _stream_fill(
    encoder: Encoder, stream: Stream, start: int, room: int
) -> tuple[list[tuple[str, tuple[int, ...]]], tuple[str, list[int]]]:
    """Haystack units from ``start`` on that fit in ``room`` tokens, then the next one cut to fill it."""
    units = []
    index = start
    while True:
        text, ids = stream.unit(index, first=False)
        if len(ids) > room:
            break
        units.append((text, ids))
        room -= len(ids)
        index += 1
    cut = encoder.cut(ids, room)
    return units, (encoder.decode(cut), cut)


def _distractor_fill(
    encoder: Encoder,
    rng: np.random.Generator,
    spec: NeedleSpec,
    template: str,
    sep: str,
    room: int,
    keys_used: set[str],
    values_used: set[str],
) -> list[tuple[str, tuple[int, ...]]]:
    """Fresh distractor needles filling ``room`` tokens: random ones, then a best-fitting set from a pool."""

    def make(count: int) -> list[tuple[str, tuple[int, ...]]]:
        texts = [
            sep
            + template.format(
                key=draw_new(rng, spec.key_type, keys_used),
                value=draw_new(rng, spec.value_type, values_used),
            )
            for _ in range(count)
        ]
        return list(zip(texts, encoder.many(texts), strict=True))

    pool = make(_POOL_SIZE)
    lengths = np.array([len(ids) for _, ids in pool])
    # Leave the pool enough room that its subset sums cover it without gaps.
    chosen = []
    while room > (_pool_count(lengths) + 1) * lengths.max():
        chosen += make(1)
        room -= len(chosen[-1][1])
    chosen += [pool[item] for item in _subset_sum(lengths, room)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


_POOL_SIZE = 256


def _pool_count(lengths: np.ndarray) -> int:
    """How many items of these lengths it takes for their possible sums to leave no gaps (at most 16)."""
    low, high = int(lengths.min()), int(lengths.max())
    return 1 if high == low else min(16, -(-(low - 1) // (high - low)) + 1)


def _subset_sum(lengths: np.ndarray, target: int) -> list[int]:
    """Indexes of items (each used once) whose lengths add up to the largest reachable total ≤ ``target``."""
    reached = np.zeros(target + 1, dtype=bool)
    reached[0] = True
    via = np.full(target + 1, -1)
    for item, length in enumerate(lengths.tolist()):
        if length > target:
            continue
        new = np.zeros_like(reached)
        new[length:] = reached[: target + 1 - length] & ~reached[length:]
        via[new] = item
        reached |= new
        if reached[target]:
            break
    total = int(np.flatnonzero(reached)[-1])
    items = []
    while total:
        items.append(int(via[total]))
        total -= int(lengths[via[total]])
    return items


def _essay_units(corpus: Corpus | None) -> list[str]:
    """The corpus as sentences (over-long ones cut into pieces), whitespace collapsed as RULER does."""
    if corpus is None:
        from pydoc_data.topics import topics  # oodlens' default corpus, Python's documentation

        documents = [topics[key] for key in sorted(topics)]
    else:
        documents = list(getattr(corpus, "documents", None) or [])
    text = re.sub(r"\s+", " ", " ".join(documents)).strip()
    if not text:
        raise OodlensError("niah_essay's corpus holds no text: pass a Corpus with non-empty documents")
    units = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = sentence.split(" ")
        units += [" ".join(words[i : i + ESSAY_UNIT_WORDS]) for i in range(0, len(words), ESSAY_UNIT_WORDS)]
    return units


def _depths(depths: Any, n_samples: int) -> list[float]:
    if depths is None:
        values = [0.5] if n_samples == 1 else np.linspace(0.0, 1.0, n_samples).tolist()
    elif isinstance(depths, (int, float, np.floating, np.integer)) and not isinstance(depths, bool):
        values = [float(depths)] * n_samples
    else:
        given = [float(depth) for depth in depths]
        if not given:
            raise OodlensError("depths is empty: pass None, a number in [0, 1] or a sequence of them")
        values = [given[i % len(given)] for i in range(n_samples)]
    for depth in values:
        if not 0.0 <= depth <= 1.0:
            raise OodlensError(f"depth must lie in [0, 1] (a fraction of the haystack), got {depth}")
    return values

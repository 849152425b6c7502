"""What every task builds its prompt with: tokenizer-exact pieces, random keys and values, argument checks.

Sizing. ``length`` counts the prompt plus ``tokens_to_generate`` (RULER's ``max_seq_length``; defaults are
RULER's per task, :data:`DEFAULT_TOKENS_TO_GENERATE`: niah 128, vt 30, cwe 120, fwe 50, passkey 16). The
haystack is sized with the given tokenizer so the prompt has at most ``length - tokens_to_generate`` tokens
and, except where a task's module notes otherwise, at most a few fewer. Instead of RULER's binary search over
whole texts, every piece of a prompt (head, haystack unit, needle, question) is tokenised once on its own, as
it reads in the middle of a text (:class:`Encoder`), and ``input_ids`` is the concatenation (:class:`Prompt`),
so counts add up exactly; the last haystack unit before the question is cut to the token to fill the budget
(``decode(input_ids)`` gives ``TaskSample.text``).

Keys are adjective-noun pairs from the ``wonderwords`` package's word lists, read as RULER reads them
(cwe uses its nouns, adjectives and verbs); the lists ship inside the package, so nothing is downloaded."""

from __future__ import annotations

import bisect
import itertools
import re
import uuid
import zlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from ..errors import OodlensError
from .sample import TaskSample, metric

# RULER's noise haystack (niah_single, vt) and LM-Infinite's (passkey), one sentence repeated
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

DEFAULT_TOKENS_TO_GENERATE = {
    "niah_single": 128,
    "niah_multikey": 128,
    "niah_essay": 128,
    "variable_tracking": 30,
    "common_words": 120,
    "frequent_words": 50,
    "passkey": 16,
}
_PROBE = "."  # tokenised before each piece, then dropped: see Encoder


# --- tokenising pieces ---------------------------------------------------------------------------------


class Encoder:
    """Token ids of text pieces as they read in the middle of a prompt, cached.

    Each piece is tokenised after a probe ("."), whose ids are then dropped: that keeps tokenizers which
    prepend a word-start marker to every call (SentencePiece) from adding one at each piece. Where the
    probe merges with the piece, the piece is tokenised alone."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        self._probe = tuple(self._raw([_PROBE])[0])

    def _raw(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def start(self, text: str) -> list[int]:
        """Ids of the piece that opens the prompt."""
        return list(self._raw([text])[0])

    def many(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        width = len(self._probe)
        for begin in range(0, len(missing), 4096):
            batch = missing[begin : begin + 4096]
            alone = []
            for text, ids in zip(batch, self._raw([_PROBE + text for text in batch]), strict=True):
                if tuple(ids[:width]) == self._probe:
                    self._cache[text] = tuple(ids[width:])
                else:
                    alone.append(text)
            if alone:
                for text, ids in zip(alone, self._raw(alone), strict=True):
                    self._cache[text] = tuple(ids)
        return [self._cache[text] for text in texts]

    def __call__(self, text: str) -> tuple[int, ...]:
        return self.many([text])[0]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def cut(self, ids: Sequence[int], budget: int) -> list[int]:
        """The first ``budget`` ids, shortened by up to 3 to end before a word when that is possible."""
        if budget <= 0:
            return []
        for end in range(min(budget, len(ids) - 1), max(budget - 3, 0) - 1, -1):
            if end == len(ids) or self.decode([ids[end]])[:1].isspace():
                return list(ids[:end])
        return list(ids[:budget])


class Prompt:
    """Ids and text built piece by piece; remembers where the first per-sample piece begins."""

    def __init__(self, bos: list[int]) -> None:
        self.ids: list[int] = list(bos)
        self.texts: list[str] = []
        self.shared: int | None = None

    def add(self, text: str, ids: Sequence[int], varies: bool = False) -> int:
        if varies and self.shared is None:
            self.shared = len(self.ids)
        start = len(self.ids)
        self.ids.extend(ids)
        self.texts.append(text)
        return start

    def sample(
        self,
        task: str,
        answers: list[str],
        length: int,
        max_new_tokens: int,
        answer_prefix: str,
        seed: int,
        index: int,
        depth: float | None,
        needle_positions: list[int],
    ) -> TaskSample:
        return TaskSample(
            task=task,
            input_ids=self.ids,
            answers=answers,
            length=length,
            prompt_tokens=len(self.ids),
            max_new_tokens=max_new_tokens,
            answer_prefix=answer_prefix,
            seed=seed,
            index=index,
            depth=depth,
            needle_positions=needle_positions,
            shared_prefix_tokens=len(self.ids) if self.shared is None else self.shared,
            text="".join(self.texts),
            metric=metric(task),
        )


class Stream:
    """Haystack units in a fixed order, tokenised lazily in batches.

    Unit i's text carries its leading separator: ``first_sep`` for unit 0 (which opens the context),
    ``sep`` for the others; :meth:`unit` also gives unit 0 after a needle, with ``sep``."""

    def __init__(self, encoder: Encoder, contents: Iterator[str], sep: str, first_sep: str) -> None:
        self.encoder, self.contents, self.sep, self.first_sep = encoder, contents, sep, first_sep
        self.raw: list[str] = []
        self.ids: list[tuple[int, ...]] = []
        self.cum = [0]

    def _grow(self, count: int = 256) -> None:
        batch = list(itertools.islice(self.contents, count))
        texts = [
            (self.first_sep if len(self.raw) + j == 0 else self.sep) + text for j, text in enumerate(batch)
        ]
        self.raw.extend(batch)
        for ids in self.encoder.many(texts):
            self.ids.append(ids)
            self.cum.append(self.cum[-1] + len(ids))

    def covering(self, tokens: int) -> int:
        """How many units it takes to reach more than ``tokens`` tokens (growing the stream to them)."""
        while self.cum[-1] <= tokens:
            self._grow()
        return bisect.bisect_right(self.cum, tokens)

    def count_within(self, tokens: int) -> int:
        """The most units whose tokens add up to at most ``tokens``."""
        return self.covering(tokens) - 1

    def unit(self, index: int, first: bool) -> tuple[str, tuple[int, ...]]:
        while len(self.raw) <= index:
            self._grow()
        if index == 0 and not first and self.sep != self.first_sep:
            text = self.sep + self.raw[0]
            return text, self.encoder(text)
        return (self.first_sep if index == 0 else self.sep) + self.raw[index], self.ids[index]


# --- random keys and values ----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def wonderwords() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Wonderwords' noun, adjective and verb lists, as RULER reads them."""
    try:
        assets = resources.files("wonderwords.assets")
    except ModuleNotFoundError:
        raise OodlensError("the RULER tasks need the wonderwords package: pip install wonderwords") from None

    def read(name: str) -> tuple[str, ...]:
        return tuple(line.rstrip() for line in assets.joinpath(name).read_text(encoding="utf-8").splitlines())

    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


@lru_cache(maxsize=1)
def common_word_list() -> tuple[str, ...]:
    nouns, adjectives, verbs = wonderwords()
    return tuple(sorted(set(nouns + adjectives + verbs) - {""}))


def draw(rng: np.random.Generator, kind: str) -> str:
    if kind == "numbers":
        return str(rng.integers(10**6, 10**7))
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    if kind == "words":
        nouns, adjectives, _ = wonderwords()
        return f"{adjectives[rng.integers(len(adjectives))]}-{nouns[rng.integers(len(nouns))]}"
    raise AssertionError(kind)


def draw_new(rng: np.random.Generator, kind: str, used: set[str], text: str = "") -> str:
    """A key or value not in ``used`` and not occurring in ``text``; added to ``used``."""
    while True:
        value = draw(rng, kind)
        if value not in used and value not in text:
            used.add(value)
            return value


def slot_bound(encoder: Encoder, kind: str) -> int:
    """An upper bound on the tokens of " <key or value>" of this kind."""
    if kind == "words":
        nouns, adjectives, _ = wonderwords()
        adjective = max(map(len, encoder.many([" " + word for word in adjectives])))
        noun = max(map(len, encoder.many(["-" + word for word in nouns])))
        return adjective + noun + 1
    rng = np.random.default_rng(0)
    examples = [draw(rng, kind) for _ in range(256)]
    if kind == "numbers":
        examples += ["1000000", "9999999", "1234567"]
    return max(map(len, encoder.many([" " + example for example in examples]))) + 2


def template_bound(encoder: Encoder, template: str, slots: dict[str, int]) -> int:
    """An upper bound on the tokens of ``template`` with its ``{slot}`` fields filled (bounds in slots)."""
    parts = re.split(r"\{(\w+)\}", template)
    literals, fields = parts[0::2], parts[1::2]
    return (
        sum(len(encoder(part)) for part in literals if part)
        + sum(slots[name] for name in fields)
        + len(parts)
    )


# --- checks --------------------------------------------------------------------------------------------


def code(task: str) -> int:
    """A number for the task, mixed into every random seed so that tasks draw differently."""
    return zlib.crc32(task.encode())


def check_int(label: str, value: Any, minimum: int) -> int:
    """``value`` as an int, or an error naming ``label`` unless it is an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise OodlensError(f"{label} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def check_common(
    task: str, length: Any, n_samples: Any, seed: Any, tokens_to_generate: Any
) -> tuple[int, int, int, int]:
    """The checked arguments every task takes; ``tokens_to_generate`` None becomes the task's default."""
    length = check_int("length", length, 1)
    n_samples = check_int("n_samples", n_samples, 1)
    seed = check_int("seed", seed, 0)
    ttg = DEFAULT_TOKENS_TO_GENERATE[task] if tokens_to_generate is None else tokens_to_generate
    ttg = check_int("tokens_to_generate", ttg, 0)
    if ttg >= length:
        raise OodlensError(
            f"tokens_to_generate ({ttg}) must be below length ({length}): lower it or ask for more"
        )
    return length, n_samples, seed, ttg


def bos_ids(tokenizer: Any, add_bos: bool) -> list[int]:
    """The ids a prompt opens with: the tokenizer's bos token if ``add_bos``, else none."""
    if not add_bos:
        return []
    if getattr(tokenizer, "bos_token_id", None) is None:
        raise OodlensError("add_bos=True but the tokenizer has no bos token: pass add_bos=False")
    return [int(tokenizer.bos_token_id)]


def too_short(task: str, length: int, need: int, ttg: int) -> OodlensError:
    """The error for a length below what the task's fixed parts need (``need``, the length to ask for)."""
    return OodlensError(
        f"{task}: length {length} is too short for the task's fixed parts with this tokenizer "
        f"(tokens_to_generate={ttg}): use length ≥ {need}"
    )

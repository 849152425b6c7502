"""RULER's aggregation tasks: common words extraction (cwe) and frequent words extraction (fwe).

Both fill the length with whole words (short of it by at most 2 tokens in practice). Deviations from RULER,
all deliberate: cwe draws the common words, the uncommon words and the example's words disjointly from one
shuffled list (RULER's ``random.sample``), may swap a few uncommon words for others to fill the length, and
raises instead of switching to a second word list when the length needs more words than wonderwords has
(8,168 distinct words, about 130k tokens); fwe may add a few occurrences of its noise word '...' (rank 1,
never an answer) to fill the length and uses at least 8 coded words."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import OodlensError
from .prompt import Encoder, Prompt, bos_ids, check_common, check_int, code, common_word_list, too_short
from .sample import TaskSample

CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top {n} words that appear most often in the list are:"

FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
FWE_NOISE_WORD = "..."


# --- common words extraction ---------------------------------------------------------------------------


def common_words(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    num_cw: int = 10,
    freq_cw: int | None = None,
    freq_ucw: int | None = None,
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER cwe: a numbered list of words in which ``num_cw`` common words appear ``freq_cw`` times and the
    rest ``freq_ucw`` times (RULER: 30 and 3, or 6 and 1 below 4096 tokens); the answer is the common
    words. One worked example comes first (40 words x 10 / x 3, or 20 words x 3 / x 1 below 4096).
    ``depths`` is ignored."""
    task = "common_words"
    length, n_samples, seed, ttg = check_common(task, length, n_samples, seed, tokens_to_generate)
    short = length < 4096
    freq_cw = freq_cw if freq_cw is not None else (6 if short else 30)
    freq_ucw = freq_ucw if freq_ucw is not None else (1 if short else 3)
    for label, value in (("num_cw", num_cw), ("freq_cw", freq_cw), ("freq_ucw", freq_ucw)):
        check_int(label, value, 1)
    if freq_cw <= freq_ucw:
        raise OodlensError(
            f"freq_cw ({freq_cw}) must exceed freq_ucw ({freq_ucw}): the common words must stand out"
        )
    example_words, example_cw, example_ucw = (20, 3, 1) if short else (40, 10, 3)
    example_words = max(example_words, num_cw + 1)
    encoder = Encoder(tokenizer)
    bos = bos_ids(tokenizer, add_bos)
    budget = length - ttg
    words = common_word_list()
    word_ids = encoder.many([" " + word for word in words])
    word_tokens = np.array([len(ids) for ids in word_ids])
    head_ids = encoder.start(CWE_HEAD)
    main_head = "\n" + CWE_HEAD
    question_text = CWE_QUESTION.format(n=num_cw)
    answer_prefix = CWE_ANSWER_PREFIX.format(n=num_cw)
    closing_ids = encoder(question_text + answer_prefix)

    numbers: list[tuple[int, ...]] = []
    number_cum = [0]

    def number_ids(count: int) -> None:
        if count > len(numbers):
            more = [
                f"{i}." if i == 1 else f" {i}."
                for i in range(len(numbers) + 1, max(count, 2 * len(numbers)) + 1)
            ]
            for ids in encoder.many(more):
                numbers.append(ids)
                number_cum.append(number_cum[-1] + len(ids))

    def entries(chosen: Sequence[int], repeats: Sequence[int], rng: np.random.Generator) -> list[int]:
        listed = np.repeat(np.asarray(chosen, dtype=np.int64), repeats)
        return listed[rng.permutation(len(listed))].tolist()

    def add_list(prompt: Prompt, listed: list[int]) -> None:
        number_ids(len(listed))
        for i, word in enumerate(listed):
            prompt.add(("" if i == 0 else " ") + f"{i + 1}.", numbers[i])
            prompt.add(" " + words[word], word_ids[word], varies=True)

    samples = []
    shortfalls: list[int] = []  # the length each sample that did not fit needs
    for index in range(n_samples):
        rng = np.random.default_rng([seed, code(task), index])
        order = rng.permutation(len(words))
        shown = order[len(order) - example_words :].tolist()
        example_list = entries(shown, [example_cw] * num_cw + [example_ucw] * (example_words - num_cw), rng)
        prompt = Prompt(bos)
        prompt.add(CWE_HEAD, head_ids)
        add_list(prompt, example_list)
        worked = (
            question_text
            + answer_prefix
            + "".join(f" {i + 1}. {words[w]}" for i, w in enumerate(shown[:num_cw]))
        )
        prompt.add(worked, encoder(worked), varies=True)
        prompt.add(main_head, encoder(main_head))
        fixed = len(prompt.ids) + len(closing_ids)
        available = order[: len(order) - example_words]

        def total(n_words: int, fixed: int = fixed, available: np.ndarray = available) -> int:
            count = num_cw * freq_cw + (n_words - num_cw) * freq_ucw
            number_ids(count)
            chosen = word_tokens[available[:n_words]]
            return (
                fixed
                + number_cum[count]
                + freq_cw * int(chosen[:num_cw].sum())
                + freq_ucw * int(chosen[num_cw:].sum())
            )

        if total(num_cw + 1) > budget:
            need = total(num_cw + 1) + ttg
            shortfalls.append(need)
            continue
        low = high = num_cw + 1  # total(low) fits; grow high until it does not, or the words run out
        while total(high) <= budget and high < len(available):
            low, high = high, min(2 * high, len(available))
        if total(high) <= budget:
            if budget - total(high) >= freq_ucw * int(word_tokens.max()):
                raise OodlensError(
                    f"common_words: length {length} needs more distinct words than wonderwords "
                    f"has ({len(words)}): ask for a shorter length"
                )
            low = high
        while high - low > 1:  # total(low) fits, total(high) does not
            middle = (low + high) // 2
            low, high = (middle, high) if total(middle) <= budget else (low, middle)
        n_words = low
        chosen = available[:n_words].tolist()
        spare = _swap_fill(
            chosen[num_cw:], available[n_words:].tolist(), word_tokens, freq_ucw, budget - total(n_words)
        )
        chosen[num_cw:] = spare
        listed = entries(chosen, [freq_cw] * num_cw + [freq_ucw] * (n_words - num_cw), rng)
        add_list(prompt, listed)
        prompt.add(question_text + answer_prefix, closing_ids)
        answers = [words[word] for word in chosen[:num_cw]]
        samples.append(prompt.sample(task, answers, length, ttg, answer_prefix, seed, index, None, []))
    if shortfalls:
        raise too_short(task, length, max(shortfalls), ttg)
    return samples


def _swap_fill(
    uncommon: list[int], unused: list[int], tokens: np.ndarray, repeats: int, room: int
) -> list[int]:
    """Swap uncommon words for longer unused ones until less than ``repeats`` tokens of ``room`` are left."""
    by_length: dict[int, list[int]] = {}
    for word in unused:
        by_length.setdefault(int(tokens[word]), []).append(word)
    result = list(uncommon)
    for position, word in enumerate(result):
        if room < repeats:
            break
        current = int(tokens[word])
        for gain in range(room // repeats, 0, -1):
            if by_length.get(current + gain):
                result[position] = by_length[current + gain].pop()
                by_length.setdefault(current, []).append(word)
                room -= gain * repeats
                break
    return result


# --- frequent words extraction -------------------------------------------------------------------------


def frequent_words(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    alpha: float = 2.0,
    vocab_size: int | None = None,
    coded_wordlen: int = 6,
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER fwe: random lowercase "coded" words whose counts follow Zipf's law (count of rank k
    ∝ k^-alpha); rank 1 is the noise word "..."; the answer is ranks 2-4. ``vocab_size`` defaults to RULER's
    length // 50 (the whole length, generated tokens included, as RULER counts it), at least 8. ``depths`` is
    ignored."""
    task = "frequent_words"
    length, n_samples, seed, ttg = check_common(task, length, n_samples, seed, tokens_to_generate)
    if not (isinstance(alpha, (int, float)) and alpha > 1):
        raise OodlensError(f"alpha must be a number > 1 (a Zipf exponent; RULER uses 2.0), got {alpha!r}")
    check_int("coded_wordlen", coded_wordlen, 1)
    budget = length - ttg
    vocab_size = max(length // 50, 8) if vocab_size is None else check_int("vocab_size", vocab_size, 5)
    if vocab_size > 26**coded_wordlen // 2:
        raise OodlensError(f"vocab_size {vocab_size} is too large for {coded_wordlen}-letter words: lower it")
    encoder = Encoder(tokenizer)
    bos = bos_ids(tokenizer, add_bos)
    head_ids = encoder.start(FWE_HEAD)
    closing_ids = encoder(FWE_QUESTION + FWE_ANSWER_PREFIX)
    fixed = len(bos) + len(head_ids) + len(closing_ids)
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / _zeta(alpha)

    samples = []
    shortfalls: list[int] = []  # the length each sample that did not fit needs
    for index in range(n_samples):
        rng = np.random.default_rng([seed, code(task), index])
        codes: set[str] = set()
        while len(codes) < vocab_size:
            codes.add("".join(chr(97 + c) for c in rng.integers(0, 26, size=coded_wordlen)))
        ordered = sorted(codes)
        vocab = [ordered[i] for i in rng.permutation(vocab_size)]
        vocab[0] = FWE_NOISE_WORD
        vocab_ids = encoder.many([" " + word for word in vocab])
        tokens = np.array([len(ids) for ids in vocab_ids])

        def counts(n_words: int) -> np.ndarray:
            return np.floor(n_words * weights).astype(np.int64)

        def total(n_words: int, tokens: np.ndarray = tokens) -> int:
            return fixed + int(counts(n_words) @ tokens)

        high = 1
        while total(high) <= budget:
            high *= 2
        low = 0
        while low < high - 1:
            middle = (low + high) // 2
            low, high = (middle, high) if total(middle) <= budget else (low, middle)
        chosen = counts(low)
        if not (chosen[1] > chosen[2] > chosen[3] > chosen[4:].max(initial=0)):
            least = low
            while True:
                least += 1
                c = counts(least)
                if c[1] > c[2] > c[3] > c[4:].max(initial=0):
                    break
            shortfalls.append(total(least) + ttg)
            continue
        chosen[0] += (budget - total(low)) // int(tokens[0])  # fill with the noise word, never an answer
        listed = np.repeat(np.arange(vocab_size), chosen)
        listed = listed[rng.permutation(len(listed))]
        prompt = Prompt(bos)
        prompt.add(FWE_HEAD, head_ids)
        for word in listed.tolist():
            prompt.add(" " + vocab[word], vocab_ids[word], varies=True)
        prompt.add(FWE_QUESTION + FWE_ANSWER_PREFIX, closing_ids)
        samples.append(prompt.sample(task, vocab[1:4], length, ttg, FWE_ANSWER_PREFIX, seed, index, None, []))
    if shortfalls:
        raise too_short(task, length, max(shortfalls), ttg)
    return samples


def _zeta(s: float) -> float:
    """Riemann zeta(s) for s > 1 (Euler-Maclaurin after 32 terms; error far below 1e-12)."""
    n = 32
    head = sum(k**-s for k in range(1, n))
    return (
        head
        + n ** (1 - s) / (s - 1)
        + n**-s / 2
        + s * n ** (-s - 1) / 12
        - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720
    )

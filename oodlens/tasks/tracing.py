"""RULER's multi-hop tracing task, variable tracking (vt): find every variable a chain of assignments reaches.

Deviations from RULER, both deliberate: vt's hops carry no trailing space and its example's answers follow a
single space. RULER's answer prefix is kept as it is spelled ("assgined"), so the prompts match its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .prompt import NOISE, Encoder, Prompt, bos_ids, check_common, check_int, code, too_short
from .sample import TaskSample

VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
    "assgined the value {value}, they are: "
)
VT_EXAMPLE_TOKENS = 500  # RULER builds its in-context example at max_seq_length=500


def variable_tracking(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    num_chains: int = 1,
    num_hops: int = 4,
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER vt: noise lines with chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... at random lines;
    the answer is every variable of the first chain. One in-context example (3-letter names, at most 500
    tokens, its layout fixed per seed and its names and value drawn per sample) comes first. ``depths`` is
    ignored (the chain is spread at random)."""
    task = "variable_tracking"
    length, n_samples, seed, ttg = check_common(task, length, n_samples, seed, tokens_to_generate)
    for label, value in (("num_chains", num_chains), ("num_hops", num_hops)):
        check_int(label, value, 1)
    encoder = Encoder(tokenizer)
    bos = bos_ids(tokenizer, add_bos)
    budget = length - ttg
    noise = "\n" + NOISE
    noise_ids = encoder(noise)
    n_vars = num_hops + 1
    statements = num_chains * n_vars

    def positions(rng: np.random.Generator, n_noise: int) -> list[list[int]]:
        """Where each chain's statements go, as RULER inserts them: a sorted sample of line indexes."""
        result, lines = [], n_noise
        for _ in range(num_chains):
            result.append(
                sorted(rng.choice(lines, size=n_vars, replace=lines < n_vars).tolist())
                if lines
                else [0] * n_vars
            )
            lines += n_vars
        return result

    def context(chains: list[list[str]], n_noise: int, places: list[list[int]]) -> list[tuple[str, bool]]:
        lines: list[tuple[str, bool]] = [(noise, False)] * n_noise
        for chain, where in zip(chains, places, strict=True):
            for j, (statement, place) in enumerate(zip(chain, where, strict=True)):
                lines.insert(place + j, ("\n" + statement, True))
        return lines

    def chains_for(
        rng: np.random.Generator, letters: int, value_of: Callable[[int], str]
    ) -> tuple[list[list[str]], list[list[str]], list[str]]:
        names: set[str] = set()
        while len(names) < statements:
            names.add("".join(chr(65 + c) for c in rng.integers(0, 26, size=letters)))
        ordered = [str(name) for name in rng.permutation(sorted(names))]
        variables = [ordered[i * n_vars : (i + 1) * n_vars] for i in range(num_chains)]
        values = [value_of(i) for i in range(num_chains)]
        chains = [
            [f"VAR {names_[0]} = {value}"]
            + [f"VAR {names_[j + 1]} = VAR {names_[j]}" for j in range(num_hops)]
            for names_, value in zip(variables, values, strict=True)
        ]
        return chains, variables, values

    def distinct_values(rng: np.random.Generator) -> Callable[[int], str]:
        drawn: list[str] = []

        def value_of(_: int) -> str:
            while (value := str(rng.integers(10000, 99999))) in drawn:
                pass
            drawn.append(value)
            return value

        return value_of

    # The example's layout (noise lines, statement places), fixed per seed as RULER builds it once.
    shared_rng = np.random.default_rng([seed, code(task)])
    example_head_ids = encoder.start(VT_HEAD)

    def example(
        rng: np.random.Generator, n_noise: int, places: list[list[int]]
    ) -> list[tuple[str, Sequence[int], bool]]:
        value = str(rng.integers(10000, 99999))
        chains, variables, _ = chains_for(rng, 3, lambda _: value)
        pieces: list[tuple[str, Sequence[int], bool]] = [(VT_HEAD, example_head_ids, False)]
        for text, varies in context(chains, n_noise, places):
            pieces.append((text, encoder(text), varies))
        closing = (
            VT_QUESTION.format(value=value)
            + VT_ANSWER_PREFIX.format(n=n_vars, value=value)
            + " ".join(variables[0])
            + "\n"
        )
        pieces.append((closing, encoder(closing), True))
        return pieces

    def example_tokens(n_noise: int) -> int:
        probe = np.random.default_rng([seed, code(task), 1 << 20])
        return sum(len(ids) for _, ids, _ in example(probe, n_noise, positions(probe, n_noise)))

    example_noise = 0
    while example_tokens(example_noise + 1) <= VT_EXAMPLE_TOKENS:
        example_noise += 1
    example_places = positions(shared_rng, example_noise)
    main_head = "\n" + VT_HEAD

    samples = []
    shortfalls: list[int] = []  # the length each sample that did not fit needs
    for index in range(n_samples):
        rng = np.random.default_rng([seed, code(task), index])
        pieces = example(rng, example_noise, example_places)
        chains, variables, values = chains_for(rng, 5, distinct_values(rng))
        question_text = VT_QUESTION.format(value=values[0])
        answer_prefix = VT_ANSWER_PREFIX.format(n=n_vars, value=values[0])
        question_ids = encoder(question_text + answer_prefix)
        chain_tokens = sum(len(encoder("\n" + statement)) for chain in chains for statement in chain)
        fixed = (
            len(bos)
            + sum(len(ids) for _, ids, _ in pieces)
            + len(encoder(main_head))
            + chain_tokens
            + len(question_ids)
        )
        room = budget - fixed
        if room < 0:
            shortfalls.append(length - room)
            continue
        n_noise = room // len(noise_ids)
        tail = encoder.cut(noise_ids, room - n_noise * len(noise_ids))

        prompt = Prompt(bos)
        for text, ids, varies in pieces:
            prompt.add(text, ids, varies)
        prompt.add(main_head, encoder(main_head))
        needle_positions = []
        for text, is_statement in context(chains, n_noise, positions(rng, n_noise)):
            start = prompt.add(text, noise_ids if not is_statement else encoder(text), is_statement)
            if is_statement:
                needle_positions.append(start)
        prompt.add(encoder.decode(tail), tail)
        prompt.add(question_text + answer_prefix, question_ids)
        samples.append(
            prompt.sample(
                task, list(variables[0]), length, ttg, answer_prefix, seed, index, None, needle_positions
            )
        )
    if shortfalls:
        raise too_short(task, length, max(shortfalls), ttg)
    return samples

"""RULER-style synthetic tasks: sizing, determinism, answers really in the prompt, shared prefixes, scoring.

Fast with the byte tokenizer; the same checks with SmolLM2's BPE tokenizer are marked slow.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from oodlens import tasks as ruler
from oodlens.data import Corpus
from oodlens.errors import OodlensError
from oodlens.tasks.aggregation import _zeta
from oodlens.tasks.prompt import wonderwords
from oodlens.tiny import byte_tokenizer

BYTES = byte_tokenizer()
TOLERANCE = 4  # tokens a prompt may fall short of length - max_new_tokens

# (task, options) covering every construction: noise, distractor needles (both variants), essay variants,
# vt, cwe, fwe, passkey.
CASES = [
    ("niah_single", {}),
    ("niah_multikey", {"value_type": "numbers"}),
    ("niah_multikey", {"value_type": "uuids"}),
    ("niah_essay", {"variant": "single"}),
    ("niah_essay", {"variant": "multikey"}),
    ("niah_essay", {"variant": "multivalue"}),
    ("niah_essay", {"variant": "multiquery", "value_type": "uuids"}),
    ("variable_tracking", {}),
    ("common_words", {}),
    ("frequent_words", {}),
    ("passkey", {}),
]
CASE_IDS = [task + "".join(f"-{value}" for value in options.values()) for task, options in CASES]
NEEDLE_TASKS = [case for case in CASES if case[0].startswith("niah") or case[0] == "passkey"]
NEEDLE_IDS = [case_id for case_id, case in zip(CASE_IDS, CASES, strict=True) if case in NEEDLE_TASKS]


@pytest.fixture(scope="module")
def bpe(smollm2):
    """SmolLM2's own BPE tokenizer (loading the model takes about 30 s the first time)."""
    return smollm2.tokenizer


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer that, like SentencePiece, marks a word start before every call's text."""
    nouns, adjectives, verbs = wonderwords()
    characters = set(string.printable).union(*nouns, *adjectives, *verbs) - {" "}
    vocab = {symbol: i for i, symbol in enumerate(["<unk>", "▁", *sorted(characters)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def fitted(task, options, tokenizer, length, n_samples=3, seed=0, **more):
    """Samples at ``length``, or at the length a too-short error asks for (checking that it was too short)."""
    try:
        return ruler.generate(task, tokenizer, length, n_samples, seed, **options, **more)
    except OodlensError as error:
        need = int(re.search(r"use length ≥ (\d+)", str(error)).group(1))
        assert need > length
        return ruler.generate(task, tokenizer, need, n_samples, seed, **options, **more)


def tolerance(tokenizer, task, options) -> int:
    if task == "niah_multikey" and options.get("value_type") == "uuids" and tokenizer is BYTES:
        # every distractor has the same number of bytes, so the length is filled to one distractor
        return len(("\n" + ruler.NEEDLE.format(kind="uuids", key="x" * 36, value="x" * 36)).encode())
    return TOLERANCE


def check_fills(samples, tokenizer, task, options):
    for sample in samples:
        budget = sample.length - sample.max_new_tokens
        assert sample.prompt_tokens == len(sample.input_ids)
        assert budget - tolerance(tokenizer, task, options) <= sample.prompt_tokens <= budget
        assert tokenizer.decode(sample.input_ids) == sample.text
        assert sample.text.endswith(sample.answer_prefix)


# --- sizing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [256, 1000, 4000])
@pytest.mark.parametrize(("task", "options"), CASES, ids=CASE_IDS)
def test_prompt_fills_the_length_byte_tokenizer(task, options, length):
    if length == 4000:  # every task fits 4000 bytes
        samples = ruler.generate(task, BYTES, length, 3, 0, **options)
    else:
        samples = fitted(task, options, BYTES, length)
    check_fills(samples, BYTES, task, options)


@pytest.mark.slow
@pytest.mark.parametrize("length", [256, 1000, 4000])
@pytest.mark.parametrize(("task", "options"), CASES, ids=CASE_IDS)
def test_prompt_fills_the_length_bpe_tokenizer(bpe, task, options, length):
    if length >= 1000 and not (task == "niah_multikey" and options.get("value_type") == "uuids"):
        samples = ruler.generate(task, bpe, length, 3, 0, **options)  # everything else fits 1000 tokens
    else:
        samples = fitted(task, options, bpe, length)
    check_fills(samples, bpe, task, options)
    # the ids are what the tokenizer makes of the text, not just pieces that decode to it
    for sample in samples:
        assert len(bpe(sample.text, add_special_tokens=False)["input_ids"]) == sample.prompt_tokens


def test_no_generation_reserve_fills_the_whole_length():
    for task in ("niah_single", "passkey", "frequent_words"):
        (sample,) = ruler.generate(task, BYTES, 3000, 1, tokens_to_generate=0)
        assert 3000 - TOLERANCE <= sample.prompt_tokens <= 3000
        assert sample.max_new_tokens == 0


def test_add_bos_counts_the_bos_token():
    (sample,) = ruler.generate("niah_single", BYTES, 2000, 1, add_bos=True)
    assert sample.input_ids[0] == BYTES.bos_token_id
    assert 2000 - 128 - TOLERANCE <= sample.prompt_tokens <= 2000 - 128


def test_word_start_markers_are_not_repeated_at_each_piece():
    """A SentencePiece-like tokenizer marks a word start at every call; pieces must not carry it."""
    tokenizer = metaspace_tokenizer()
    for task in ("niah_single", "common_words", "variable_tracking"):
        for sample in ruler.generate(task, tokenizer, 3000, 2):
            assert tokenizer.decode(sample.input_ids) == sample.text
            assert "  " not in sample.text


# --- determinism ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "options"), CASES, ids=CASE_IDS)
def test_same_seed_same_prompts_other_seed_other_prompts(task, options):
    first = ruler.generate(task, BYTES, 4000, 3, 7, **options)
    again = ruler.generate(task, BYTES, 4000, 3, 7, **options)
    other = ruler.generate(task, BYTES, 4000, 3, 8, **options)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.answers for s in first] == [s.answers for s in again]
    for a, b in zip(first, other, strict=True):
        assert a.answers != b.answers and a.input_ids != b.input_ids
        assert a.seed == 7 and b.seed == 8
    # each sample index draws its own needles
    assert len({tuple(s.answers) for s in first}) == 3


# seed 0, byte tokenizer, length 2000, one sample: (answers, prompt tokens, sha256 of the ids' first 16 hex
# digits). Computed once from the generators: a change of RNG calls, word lists or templates shows up here.
PINNED = {
    "niah_single": (["3372916"], 1872, "e61340d76078ae81"),
    "niah_multikey-numbers": (["8131873"], 1872, "8c2b4e0f20638a76"),
    "niah_multikey-uuids": (["e80487dd-d48e-4a6b-bdc1-5c766dc0e6e1"], 1810, "b2a8eb6eb6e14202"),
    "niah_essay-single": (["2356460"], 1872, "19a93640e0b5b74b"),
    "niah_essay-multikey": (["1837397"], 1872, "40982e9cde166748"),
    "niah_essay-multivalue": (["2356460", "7868654", "2233807", "9396993"], 1872, "7ec41089c1b95f56"),
    "niah_essay-multiquery-uuids": (
        [
            "794cf557-36be-4117-b12a-0e8bad0521c2",
            "3adb6a89-aaf2-4d2e-8cc4-008010e0b665",
            "938b9526-5057-4491-b276-cabf5985b899",
            "a2905421-65f4-4022-a57e-7a828f4aeab9",
        ],
        1872,
        "6ec95ff6c9ae1cbb",
    ),
    "variable_tracking": (["CSORQ", "ALGYJ", "CKJLE", "NWHNM", "PIBUV"], 1970, "e473ab5e11a8529b"),
    "common_words": (
        [
            "diaphragm",
            "aback",
            "knowing",
            "sentence",
            "transplantation",
            "hurt",
            "accuracy",
            "tab",
            "alligator",
            "laughable",
        ],
        1880,
        "6227b5a28c3059e5",
    ),
    "frequent_words": (["rgdvmm", "dwkmrh", "mkwhbi"], 1947, "42e427af2d6dedf7"),
    "passkey": (["8669291"], 1981, "83ffbdaa324c528a"),
}


@pytest.mark.parametrize(
    ("task", "options", "pinned"),
    [(task, options, PINNED[case_id]) for (task, options), case_id in zip(CASES, CASE_IDS, strict=True)],
    ids=CASE_IDS,
)
def test_seed_zero_gives_the_pinned_prompts(task, options, pinned):
    # the same-seed check above holds within one process; these literals hold across versions and machines
    (sample,) = ruler.generate(task, BYTES, 2000, 1, 0, **options)
    digest = hashlib.sha256(",".join(map(str, sample.input_ids)).encode()).hexdigest()[:16]
    assert (sample.answers, sample.prompt_tokens, digest) == pinned


def test_ruler_names_map_to_tasks():
    assert set(ruler.TASKS) == {
        "niah_single",
        "niah_multikey",
        "niah_essay",
        "variable_tracking",
        "common_words",
        "frequent_words",
        "passkey",
    }
    for name, (task, options) in ruler.RULER_TASKS.items():
        assert task in ruler.TASKS
        by_alias = ruler.generate(name, BYTES, 4000, 1)
        direct = ruler.generate(task, BYTES, 4000, 1, **options)
        assert by_alias[0].input_ids == direct[0].input_ids
        assert by_alias[0].task == task


# --- the answers are really in the prompt --------------------------------------------------------------

NEEDLE_PATTERN = re.compile(r"One of the special magic (\w+) for (.+?) is: ([\w-]+)\.")


def check_needles(samples, tokenizer, task, options):
    for sample in samples:
        text = tokenizer.decode(sample.input_ids)
        if task == "passkey":
            (key,) = sample.answers
            assert 1 <= int(key) < 10**7
            needle = f" The pass key is {key}. Remember it. {key} is the pass key."
            assert text.count(needle) == 1 and text.count(key) == 2
            assert text.startswith(ruler.PASSKEY_INTRO + " The ")
            assert text.endswith(" What is the pass key? The pass key is")
            assert tokenizer.decode(sample.input_ids[sample.needle_positions[0] :]).startswith(needle)
            continue
        needles = NEEDLE_PATTERN.findall(text)
        key_count = Counter(key for _, key, _ in needles)
        queried = re.search(r"for (.+) mentioned in the provided text \w+$", sample.answer_prefix).group(1)
        query_keys = re.split(r", and |, ", queried)
        value_type = options.get("value_type", "numbers")
        variant = options.get("variant", "single")
        assert len(query_keys) == (4 if variant == "multiquery" else 1)
        assert len(sample.answers) == (4 if variant in ("multiquery", "multivalue") else 1)
        for answer in sample.answers:
            found = [key for kind, key, value in needles if value == answer]
            assert found and found[0] in query_keys and len(found) == 1  # one needle holds each answer
            assert text.count(answer) == 1  # and the value occurs nowhere else
            assert text.count(f"for {found[0]} is: {answer}.") == 1
        for key in query_keys:
            assert key_count[key] == (4 if variant == "multivalue" else 1)
        assert all(kind == value_type for kind, _, _ in needles)
        if task == "niah_multikey":
            assert text.count("\n") == len(needles) + 1  # the haystack is nothing but needles, one a line
        else:
            n_needles = {"multikey": 4, "multivalue": 4, "multiquery": 4}.get(variant, 1)
            assert len(needles) == n_needles == len(sample.needle_positions)
        for position in sample.needle_positions:
            assert (
                tokenizer.decode(sample.input_ids[position:]).lstrip().startswith("One of the special magic")
            )
        if value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", answer) for answer in sample.answers)


@pytest.mark.parametrize(("task", "options"), NEEDLE_TASKS, ids=NEEDLE_IDS)
def test_each_needle_appears_once_byte_tokenizer(task, options):
    check_needles(ruler.generate(task, BYTES, 4000, 5, **options), BYTES, task, options)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "options"), NEEDLE_TASKS, ids=NEEDLE_IDS)
def test_each_needle_appears_once_bpe_tokenizer(bpe, task, options):
    check_needles(ruler.generate(task, bpe, 4000, 5, **options), bpe, task, options)


def test_keys_are_wonderwords_adjective_noun_pairs():
    nouns, adjectives, _ = wonderwords()
    nouns, adjectives = set(nouns), set(adjectives)
    assert len(adjectives) > 500 and len(nouns) > 5000
    for sample in ruler.generate("niah_single", BYTES, 2000, 10):
        key = re.search(r"for (.+) mentioned", sample.answer_prefix).group(1)
        splits = [(key[:i], key[i + 1 :]) for i, char in enumerate(key) if char == "-"]
        assert any(adjective in adjectives and noun in nouns for adjective, noun in splits)


def test_essay_haystack_comes_from_the_corpus():
    corpus = Corpus("tiny", ["Alpha beta gamma. Delta epsilon zeta! Eta theta iota?"])
    (sample,) = ruler.generate("niah_essay", BYTES, 1500, 1, corpus=corpus, depths=0.5)
    haystack = NEEDLE_PATTERN.sub("", sample.text.split("afterwards.\n", 1)[1].split("\nWhat is")[0])
    assert "Alpha beta gamma." in haystack and "Eta theta iota?" in haystack  # repeated as needed
    words = re.findall(r"[A-Za-z]+", haystack)[:-1]  # the last one may be cut
    assert set(words) == set(re.findall(r"[A-Za-z]+", corpus.documents[0]))
    with pytest.raises(OodlensError, match="no text"):
        ruler.generate("niah_essay", BYTES, 1500, 1, corpus=Corpus("empty", [" "]))


def check_common_words(sample, freq_cw, freq_ucw):
    main = sample.text.rsplit(ruler.CWE_HEAD, 1)[1].split("\nQuestion:")[0]
    parts = re.split(r"(?:^| )(\d+)\. ", main)[1:]
    numbers, words = [int(n) for n in parts[0::2]], parts[1::2]
    assert numbers == list(range(1, len(words) + 1))
    counts = Counter(words)
    top = counts.most_common(10)
    assert {word for word, _ in top} == set(sample.answers) and len(sample.answers) == 10
    assert all(counts[word] == freq_cw for word in sample.answers)
    assert all(count == freq_ucw for word, count in counts.items() if word not in sample.answers)
    assert len(counts) > 10


@pytest.mark.parametrize(("length", "freq_cw", "freq_ucw"), [(3000, 6, 1), (8000, 30, 3)])
def test_common_words_answers_are_the_most_frequent(length, freq_cw, freq_ucw):
    for sample in ruler.generate("common_words", BYTES, length, 3):
        check_common_words(sample, freq_cw, freq_ucw)
        # the worked example comes first and answers its own list
        example = sample.text.split("\nQuestion:")[0]
        example_counts = Counter(re.split(r"(?:^| )\d+\. ", example.split("\n", 1)[1])[1:])
        shown = re.split(r"(?:^| )\d+\. ", sample.text.split("are:", 1)[1].split("\n")[0].strip())[1:]
        assert {word for word, _ in example_counts.most_common(10)} == set(shown)
        assert not set(shown) & set(sample.answers)


def check_variable_tracking(sample):
    main = sample.text.rsplit("Memorize and track", 1)[1]
    value = re.search(r"assigned the value (\d+) in the text above", main).group(1)
    bound: dict[str, str] = {}
    for name, source in re.findall(r"^VAR (\w+) = (VAR \w+|\d+)$", main, flags=re.MULTILINE):
        bound[name] = source
    assert len(bound) == 5

    def resolve(name: str) -> str:
        source = bound[name]
        return resolve(source[4:]) if source.startswith("VAR ") else source

    assert {name for name in bound if resolve(name) == value} == set(sample.answers)
    assert len(sample.answers) == 5 and sample.answer_prefix.endswith("they are: ")
    # RULER's answer prefix word for word, its spelling included
    assert f"5 variables are assgined the value {value}, they are: " in sample.answer_prefix
    # the in-context example answers its own chain
    example = sample.text.split("Memorize and track")[1]
    example_value = re.search(r"assigned the value (\d+) in the text above", example).group(1)
    example_bound = dict(re.findall(r"^VAR (\w+) = (VAR \w+|\d+)$", example, flags=re.MULTILINE))
    given = example.split("they are: ")[1].split("\n")[0].split()
    assert set(given) == set(example_bound) and len(given) == 5
    assert example_bound[given[0]] == example_value and example_value != value


def test_variable_tracking_chain_binds_the_answers():
    for sample in ruler.generate("variable_tracking", BYTES, 4000, 4):
        check_variable_tracking(sample)
        for position in sample.needle_positions:
            assert BYTES.decode(sample.input_ids[position:]).startswith("\nVAR ")


def check_frequent_words(sample):
    context = sample.text.split(ruler.FWE_HEAD, 1)[1].split("\nQuestion:")[0]
    counts = Counter(context.split())
    noise = counts.pop(ruler.FWE_NOISE_WORD)
    ranked = counts.most_common()
    assert [word for word, _ in ranked[:3]] == sample.answers
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
    assert noise > ranked[0][1]
    assert all(re.fullmatch(r"[a-z]{6}", word) for word in counts)


def test_frequent_words_vocabulary_is_rulers_length_over_50():
    # RULER: vocab_size = max_seq_length // 50, the generated tokens counted in the length
    default = ruler.generate("frequent_words", BYTES, 2000, 1)[0].input_ids
    assert ruler.generate("frequent_words", BYTES, 2000, 1, vocab_size=40)[0].input_ids == default
    assert ruler.generate("frequent_words", BYTES, 2000, 1, vocab_size=39)[0].input_ids != default


def test_frequent_words_answers_are_ranks_two_to_four():
    for length in (1000, 8000):
        for sample in ruler.generate("frequent_words", BYTES, length, 3):
            check_frequent_words(sample)


@pytest.mark.slow
def test_answers_in_prompt_bpe_tokenizer(bpe):
    for sample in ruler.generate("common_words", bpe, 8000, 2):
        check_common_words(sample, 30, 3)
    for sample in ruler.generate("variable_tracking", bpe, 4000, 2):
        check_variable_tracking(sample)
    for sample in ruler.generate("frequent_words", bpe, 4000, 2):
        check_frequent_words(sample)


# --- depths and shared prefixes ------------------------------------------------------------------------


def test_depths_spread_evenly_and_move_the_needle():
    samples = ruler.generate("niah_single", BYTES, 6000, 5)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = [s.needle_positions[0] for s in samples]
    assert positions == sorted(positions) and positions[0] < positions[-1]
    head = len(samples[0].text.split("\n", 1)[0]) + 1
    for sample in samples:
        question = len(sample.text) - sample.text.rindex("\nWhat is")
        haystack = sample.prompt_tokens - head - question
        realised = (sample.needle_positions[0] - head) / haystack
        assert abs(realised - sample.depth) < 0.05
    cycled = ruler.generate("passkey", BYTES, 2000, 4, depths=[0.1, 0.9])
    assert [s.depth for s in cycled] == [0.1, 0.9, 0.1, 0.9]
    assert [s.depth for s in ruler.generate("passkey", BYTES, 2000, 2, depths=0.3)] == [0.3, 0.3]
    assert ruler.generate("passkey", BYTES, 2000, 1)[0].depth == 0.5
    assert ruler.generate("common_words", BYTES, 4000, 1)[0].depth is None


def check_shared_prefix(samples, smaller_depth_samples=None):
    shared = samples[0].shared_prefix_tokens
    assert all(s.shared_prefix_tokens == shared for s in samples)
    for sample in samples[1:]:
        assert sample.input_ids[:shared] == samples[0].input_ids[:shared]
    # the samples part soon after it (within the needle's fixed words), so it is as long as it can be
    common = 0
    while all(len(s.input_ids) > common for s in samples) and (
        len({s.input_ids[common] for s in samples}) == 1
    ):
        common += 1
    assert shared <= common <= shared + 48
    if smaller_depth_samples:
        small = smaller_depth_samples[0].shared_prefix_tokens
        assert small <= shared
        assert smaller_depth_samples[0].input_ids[:small] == samples[0].input_ids[:small]
    return shared


@pytest.mark.parametrize(("task", "options"), NEEDLE_TASKS, ids=NEEDLE_IDS)
def test_samples_at_one_depth_share_the_haystack_before_the_needle(task, options):
    length = 6000
    low = ruler.generate(task, BYTES, length, 3, depths=0.25, **options)
    high = ruler.generate(task, BYTES, length, 3, depths=0.75, **options)
    shared = check_shared_prefix(high, low)
    assert shared == high[0].needle_positions[0]
    assert shared > 0.5 * length  # most of the prompt can be reused
    assert check_shared_prefix(low) > 0.1 * length


@pytest.mark.parametrize("task", ["variable_tracking", "common_words", "frequent_words"])
def test_tasks_that_cannot_share_report_their_constant_head(task):
    samples = ruler.generate(task, BYTES, 3000, 3)
    shared = check_shared_prefix(samples)
    assert 0 < shared < 200


@pytest.mark.slow
@pytest.mark.parametrize(("task", "options"), NEEDLE_TASKS, ids=NEEDLE_IDS)
def test_shared_prefix_bpe_tokenizer(bpe, task, options):
    samples = ruler.generate(task, bpe, 4000, 3, depths=0.6, **options)
    assert check_shared_prefix(samples) > 0.4 * 4000


# --- passkey compatibility -----------------------------------------------------------------------------


def test_passkey_matches_oodlens_data_prompt():
    data = pytest.importorskip("oodlens.data")
    if not hasattr(data, "passkey_prompt"):
        pytest.skip("oodlens.data.passkey_prompt moved")
    theirs = data.passkey_prompt(BYTES, 2000, 0.5, seed=3)
    (ours,) = ruler.generate("passkey", BYTES, 2000, 1, depths=0.5, tokens_to_generate=0)
    # the same intro, filler, needle sentence and question; only the key and the amount of filler differ
    for text, key in (
        (BYTES.decode(theirs.input_ids.tolist()), theirs.passkey),
        (ours.text, ours.answers[0]),
    ):
        assert text.startswith(ruler.PASSKEY_INTRO + " " + ruler.NOISE + " " + ruler.NOISE)
        assert f" {ruler.NOISE} The pass key is {key}. Remember it. {key} is the pass key. The grass" in text
        assert text.endswith(" What is the pass key? The pass key is")


# --- scoring --------------------------------------------------------------------------------------------


def test_string_match_all_and_part_by_hand():
    assert ruler.string_match_all("the numbers are 123 and 456", ["123", "789"]) == 0.5
    assert ruler.string_match_all("the numbers are 123 and 456", ["123", "456"]) == 1.0
    assert ruler.string_match_all("Nothing here", ["123"]) == 0.0
    assert ruler.string_match_all("APPLE, Pear", ["apple", "pear", "plum", "fig"]) == 0.5
    assert ruler.string_match_part("the numbers are 123 and 456", ["123", "789"]) == 1.0
    assert ruler.string_match_part("the numbers are 12 and 456", ["123", "789"]) == 0.0
    assert ruler.passkey_match("The pass key is 4723978.", ["4723978"]) == 1.0
    assert ruler.passkey_match("12 then 4723978", ["4723978"]) == 0.0  # LM-Infinite reads the first number
    assert ruler.passkey_match("no number", ["4723978"]) == 0.0
    with pytest.raises(OodlensError, match="answers"):
        ruler.string_match_all("x", [])


def test_a_score_is_settled_only_when_more_text_cannot_change_it():
    assert ruler.settled("niah_single", " 7654321 and more", ["7654321"])
    assert not ruler.settled("niah_multivalue", " 7654321", ["7654321", "1234567"])  # one of two so far
    assert ruler.settled("vt", "abcde FGHIJ", ["ABCDE", "FGHIJ"])
    assert not ruler.settled("common_words", "", ["apple"])
    # passkey reads the first number, which the next token could still lengthen
    assert ruler.score("passkey", "4723978", ["4723978"]) == 1.0
    assert not ruler.settled("passkey", "4723978", ["4723978"])


def test_score_uses_each_tasks_metric():
    assert ruler.score("niah_single", " 7654321.", ["7654321"]) == 1.0
    assert ruler.score("vt", "ABCDE FGHIJ", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.5
    assert ruler.score("niah_multiquery", "1 and 2", ["1", "2", "3", "4"]) == 0.5
    assert ruler.score("passkey", "1234567", ["123"]) == 0.0  # string_match_all would say 1.0
    assert ruler.score("passkey", " 123.", ["123"]) == 1.0
    samples = ruler.generate("common_words", BYTES, 4000, 1)
    assert ruler.score(samples[0].task, " ".join(samples[0].answers[:5]), samples[0].answers) == 0.5
    assert samples[0].metric == "string_match_all"
    assert ruler.generate("passkey", BYTES, 1000, 1)[0].metric == "passkey_match"
    with pytest.raises(OodlensError, match="unknown task"):
        ruler.score("qa_1", "x", ["x"])


# --- errors ---------------------------------------------------------------------------------------------


def test_errors_name_the_fix():
    cases = [
        (dict(task="nope"), "unknown task 'nope'"),
        (dict(n_samples=0), "n_samples must be an integer ≥ 1"),
        (dict(length=256), r"too short .* use length ≥ \d+"),
        (dict(task="common_words", length=300), r"too short .* use length ≥ \d+"),
        (dict(task="passkey", length=100, tokens_to_generate=100), "tokens_to_generate"),
        (dict(task="passkey", depths=1.5), "depth must lie in"),
        (dict(task="niah_essay", variant="many"), "variant"),
        (dict(task="niah_multikey", value_type="words"), "value_type"),
        (dict(seed=-1), "seed"),
    ]
    for arguments, message in cases:
        arguments = {"task": "niah_single", "length": 1000, "n_samples": 1, **arguments}
        with pytest.raises(OodlensError, match=message) as error:
            ruler.generate(arguments.pop("task"), BYTES, arguments.pop("length"), **arguments)
        assert "\n" not in str(error.value)


def test_zeta_matches_the_closed_form():
    assert _zeta(2.0) == pytest.approx(np.pi**2 / 6, rel=1e-12)
    assert _zeta(4.0) == pytest.approx(np.pi**4 / 90, rel=1e-12)

"""Corpora, token windows and the passkey prompt; fast with the byte tokenizer, one check with SmolLM2's."""

from __future__ import annotations

import re
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

from oodlens.data import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    Corpus,
    load_corpus,
    passkey_prompt,
    token_windows,
)
from oodlens.errors import OodlensError
from oodlens.models import LoadedModel
from oodlens.tiny import EOS_ID, byte_tokenizer

BYTES = byte_tokenizer()
FILLER_TOKENS = len(PASSKEY_FILLER.encode())  # one token per byte


class CountingTokenizer:
    """The byte tokenizer, counting how often it is asked to tokenise."""

    def __init__(self) -> None:
        self.calls = 0
        self.name_or_path = BYTES.name_or_path
        self.eos_token_id = BYTES.eos_token_id

    def __len__(self) -> int:
        return len(BYTES)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return BYTES(*args, **kwargs)


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """Three documents of 50 bytes in nested folders, plus files that are not text corpora."""
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("a" * 50)
    (tmp_path / "b" / "c.md").write_text("c" * 50)
    (tmp_path / "b" / "d.rst").write_text("d" * 50)
    (tmp_path / "b" / "empty.text").write_text("  \n")
    (tmp_path / "code.py").write_text("x" * 500)
    return tmp_path


def test_python_docs_is_one_document_in_sorted_topic_order() -> None:
    corpus = load_corpus()
    assert corpus.name == "python-docs"
    (document,) = corpus.documents
    assert document == "\n\n".join(topics[key] for key in sorted(topics))
    assert len(document) > 400_000


def test_python_docs_size_in_smollm2_tokens(smollm2: LoadedModel) -> None:
    windows = token_windows(load_corpus(), smollm2.tokenizer, length=100_000)
    assert windows.shape == (1, 100_000)
    with pytest.raises(OodlensError, match=r"has 11\d{4} tokens"):  # about 113k tokens
        token_windows(load_corpus(), smollm2.tokenizer, length=130_000)


def test_windows_are_slices_of_the_document() -> None:
    corpus = load_corpus()
    document = corpus.documents[0].encode()  # byte tokens are the UTF-8 bytes
    windows = token_windows(corpus, BYTES, length=64, n_windows=5, seed=3)
    assert windows.shape == (5, 64) and windows.dtype == torch.long
    for window in windows:
        assert bytes(window.tolist()) in document


def test_windows_are_deterministic_per_seed() -> None:
    corpus = load_corpus()
    first = token_windows(corpus, BYTES, length=128, n_windows=4, seed=7)
    assert torch.equal(first, token_windows(corpus, BYTES, length=128, n_windows=4, seed=7))
    assert not torch.equal(first, token_windows(corpus, BYTES, length=128, n_windows=4, seed=8))


def test_tokenisation_is_cached_per_corpus_and_tokenizer() -> None:
    tokenizer = CountingTokenizer()
    corpus = Corpus("cache-test", ["some text " * 20])
    token_windows(corpus, tokenizer, length=16, seed=0)
    token_windows(corpus, tokenizer, length=32, n_windows=3, seed=1)
    assert tokenizer.calls == 1
    token_windows(Corpus("cache-test", ["other text " * 20]), tokenizer, length=16)
    assert tokenizer.calls == 2  # same name, new content: tokenised again


def test_too_long_error_names_the_available_tokens(text_folder: Path) -> None:
    corpus = load_corpus(str(text_folder))
    with pytest.raises(OodlensError, match="has 50 tokens in its longest document.*join_documents=True"):
        token_windows(corpus, BYTES, length=120)
    with pytest.raises(OodlensError, match=r"has 152 tokens in its longest \(joined\) document"):
        token_windows(corpus, BYTES, length=200, join_documents=True)


def test_join_documents_puts_eos_between_documents(text_folder: Path) -> None:
    corpus = load_corpus(str(text_folder))
    (window,) = token_windows(corpus, BYTES, length=152, join_documents=True)
    expected = [*b"a" * 50, EOS_ID, *b"c" * 50, EOS_ID, *b"d" * 50]
    assert window.tolist() == expected


@pytest.mark.parametrize(("length", "n_windows"), [(0, 1), (-5, 1), (8, 0)])
def test_non_positive_sizes(length: int, n_windows: int) -> None:
    with pytest.raises(OodlensError, match="must be positive"):
        token_windows(load_corpus(), BYTES, length=length, n_windows=n_windows)


def test_folder_corpus_reads_text_files_recursively_in_order(text_folder: Path) -> None:
    corpus = load_corpus(str(text_folder))
    assert corpus.documents == ["a" * 50, "c" * 50, "d" * 50]  # .py ignored, blank file dropped


def test_file_corpus_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.log"
    path.write_text("hello corpus")
    assert load_corpus(str(path)) == Corpus(str(path), ["hello corpus"])


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(OodlensError, match="holds no text"):
        load_corpus(str(tmp_path))


def test_missing_corpus_path(tmp_path: Path) -> None:
    with pytest.raises(OodlensError, match="check the path"):
        load_corpus(str(tmp_path / "nowhere"))


def test_hf_dataset_not_on_this_machine() -> None:
    # Either the datasets package is missing or the dataset is not cached: both must say what to do.
    with pytest.raises(OodlensError, match="(datasets package|not available on this machine)"):
        load_corpus("hf:no-such-owner/no-such-dataset:test")


# --- passkey ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [400, 517, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_length_and_depth(length: int, depth: float) -> None:
    sample = passkey_prompt(BYTES, length, depth, seed=11)
    assert length - FILLER_TOKENS < sample.length == len(sample.input_ids) <= length
    text = BYTES.decode(sample.input_ids)
    assert re.fullmatch(r"\d{5}", sample.passkey)
    assert text.count(sample.passkey) == 2
    assert text.endswith("What is the pass key? The pass key is")
    # The needle sits after the requested fraction of filler blocks (to the nearest block).
    n_blocks = text.count(PASSKEY_FILLER.strip())
    blocks_before = text[: text.index("The pass key is")].count(PASSKEY_FILLER.strip())
    assert abs(blocks_before - depth * n_blocks) <= 0.5
    assert sample.depth == blocks_before / n_blocks
    needle = BYTES.decode(sample.input_ids[sample.needle_position :])
    assert needle.startswith(f" The pass key is {sample.passkey}.")
    whole_needle = sample.input_ids[sample.needle_position : sample.needle_end]
    assert BYTES.decode(whole_needle) == PASSKEY_NEEDLE.format(key=sample.passkey)


def test_passkey_is_seeded() -> None:
    assert passkey_prompt(BYTES, 400, 0.5, seed=4).passkey == passkey_prompt(BYTES, 400, 0.5, seed=4).passkey
    assert len({passkey_prompt(BYTES, 400, 0.5, seed=seed).passkey for seed in range(5)}) > 1


def test_passkey_with_smollm2_tokenizer(smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer
    filler_tokens = len(tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    for length in (1000, 8192):
        sample = passkey_prompt(tokenizer, length, 0.5, seed=1)
        assert length - filler_tokens < sample.length <= length
        assert f"The pass key is {sample.passkey}." in tokenizer.decode(sample.input_ids)


def test_passkey_bad_arguments() -> None:
    with pytest.raises(OodlensError, match="too short"):
        passkey_prompt(BYTES, 100, 0.5)
    with pytest.raises(OodlensError, match="depth must lie in"):
        passkey_prompt(BYTES, 1000, 1.5)

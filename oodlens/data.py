"""Corpora, deterministic token windows and the passkey-retrieval prompt.

The default corpus, "python-docs", is the text of Python's own documentation topics (`pydoc_data.topics`),
which ships with every Python: about 113k SmolLM2 tokens of real English prose and code, no download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import OodlensError

DEFAULT_CORPUS = "python-docs"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text"})
DOCUMENT_SEPARATOR = "\n\n"  # between joined documents when the tokenizer has no eos token
MOSTLY_NOT_TEXT = 0.1  # a file with more invalid or control characters than this is refused

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


@dataclass
class Corpus:
    """Named text documents."""

    name: str
    documents: list[str]


@dataclass
class PasskeySample:
    """A passkey-retrieval prompt.

    input_ids: [length] token ids, no special tokens. length: its number of tokens. depth: where the needle
    sits, as the fraction of filler blocks before it. needle_position: index of the needle's first token;
    needle_end: index just after its last.
    """

    input_ids: torch.LongTensor
    passkey: str
    length: int
    depth: float
    needle_position: int
    needle_end: int


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    """Load a corpus.

    spec: "python-docs" (Python's documentation topics as one document), a text file (one document),
    a folder (every *.txt, *.md, *.rst, *.text file under it, sorted, one document each), or
    "hf:<dataset>[:<split>]" (a Hugging Face dataset already on this machine, column "text").
    """
    if spec == DEFAULT_CORPUS:
        from pydoc_data.topics import topics

        return Corpus(spec, [DOCUMENT_SEPARATOR.join(topics[key] for key in sorted(topics))])
    if spec.startswith("hf:"):
        return _load_hf_dataset(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        documents = [read_text(path)]
    elif path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.suffix in TEXT_SUFFIXES and file.is_file())
        documents = [read_text(file) for file in files]
    else:
        raise OodlensError(
            f"corpus {spec!r} is not 'python-docs', 'hf:<dataset>', a text file or a folder: check the path"
        )
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise OodlensError(
            f"corpus {spec!r} holds no text: give a file, or a folder of non-empty "
            f"{'/'.join(sorted(TEXT_SUFFIXES))} files"
        )
    return Corpus(str(path), documents)


def read_text(path: Path) -> str:
    """A file's text as UTF-8. Bytes that are not UTF-8 become U+FFFD with a warning saying how many; a file
    that is mostly not text (a binary, an image) is refused, since a report on it would be a report on noise.
    """
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    controls = sum(1 for char in text if char < " " and char not in "\n\r\t\f")
    share = (replaced + controls) / max(len(text), 1)
    if share > MOSTLY_NOT_TEXT:
        raise OodlensError(
            f"{str(path)!r} is not text ({share:.0%} of its characters are invalid UTF-8 or control bytes): "
            "pass a text file or a folder of text files"
        )
    if replaced:
        warnings.warn(
            f"oodlens: {str(path)!r} is not all UTF-8: {replaced} characters "
            f"({replaced / max(len(text), 1):.2%}) were replaced by U+FFFD",
            stacklevel=3,
        )
    return text


def _load_hf_dataset(spec: str) -> Corpus:
    dataset_name, _, split = spec.removeprefix("hf:").partition(":")
    split = split or "train"
    if importlib.util.find_spec("datasets") is None:
        raise OodlensError(f"{spec!r} needs the datasets package: pip install datasets, or use a folder")
    import datasets

    # Offline on purpose: a corpus must already be on this machine, never fetched (or waited for) mid-run.
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        dataset = datasets.load_dataset(dataset_name, split=split)
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, ...)
        raise OodlensError(
            f"dataset {dataset_name!r} (split {split!r}) is not available on this machine: "
            f"pass a local text file or folder instead ({type(error).__name__})"
        ) from error
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    if "text" not in dataset.column_names:
        raise OodlensError(f"dataset {dataset_name!r} has no 'text' column (it has {dataset.column_names})")
    documents = [text for text in dataset["text"] if text and text.strip()]
    if not documents:
        raise OodlensError(f"dataset {dataset_name!r} split {split!r} holds no text")
    return Corpus(spec, documents)


def token_windows(
    corpus: Corpus,
    tokenizer: Any,
    length: int,
    n_windows: int = 1,
    seed: int = 0,
    join_documents: bool = False,
) -> torch.LongTensor:
    """Draw token windows from a corpus: [n_windows, length] ids, no special tokens added.

    Each window lies inside one document long enough for it, every such (document, start) equally likely;
    the same seed gives the same windows. With join_documents the documents are first concatenated with
    the tokenizer's eos token (or "\\n\\n" without one) between them, so windows may span documents.
    """
    if length <= 0 or n_windows <= 0:
        raise OodlensError(f"length and n_windows must be positive, got {length} and {n_windows}")
    documents = _tokenized_documents(corpus, tokenizer)
    if join_documents:
        documents = [_joined(documents, _separator_ids(tokenizer))]
    n_starts = np.array([max(len(tokens) - length + 1, 0) for tokens in documents])
    if n_starts.sum() == 0:
        longest = max(len(tokens) for tokens in documents)
        if join_documents or len(documents) == 1:
            fix = "ask for a shorter length or use a bigger corpus"
        else:
            fix = "pass join_documents=True or ask for a shorter length"
        raise OodlensError(
            f"corpus {corpus.name!r} has {longest} tokens in its longest "
            f"{'(joined) ' if join_documents else ''}document, fewer than length={length}: {fix}"
        )
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_starts.sum(), size=n_windows)  # uniform over all valid (document, start) pairs
    ends = np.cumsum(n_starts)
    document_indices = np.searchsorted(ends, picks, side="right")
    starts = picks - (ends[document_indices] - n_starts[document_indices])
    windows = [documents[d][s : s + length] for d, s in zip(document_indices, starts, strict=True)]
    return torch.from_numpy(np.stack(windows))


def passkey_prompt(tokenizer: Any, length: int, depth: float, seed: int = 0) -> PasskeySample:
    """The usual passkey-retrieval prompt of at most `length` tokens.

    Intro, then filler blocks with the needle "The pass key is <key>. Remember it. ..." after the fraction
    `depth` (0..1) of them, then "What is the pass key? The pass key is". The 5-digit key comes from the
    seed. Each piece is tokenised on its own so the count is exact: the prompt has between
    `length - tokens_per_filler_block + 1` and `length` tokens (a filler block is 24 SmolLM2 tokens).
    """
    if not 0.0 <= depth <= 1.0:
        raise OodlensError(f"depth must lie in [0, 1] (a fraction of the filler), got {depth}")
    passkey = str(np.random.default_rng(seed).integers(10_000, 100_000))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, filler, question = encode(PASSKEY_INTRO), encode(PASSKEY_FILLER), encode(PASSKEY_QUESTION)
    needle = encode(PASSKEY_NEEDLE.format(key=passkey))
    fixed = len(intro) + len(needle) + len(question)
    n_blocks = (length - fixed) // len(filler)
    if n_blocks < 1:
        raise OodlensError(
            f"passkey length {length} is too short: with this tokenizer use at least "
            f"{passkey_minimum_length(tokenizer)}"
        )
    blocks_before = round(depth * n_blocks)
    before = intro + filler * blocks_before
    ids = before + needle + filler * (n_blocks - blocks_before) + question
    return PasskeySample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        passkey=passkey,
        length=len(ids),
        depth=blocks_before / n_blocks,
        needle_position=len(before),
        needle_end=len(before) + len(needle),
    )


def corpus_tokens(corpus: Corpus, tokenizer: Any) -> torch.LongTensor:
    """The whole corpus as one token stream ``[N]`` (documents joined as in ``token_windows``)."""
    return torch.from_numpy(_joined(_tokenized_documents(corpus, tokenizer), _separator_ids(tokenizer)))


def passkey_minimum_length(tokenizer: Any) -> int:
    """The shortest passkey prompt this tokenizer allows: intro, needle, question and one filler block."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    needle = PASSKEY_NEEDLE.format(key="99999")
    return sum(count(text) for text in (PASSKEY_INTRO, needle, PASSKEY_QUESTION, PASSKEY_FILLER))


# Tokenised corpora by (corpus name, tokenizer identity, content digest); a few entries at most, since one
# run uses one or two corpora and a large corpus holds many millions of ids.
_TOKEN_CACHE: dict[tuple[str, ...], list[np.ndarray]] = {}
_TOKEN_CACHE_ENTRIES = 4


def _tokenized_documents(corpus: Corpus, tokenizer: Any) -> list[np.ndarray]:
    """The corpus's documents as int64 id arrays, tokenised once per (corpus, tokenizer) in this process."""
    digest = hashlib.blake2b(DOCUMENT_SEPARATOR.join(corpus.documents).encode(), digest_size=16).hexdigest()
    key = (corpus.name, type(tokenizer).__name__, tokenizer.name_or_path, str(len(tokenizer)), digest)
    if key not in _TOKEN_CACHE:
        # verbose=False: a long document is the point here, not a mistake worth a warning.
        ids = tokenizer(corpus.documents, add_special_tokens=False, verbose=False)["input_ids"]
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_ENTRIES:
            del _TOKEN_CACHE[next(iter(_TOKEN_CACHE))]  # the oldest entry
        _TOKEN_CACHE[key] = [np.asarray(document_ids, dtype=np.int64) for document_ids in ids]
    return _TOKEN_CACHE[key]


def _separator_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]


def _joined(documents: list[np.ndarray], separator: list[int]) -> np.ndarray:
    pieces = []
    for index, tokens in enumerate(documents):
        if index:
            pieces.append(np.asarray(separator, dtype=np.int64))
        pieces.append(tokens)
    return np.concatenate(pieces)

"""RULER's retrieval tasks, needle in a haystack (niah_single, niah_multikey, niah_essay), and LM-Infinite's
passkey: presets of the engine in :mod:`.needles`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import OodlensError
from .needles import NeedleSpec, niah
from .sample import TaskSample

if TYPE_CHECKING:
    from ..data import Corpus


def niah_single(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER niah_single_1: noise haystack, one word key -> 7-digit number, needle at each depth."""
    return niah(
        NeedleSpec("niah_single", "noise"),
        tokenizer,
        length,
        n_samples,
        seed,
        depths,
        tokens_to_generate,
        add_bos,
    )


def niah_multikey(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    value_type: str = "numbers",
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER niah_multikey_2 (``value_type="numbers"``: word -> number) or _3 (``"uuids"``: uuid -> uuid):
    the haystack is nothing but distractor needles of the same form."""
    if value_type not in ("numbers", "uuids"):
        raise OodlensError(f"niah_multikey value_type must be 'numbers' or 'uuids', got {value_type!r}")
    key_type = "words" if value_type == "numbers" else "uuids"
    return niah(
        NeedleSpec("niah_multikey", "needle", key_type, value_type),
        tokenizer,
        length,
        n_samples,
        seed,
        depths,
        tokens_to_generate,
        add_bos,
    )


ESSAY_VARIANTS = {  # variant -> (num_keys, num_values, num_queries), as in RULER's synthetic.yaml
    "single": (1, 1, 1),
    "multikey": (4, 1, 1),
    "multivalue": (1, 4, 1),
    "multiquery": (4, 1, 4),
}


def niah_essay(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    corpus: Corpus | None = None,
    variant: str = "single",
    value_type: str = "numbers",
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """RULER's niah on an essay-style haystack: any corpus (default: Python's documentation topics).

    variant: "single" (niah_single_2, or _3 with ``value_type="uuids"``), "multikey" (4 keys, 1 queried:
    niah_multikey_1), "multivalue" (1 key, 4 values) or "multiquery" (4 keys, all queried). With several
    needles the first sits at ``depth`` and the others at random places after it."""
    if variant not in ESSAY_VARIANTS:
        raise OodlensError(f"niah_essay variant must be one of {sorted(ESSAY_VARIANTS)}, got {variant!r}")
    if value_type not in ("numbers", "uuids", "words"):
        raise OodlensError(f"niah_essay value_type must be 'numbers', 'uuids' or 'words', got {value_type!r}")
    spec = NeedleSpec("niah_essay", "essay", "words", value_type, *ESSAY_VARIANTS[variant])
    return niah(spec, tokenizer, length, n_samples, seed, depths, tokens_to_generate, add_bos, corpus)


def passkey(
    tokenizer: Any,
    length: int,
    n_samples: int = 1,
    seed: int = 0,
    *,
    depths: Any = None,
    tokens_to_generate: int | None = None,
    add_bos: bool = False,
) -> list[TaskSample]:
    """LM-Infinite's passkey retrieval: intro, noise filler, "The pass key is KEY. Remember it. KEY is the
    pass key." at each depth, KEY = a random integer in [1, 10^7), then "What is the pass key? The pass key
    is" (the prompt of ``oodlens.data.passkey_prompt``, which uses 5-digit keys)."""
    return niah(
        NeedleSpec("passkey", "passkey"),
        tokenizer,
        length,
        n_samples,
        seed,
        depths,
        tokens_to_generate,
        add_bos,
    )

"""Result objects show themselves briefly: a one-line repr and a small HTML card, never their tables."""

from __future__ import annotations

import pytest
import torch

import oodlens
from oodlens import evaluate
from oodlens.display import ratio_text
from oodlens.probe import ProbeConfig, run_probe

TRAIN = 64


@pytest.fixture(scope="module")
def results():
    loaded = oodlens.load_model("tiny:llama")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = torch.randint(3, 200, (1, 96), generator=torch.Generator().manual_seed(0))
    policies = [oodlens.vanilla(), oodlens.lm_infinite()]
    diagnosis = oodlens.diagnose(model, ids, progress=False)
    config = ProbeConfig(model="tiny:llama", length=400, new_tokens=8, passkey=False, progress=False)
    return {
        "Diagnosis": diagnosis,
        "TheoryReport": oodlens.check_theory(diagnosis),
        "PerplexityResult": evaluate.perplexity_by_position(model, ids, policies, progress=False),
        "PasskeyResult": evaluate.passkey_retrieval(
            model, tokenizer, policies, lengths=[400], progress=False
        ),
        "GenerationResult": evaluate.generation_quality(
            model, tokenizer, ids, policies, milestones=[80], new_tokens=8, progress=False
        ),
        "StreamingResult": evaluate.streaming_perplexity(model, ids[0], policies[1], progress=False),
        "ProbeResult": run_probe(config, loaded=loaded),
    }


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("Diagnosis", ["policy=vanilla", "windows=1 × 96 tokens", "max_logit_beyond="]),
        ("TheoryReport", ["entropy_bound_holds="]),
        ("PerplexityResult", ["train_length=64", "lm-infinite", "vanilla-truncated"]),
        ("PasskeyResult", ["prompts=9", "methods=3"]),  # 3 depths × 3 methods
        ("GenerationResult", ["continuations=2"]),
        ("StreamingResult", ["method=lm-infinite", "tokens=96"]),
        ("ProbeResult", ["model=tiny:llama", "1 × 400 tokens"]),
    ],
)
def test_short_repr_and_html(results, kind, expected):
    result = results[kind]
    text = repr(result)
    assert text.startswith(f"{kind}(") and len(text) < 400 and "\n" not in text
    assert all(part in text for part in expected), text
    page = result._repr_html_()
    assert page.startswith("<div><b>") and "<table>" in page and len(page) < 6000


@pytest.mark.parametrize(
    "estimate, text",
    [
        ({"value": 1.0004, "low": 0.9998, "high": 1.0011}, "+0.04 % [-0.02, +0.11]"),
        ({"value": 0.97, "low": None, "high": None}, "-3.00 %"),
        ({"value": 8.2868, "low": 7.6, "high": 9.1}, "8.29× [7.6, 9.1]"),
        ({"value": 0.25, "low": None, "high": None}, "0.25×"),
        ({"value": None, "low": None, "high": None}, "–"),
        (None, "–"),
    ],
)
def test_a_ratio_near_one_is_written_as_a_difference_in_percent(estimate, text):
    assert ratio_text(estimate) == text

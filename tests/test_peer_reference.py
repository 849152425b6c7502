"""Tests of the peer references themselves (tests/peer_reference.py), so that they can be trusted as oracles.

Three kinds of check, each able to fail: hand-written position tables (n = 12) for every rule; logits of the
tiny models under the reference against the models' own vanilla logits (no-op parameters must match to 1e-5,
active ones must differ); and cross-checks against transformers' own code (linear RoPE scaling against
positions i/f, STRING's factor against the rotary module's attention scaling, decoding against prefill).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from transformers import DynamicCache

from oodlens.tiny import TINY_FAMILIES, tiny_model

from .peer_reference import (
    STRING_ATTENTION_FACTOR,
    PeerReference,
    Rule,
    dual_chunk,
    family_rotation,
    leaky_rerope,
    linear_interpolation,
    model_with_rope_parameters,
    position_tables,
    rerope,
    self_extend,
    streaming_llm,
    string,
    vanilla_rule,
)

LENGTH = 96  # beyond the tiny models' training length of 64
TRAIN = 64
TOL = 1e-5
ROPE_FAMILIES = [family for family in TINY_FAMILIES if family != "gpt2"]
# families whose every layer is global and whose config has rope_parameters (GPT-J hard-codes its table)
GLOBAL_ROPE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]

# Parameters that make each rule plain attention at LENGTH tokens.
NOOP_RULES = {
    "streaming-llm window >= n": streaming_llm(4, LENGTH),
    "streaming-llm no sinks, window >= n": streaming_llm(0, LENGTH + 10),
    "self-extend G = 1": self_extend(1, 8),
    "self-extend W >= n": self_extend(4, LENGTH),
    "self-extend log base >= n": self_extend(1, 8, log_scale_base=LENGTH),
    "rerope w >= n": rerope(LENGTH),
    "leaky-rerope k = 1": leaky_rerope(8, 1),
    "leaky-rerope w >= n": leaky_rerope(LENGTH, 4),
    "string S >= n, factor 1": string(LENGTH, 8, attention_factor=1.0),
    "string S = W, factor 1": string(20, 20, attention_factor=1.0),
    "dual-chunk c >= n": dual_chunk(LENGTH + 8, 8),
    "dual-chunk N <= L": dual_chunk(LENGTH + 8, 8, pretraining_length=LENGTH),
    "pi factor 1": linear_interpolation(1.0),
}
ACTIVE_RULES = {
    "streaming-llm": streaming_llm(4, 20),
    "self-extend": self_extend(4, 16),
    "self-extend fractional": self_extend(4, 6),
    "self-extend floor shift": self_extend(4, 6, floor_shift=True),
    "self-extend log scale": self_extend(1, 8, log_scale_base=8),
    "rerope": rerope(16),
    "rerope log scale": rerope(16, log_scale_base=TRAIN),
    "leaky-rerope": leaky_rerope(16, 4),
    "string": string(32, 8),
    "string factor only": string(LENGTH, 8),
    "dual-chunk": dual_chunk(48, 8),
    "dual-chunk mscale": dual_chunk(48, 8, pretraining_length=TRAIN),
    "pi": linear_interpolation(2.0),
}


def _ids(length=LENGTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, length), generator=generator)


def _tiny(family):
    # GPT-J looks RoPE up in a table of max_position_embeddings rows, so its table is made longer.
    overrides = {"max_position_embeddings": 256} if family == "gptj" else {}
    return tiny_model(family, **overrides).model


def _logits(model, ids, rule=None):
    with torch.no_grad():
        if rule is None:
            return model(ids).logits
        with PeerReference(model, rule):
            return model(ids).logits


def _gap(a, b):
    return (a - b).abs().max().item()


def _cache_keyword(model):
    """transformers 5.24+ names the cache argument `cache`; 5.17 only knows `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").model


@pytest.fixture(scope="module")
def vanilla_logits(llama):
    return _logits(llama, _ids())


# ---------------------------------------------------------------------------- hand-written position tables


def _table(text):
    """Rows of numbers, '.' where the key is not visible -> (visible [n, n], values with nan where hidden)."""
    rows = [line.split() for line in text.strip().splitlines()]
    n = len(rows)
    rows = [row + ["."] * (n - len(row)) for row in rows]  # the upper triangle may be left out
    numbers = [[math.nan if x == "." else float(x) for x in row] for row in rows]
    values = torch.tensor(numbers, dtype=torch.float64)
    return ~values.isnan(), values


def _assert_tables(rule, query_text, key_text):
    visible, query_pos = _table(query_text)
    key_visible, key_pos = _table(key_text)
    assert torch.equal(visible, key_visible), "the two hand tables disagree on visibility"
    got = position_tables(rule, len(visible))
    assert torch.equal(got.visible, visible)
    assert torch.equal(got.query_pos[visible], query_pos[visible])
    assert torch.equal(got.key_pos[visible], key_pos[visible])


def test_streaming_llm_positions_before_and_after_the_cache_is_full():
    # S = 2 sinks, R = 4 recent keys counting the query: the cache holds S + R − 1 = 5 keys besides the
    # query. Up to i = 5 nothing is evicted and every key keeps its true position; from i = 6 the query sits
    # in slot 5, the sinks in slots 0-1 (distance 5 − j instead of i − j) and the recent keys in slots 2-5.
    _assert_tables(
        streaming_llm(n_sink=2, window=4),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 4
        5 5 5 5 5 5
        5 5 . 5 5 5 5
        5 5 . . 5 5 5 5
        5 5 . . . 5 5 5 5
        5 5 . . . . 5 5 5 5
        5 5 . . . . . 5 5 5 5
        5 5 . . . . . . 5 5 5 5
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 1 2 3 4
        0 1 2 3 4 5
        0 1 . 2 3 4 5
        0 1 . . 2 3 4 5
        0 1 . . . 2 3 4 5
        0 1 . . . . 2 3 4 5
        0 1 . . . . . 2 3 4 5
        0 1 . . . . . . 2 3 4 5
        """,
    )


def test_self_extend_positions_when_the_group_divides_the_window():
    # G = 2, W = 4: neighbours (i − j < 4) at true positions; the rest: query ⌊i/2⌋ + 4 − 2, key ⌊j/2⌋.
    _assert_tables(
        self_extend(group_size=2, window=4),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 4
        4 4 5 5 5 5
        5 5 5 6 6 6 6
        5 5 5 5 7 7 7 7
        6 6 6 6 6 8 8 8 8
        6 6 6 6 6 6 9 9 9 9
        7 7 7 7 7 7 7 10 10 10 10
        7 7 7 7 7 7 7 7 11 11 11 11
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 1 2 3 4
        0 0 2 3 4 5
        0 0 1 3 4 5 6
        0 0 1 1 4 5 6 7
        0 0 1 1 2 5 6 7 8
        0 0 1 1 2 2 6 7 8 9
        0 0 1 1 2 2 3 7 8 9 10
        0 0 1 1 2 2 3 3 8 9 10 11
        """,
    )


SELF_EXTEND_FRACTIONAL_KEYS = """
    0
    0 1
    0 1 2
    0 1 2 3
    0 1 2 3 4
    0 1 2 3 4 5
    0 1 2 3 4 5 6
    0 0 2 3 4 5 6 7
    0 0 0 3 4 5 6 7 8
    0 0 0 0 4 5 6 7 8 9
    0 0 0 0 1 5 6 7 8 9 10
    0 0 0 0 1 1 6 7 8 9 10 11
    """


def test_self_extend_positions_are_fractional_when_the_group_does_not_divide_the_window():
    # G = 4, W = 6: grouped queries sit at ⌊i/4⌋ + 6 − 6/4 = ⌊i/4⌋ + 4.5 (self_extend_patch/Llama.py).
    _assert_tables(
        self_extend(group_size=4, window=6),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 4
        5 5 5 5 5 5
        5.5 6 6 6 6 6 6
        5.5 5.5 7 7 7 7 7 7
        6.5 6.5 6.5 8 8 8 8 8 8
        6.5 6.5 6.5 6.5 9 9 9 9 9 9
        6.5 6.5 6.5 6.5 6.5 10 10 10 10 10 10
        6.5 6.5 6.5 6.5 6.5 6.5 11 11 11 11 11 11
        """,
        SELF_EXTEND_FRACTIONAL_KEYS,
    )


def test_self_extend_floor_shift_rounds_the_group_query_position():
    # The variant with W − ⌊W/G⌋ = 6 − 1 = 5 (the flash decode branch, Llama_4_40.py, Mistral/Qwen2/Phi).
    _assert_tables(
        self_extend(group_size=4, window=6, floor_shift=True),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 4
        5 5 5 5 5 5
        6 6 6 6 6 6 6
        6 6 7 7 7 7 7 7
        7 7 7 8 8 8 8 8 8
        7 7 7 7 9 9 9 9 9 9
        7 7 7 7 7 10 10 10 10 10 10
        7 7 7 7 7 7 11 11 11 11 11 11
        """,
        SELF_EXTEND_FRACTIONAL_KEYS,
    )


def test_rerope_positions():
    # w = 3: far keys unrotated (position 0) and the query at position 3, so every far distance is 3.
    _assert_tables(
        rerope(window=3),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        3 3 4 4 4
        3 3 3 5 5 5
        3 3 3 3 6 6 6
        3 3 3 3 3 7 7 7
        3 3 3 3 3 3 8 8 8
        3 3 3 3 3 3 3 9 9 9
        3 3 3 3 3 3 3 3 10 10 10
        3 3 3 3 3 3 3 3 3 11 11 11
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 0 2 3 4
        0 0 0 3 4 5
        0 0 0 0 4 5 6
        0 0 0 0 0 5 6 7
        0 0 0 0 0 0 6 7 8
        0 0 0 0 0 0 0 7 8 9
        0 0 0 0 0 0 0 0 8 9 10
        0 0 0 0 0 0 0 0 0 9 10 11
        """,
    )


def test_leaky_rerope_positions():
    # w = 3, k = 2: far query at (i + 3)/2, far key at j/2, so the distance is 3 + (i − j − 3)/2.
    _assert_tables(
        leaky_rerope(window=3, k=2),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        3.5 3.5 4 4 4
        4 4 4 5 5 5
        4.5 4.5 4.5 4.5 6 6 6
        5 5 5 5 5 7 7 7
        5.5 5.5 5.5 5.5 5.5 5.5 8 8 8
        6 6 6 6 6 6 6 9 9 9
        6.5 6.5 6.5 6.5 6.5 6.5 6.5 6.5 10 10 10
        7 7 7 7 7 7 7 7 7 11 11 11
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 0.5 2 3 4
        0 0.5 1 3 4 5
        0 0.5 1 1.5 4 5 6
        0 0.5 1 1.5 2 5 6 7
        0 0.5 1 1.5 2 2.5 6 7 8
        0 0.5 1 1.5 2 2.5 3 7 8 9
        0 0.5 1 1.5 2 2.5 3 3.5 8 9 10
        0 0.5 1 1.5 2 2.5 3 3.5 4 9 10 11
        """,
    )


def test_string_positions():
    # S = 5, W = 2: pairs at distance >= 5 move the query to i − 5 + 2, so their distance is i − j − 3.
    _assert_tables(
        string(shifted_offset=5, small_local_value=2),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 4
        2 5 5 5 5 5
        3 3 6 6 6 6 6
        4 4 4 7 7 7 7 7
        5 5 5 5 8 8 8 8 8
        6 6 6 6 6 9 9 9 9 9
        7 7 7 7 7 7 10 10 10 10 10
        8 8 8 8 8 8 8 11 11 11 11 11
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 1 2 3 4
        0 1 2 3 4 5
        0 1 2 3 4 5 6
        0 1 2 3 4 5 6 7
        0 1 2 3 4 5 6 7 8
        0 1 2 3 4 5 6 7 8 9
        0 1 2 3 4 5 6 7 8 9 10
        0 1 2 3 4 5 6 7 8 9 10 11
        """,
    )


def test_dual_chunk_positions():
    # s = 5, w = 1: chunks of c = 4 (0-3, 4-7, 8-11); keys at j mod 4; the query at i mod 4 in its own chunk,
    # min(i mod 4 + 4, 5) for the previous chunk and min(2·4 − 1, 5) = 5 for older chunks.
    _assert_tables(
        dual_chunk(chunk_size=5, local_window=1),
        """
        0
        1 1
        2 2 2
        3 3 3 3
        4 4 4 4 0
        5 5 5 5 1 1
        5 5 5 5 2 2 2
        5 5 5 5 3 3 3 3
        5 5 5 5 4 4 4 4 0
        5 5 5 5 5 5 5 5 1 1
        5 5 5 5 5 5 5 5 2 2 2
        5 5 5 5 5 5 5 5 3 3 3 3
        """,
        """
        0
        0 1
        0 1 2
        0 1 2 3
        0 1 2 3 0
        0 1 2 3 0 1
        0 1 2 3 0 1 2
        0 1 2 3 0 1 2 3
        0 1 2 3 0 1 2 3 0
        0 1 2 3 0 1 2 3 0 1
        0 1 2 3 0 1 2 3 0 1 2
        0 1 2 3 0 1 2 3 0 1 2 3
        """,
    )


def test_dual_chunk_older_chunks_use_two_chunks_minus_one_when_the_chunk_is_short():
    # s = 6, w = 3: c = 3 <= w, so older chunks see the query at min(2·3 − 1, 6) = 5, not at s.
    tables = position_tables(dual_chunk(chunk_size=6, local_window=3), 9)
    assert tables.query_pos[6, :7].tolist() == [5, 5, 5, 3, 3, 3, 0]
    assert tables.query_pos[8, :9].tolist() == [5, 5, 5, 5, 5, 5, 2, 2, 2]
    assert tables.key_pos[8, :9].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]


# max(1, ln(i + 1) / ln 4) for i = 0 … 11, i.e. log2(i + 1)/2 from i = 3 on
LOG4_SCALES = [1, 1, 1, 1, 1.160964, 1.292481, 1.403677, 1.5, 1.584963, 1.660964, 1.729716, 1.792481]


@pytest.mark.parametrize(
    "rule",
    [rerope(3, log_scale_base=4), leaky_rerope(3, 2, log_scale_base=4), self_extend(2, 4, log_scale_base=4)],
    ids=lambda rule: rule.name,
)
def test_log_scale_per_query(rule):
    tables = position_tables(rule, 12)
    expected = torch.tensor(LOG4_SCALES, dtype=torch.float64)[:, None].expand(12, 12)
    assert torch.allclose(tables.logit_scale, expected, atol=1e-6)


def test_constant_logit_factors():
    def scales(rule, n):
        return position_tables(rule, n).logit_scale

    assert torch.allclose(scales(string(5, 2), 12), torch.tensor(1.143434, dtype=torch.float64))  # 1.069315²
    assert torch.all(scales(rerope(3), 12) == 1)
    # DCA: (0.05 ln(N/L) + 1)² once the N keys of the call exceed L = 8, here (0.05 ln 1.5 + 1)²; 1 up to L
    assert torch.allclose(scales(dual_chunk(5, 1, 8), 12), torch.tensor(1.040958, dtype=torch.float64))
    assert torch.all(scales(dual_chunk(5, 1, 8), 8) == 1)


def test_rules_refuse_impossible_parameters():
    with pytest.raises(ValueError):
        dual_chunk(8, 8)
    with pytest.raises(ValueError):
        self_extend(0, 8)
    with pytest.raises(ValueError):
        streaming_llm(-1, 8)
    with pytest.raises(ValueError):
        position_tables(rerope(8, log_scale_base=1), 4)


# ---------------------------------------------------------------------------- logits of the tiny models


@pytest.mark.parametrize("name", list(NOOP_RULES))
def test_noop_rule_equals_vanilla(llama, vanilla_logits, name):
    assert _gap(_logits(llama, _ids(), NOOP_RULES[name]), vanilla_logits) < TOL


@pytest.mark.parametrize("name", list(ACTIVE_RULES))
def test_active_rule_changes_the_logits(llama, vanilla_logits, name):
    assert _gap(_logits(llama, _ids(), ACTIVE_RULES[name]), vanilla_logits) > 1e-3


def _shifted(rule, offset):
    """The same rule with every position moved by `offset`: RoPE sees only differences, so nothing changes."""

    def table(i, j):
        visible, query_pos, key_pos, scale = rule(i, j)
        return visible, query_pos + offset, key_pos + offset, scale

    return Rule(f"{rule.name}+{offset}", table)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_every_family_fractional_positions_and_own_layers(family):
    """GQA, partial (Phi-3, GPT-NeoX) and interleaved (GPT-J) rotation, soft-cap, sliding layers, fractional
    positions: a uniform shift of every position must change nothing, on every family."""
    model = _tiny(family)
    ids = _ids()
    plain = _logits(model, ids)
    assert _gap(_logits(model, ids, _shifted(vanilla_rule(), 7.25)), plain) < TOL
    assert _gap(_logits(model, ids, rerope(10**6)), plain) < TOL
    active, moved = ACTIVE_RULES["leaky-rerope"], _shifted(ACTIVE_RULES["leaky-rerope"], 3.5)
    assert _gap(_logits(model, ids, moved), _logits(model, ids, active)) < TOL
    changed = _gap(_logits(model, ids, ACTIVE_RULES["streaming-llm"]), plain)
    if family == "mistral-sliding":  # every layer slides: the rule has nothing to act on
        assert changed < TOL
    else:
        assert changed > 1e-3


def test_only_the_distance_matters(llama):
    # ReRoPE's far segment written as (w, 0) or as (i, i − w) gives the same logits
    window = 16

    def table(i, j):
        near = i - j < window
        return torch.ones((), dtype=torch.bool), i + 0 * j, torch.where(near, j, i - window), torch.ones(())

    ids = _ids()
    as_shift = Rule("rerope-as-shift", table)
    assert _gap(_logits(llama, ids, as_shift), _logits(llama, ids, rerope(window))) < TOL


@pytest.mark.parametrize("name", [name for name in ACTIVE_RULES if name != "dual-chunk mscale"])
def test_decoding_with_a_cache_matches_one_forward(llama, name):
    # The rule sees absolute positions K − Q + q, so a prefill followed by single steps gives the one-forward
    # logits. (DCA's mscale depends on the number of keys in each call, so it is left out: see methods.md.)
    rule, ids, start = ACTIVE_RULES[name], _ids(), LENGTH - 5
    keyword = _cache_keyword(llama)
    with torch.no_grad(), PeerReference(llama, rule):
        whole = llama(ids).logits
        cache = {keyword: DynamicCache(config=llama.config), "use_cache": True}
        steps = [llama(ids[:, :start], **cache).logits[:, -1:]]
        for position in range(start, LENGTH):
            steps.append(llama(ids[:, position : position + 1], **cache).logits)
    assert _gap(torch.cat(steps, 1), whole[:, start - 1 :]) < TOL


def test_gptj_fractional_rotation_composes_with_its_table():
    model = _tiny("gptj")
    attention = next(m for m in model.modules() if type(m).__name__ == "GPTJAttention")
    rotate = family_rotation(model, attention)
    x = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(1))
    by_table = rotate(x, torch.tensor([3, 40, 200]))
    fractional = rotate(x, torch.tensor([3.5, 40.25, 199.75]))  # GPT-J's own formula, not its table
    by_formula = rotate(fractional, torch.tensor([0.5, 0.25, -0.25]), inverse=True)
    assert _gap(by_formula, by_table) < 1e-5
    assert _gap(rotate(by_table, torch.tensor([3, 40, 200]), inverse=True), x) < 1e-5


# ---------------------------------------------------------------------------- RoPE rescaling and cross-checks


@pytest.mark.parametrize("family", GLOBAL_ROPE_FAMILIES)
def test_linear_rope_scaling_equals_interpolated_positions(family):
    # transformers' own PI (rope_type linear, factor f) against the reference rotating at i/f and j/f
    model, ids = _tiny(family), _ids()
    scaled = model_with_rope_parameters(model, {"rope_type": "linear", "factor": 2.0})
    by_rope = _logits(scaled, ids)
    assert _gap(by_rope, _logits(model, ids, linear_interpolation(2.0))) < TOL
    assert _gap(by_rope, _logits(model, ids)) > 1e-3


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox", "gemma3"])
def test_rope_parameters_keep_theta_and_partial_rotary(family):
    # factor 1 must be the same model: without inheriting partial_rotary_factor, Phi-3 and GPT-NeoX would
    # start rotating the whole head (and without rope_theta the load would fail)
    model, ids = _tiny(family), _ids()
    same = model_with_rope_parameters(model, {"rope_type": "linear", "factor": 1.0})
    assert _gap(_logits(same, ids), _logits(model, ids)) < TOL


def test_string_factor_is_the_rotary_attention_scaling(llama):
    # STRING multiplies cos and sin by its factor; transformers' rotary modules have the same hook
    ids = _ids()
    scaled = copy.deepcopy(llama)
    scaled.model.rotary_emb.attention_scaling = STRING_ATTENTION_FACTOR
    assert _gap(_logits(llama, ids, string(LENGTH, 8)), _logits(scaled, ids)) < TOL


def test_yarn_attention_factor_and_rebuilding_after_load(llama):
    ids = _ids()
    yarn = {"rope_type": "yarn", "factor": 4.0}
    loaded = model_with_rope_parameters(llama, yarn)
    assert loaded.config.rope_parameters["original_max_position_embeddings"] == TRAIN
    assert loaded.model.rotary_emb.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    # the other way in: change the config of the loaded model and rebuild its rotary embedding
    rebuilt = copy.deepcopy(llama)
    rebuilt.config.rope_parameters = {"rope_theta": 10000.0, **yarn}
    rebuilt.model.rotary_emb = type(llama.model.rotary_emb)(rebuilt.config)
    assert _gap(_logits(rebuilt, ids), _logits(loaded, ids)) < TOL
    assert _gap(_logits(loaded, ids), _logits(llama, ids)) > 1e-3
    # the reference keeps YaRN's factor on q and k while it re-rotates them
    assert _gap(_logits(loaded, ids, rerope(10**6)), _logits(loaded, ids)) < TOL


def test_dynamic_ntk_changes_nothing_within_the_training_length(llama):
    dynamic = model_with_rope_parameters(llama, {"rope_type": "dynamic", "factor": 2.0})
    short, long = _ids(TRAIN), _ids()
    assert _gap(_logits(dynamic, short), _logits(llama, short)) < TOL
    assert _gap(_logits(dynamic, long), _logits(llama, long)) > 1e-3
    with pytest.raises(ValueError, match="dynamic"):  # its frequencies depend on each call's positions
        _logits(dynamic, short, rerope(8))


def test_rope_parameters_need_a_rope_model():
    with pytest.raises(ValueError):
        model_with_rope_parameters(_tiny("gptj"), {"rope_type": "linear", "factor": 2.0})

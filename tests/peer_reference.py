"""Independent dense references for the training-free length-extension peers, written from their formulas.

Nothing here imports oodlens. Each peer is a :class:`Rule`: a function of the absolute query positions ``i``
and key positions ``j`` that says, for every pair (i, j), whether the key is visible, at which position the
query is rotated (``query_pos``, P), at which position the key is rotated (``key_pos``, K), and by what factor
the raw logit is multiplied (``logit_scale``: log-n scaling, STRING's and DCA's cos/sin factors squared).
The rules are written from the peers' own code (see docs/methods.md for the sources and the traps):

    streaming_llm(n_sink, window)        mit-han-lab/streaming-llm, pos_shift/modify_llama.py + kv_cache.py
    self_extend(group_size, window)      datamllab/LongLM, self_extend_patch/Llama.py (self_extend_forward)
    rerope(window), leaky_rerope(w, k)   bojone/rerope, rerope_patch.py / leaky_rerope_patch.py
    string(shifted_offset, local)        HKUNLP/STRING, string_for_llama.py (forward, replace_with_string)
    dual_chunk(chunk_size, local_window) HKUNLP/ChunkLlama, chunkllama_attn_replace.py
    linear_interpolation(factor)         positional interpolation written as positions i/f, j/f

:class:`PeerReference` registers a dense attention function with transformers' ``AttentionInterface``. The
model hands it queries and keys already rotated at their absolute positions (query row q of Q sits at position
K − Q + q of the cached sequence). The reference un-rotates them with the family's *own* rotary code, rotates
every pair again at (P, K) (the full Q × K × head_dim tensor is built: tiny models only), multiplies by the
rule's factor, soft-caps if the model does, masks, and takes the softmax in float32. Layers that the model
itself runs with a sliding window keep their own behaviour, as in ``tests/reference.py``.

Fractional positions: every Llama-like rotary module in transformers 5 computes ``position_ids.float() *
inv_freq``, so it accepts float positions and is used as is. GPT-J looks its (sin, cos) up in an integer
table; there integral positions use the table and fractional ones use sin/cos computed in float32 from GPT-J's
own frequency formula, which is checked against the table on construction.

``model_with_rope_parameters`` is the reference for RoPE rescaling (PI, dynamic NTK, YaRN, llama3, longrope):
the same weights, loaded by ``from_pretrained`` with the new ``rope_parameters``.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM

from .reference import RegisteredAttention

PEER_REFERENCE_NAME = "oodlens_test_peer_reference"
# STRING's replace_with_string: cos and sin are multiplied by 0.1 ln 2 + 1, so every logit by its square.
STRING_ATTENTION_FACTOR = 0.1 * math.log(2) + 1
# Rotary types whose frequencies change with the longest position seen in a call: calling the rotary module
# again from inside attention would change its state, so the reference refuses them.
STATEFUL_ROPE_TYPES = ("dynamic", "longrope")


class PairTable(NamedTuple):
    """What a rule says about every (query, key) pair; all tensors are [Q, K]."""

    visible: torch.Tensor  # bool; causality (j <= i) is part of every rule
    query_pos: torch.Tensor  # float64: P, where the query is rotated for this pair
    key_pos: torch.Tensor  # float64: K, where the key is rotated for this pair
    logit_scale: torch.Tensor  # float64: factor on the raw logit q·k·scaling (before any soft-cap)


@dataclass(frozen=True)
class Rule:
    """A peer method as a function of absolute positions: ``rule(i [Q, 1], j [1, K]) -> PairTable``."""

    name: str
    table: Callable[[torch.Tensor, torch.Tensor], PairTable]

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> PairTable:
        i = torch.as_tensor(i, dtype=torch.int64).reshape(-1, 1)
        j = torch.as_tensor(j, dtype=torch.int64).reshape(1, -1)
        visible, query_pos, key_pos, scale = self.table(i, j)
        shape = (i.shape[0], j.shape[1])
        return PairTable(
            visible.expand(shape) & (j <= i),
            query_pos.to(torch.float64).expand(shape),
            key_pos.to(torch.float64).expand(shape),
            torch.as_tensor(scale, dtype=torch.float64).expand(shape),
        )


def position_tables(rule: Rule, n: int) -> PairTable:
    """The rule's tables for a sequence of n tokens read in one forward (i, j = 0 … n − 1)."""
    positions = torch.arange(n)
    return rule(positions, positions)


def _positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _log_scale(i: torch.Tensor, base: float | None) -> torch.Tensor:
    """max(1, ln(i + 1) / ln(base)) per query (ReRoPE, Self-Extend's optional scale); 1 when base is None."""
    if base is None:
        return torch.ones((), dtype=torch.float64)
    if base <= 1:
        raise ValueError(f"the log-scale base must exceed 1, got {base}")
    return (torch.log((i + 1).to(torch.float64)) / math.log(base)).clamp(min=1.0)


def vanilla_rule() -> Rule:
    """Plain causal attention at the true positions."""
    return Rule("vanilla", lambda i, j: (j <= i, i, j, torch.ones(())))


def linear_interpolation(factor: float) -> Rule:
    """Positional interpolation (PI) as positions: every query at i / f, every key at j / f."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return Rule(f"pi-{factor:g}", lambda i, j: (j <= i, _f64(i) / factor, _f64(j) / factor, torch.ones(())))


def streaming_llm(n_sink: int, window: int) -> Rule:
    """StreamingLLM decoded one token at a time (the official perplexity loop), S = n_sink, R = window.

    R counts the query itself: after each step the official cache keeps S sinks and ``recent_size`` keys, then
    the next token is added, so R = recent_size + 1 (attention_sinks: R = attention_sink_window_size + 1).
    Key j is visible iff j < S or i − j < R. Positions are cache slots: the query sits at min(i, S + R − 1),
    sinks at j, and a recent key at its slot j − (i − P). Until the cache is full (i < S + R − 1) every key
    keeps its true distance; afterwards a sink is seen at distance S + R − 1 − j.
    """
    if n_sink < 0:
        raise ValueError(f"n_sink must be at least 0, got {n_sink}")
    _positive(window=window)
    last_slot = n_sink + window - 1

    def table(i, j):
        query_pos = i.clamp(max=last_slot)
        key_pos = torch.where(j < n_sink, j, j - (i - query_pos))
        return (j < n_sink) | (i - j < window), query_pos, key_pos, torch.ones(())

    return Rule(f"streaming-llm-{n_sink}-{window}", table)


def self_extend(
    group_size: int, window: int, log_scale_base: float | None = None, floor_shift: bool = False
) -> Rule:
    """Self-Extend with group size G (``group_size_1``) and neighbour window W (``group_size_2``).

    Every causal key is visible. i − j < W: true positions. Otherwise the query sits at ⌊i/G⌋ + W − W/G and
    the key at ⌊j/G⌋; W/G is a true division in ``self_extend_forward`` of self_extend_patch/Llama.py, so
    the query position is fractional when G does not divide W. ``floor_shift=True`` uses W − ⌊W/G⌋ instead,
    as the decode branch of the flash paths, Llama_4_40.py's torch path and the Mistral/Qwen2/Phi patches do.
    ``log_scale_base`` (their ``scale_base``; off by default, the pretraining length when on) multiplies every
    logit of query i by max(1, ln(i + 1) / ln(base)).
    """
    _positive(group_size=group_size, window=window)
    shift = window - (window // group_size if floor_shift else window / group_size)

    def table(i, j):
        near = i - j < window
        query_pos = torch.where(near, _f64(i), _f64(torch.div(i, group_size, rounding_mode="floor")) + shift)
        key_pos = torch.where(near, j, torch.div(j, group_size, rounding_mode="floor"))
        return torch.ones((), dtype=torch.bool), query_pos, key_pos, _log_scale(i, log_scale_base)

    return Rule(f"self-extend-{group_size}-{window}", table)


def rerope(window: int, log_scale_base: float | None = None) -> Rule:
    """ReRoPE: distance min(i − j, w). Near keys at true positions; far keys unrotated (0), query at w.

    bojone's rerope_patch.py always multiplies query i by max(1, ln(i + 1) / ln(training_length)); pass
    ``log_scale_base=L`` for that, None to leave the logits unscaled.
    """
    _positive(window=window)

    def table(i, j):
        near = i - j < window
        query_pos = torch.where(near, i, torch.full_like(i, window))
        key_pos = torch.where(near, j, torch.zeros_like(j))
        return torch.ones((), dtype=torch.bool), query_pos, key_pos, _log_scale(i, log_scale_base)

    return Rule(f"rerope-{window}", table)


def leaky_rerope(window: int, k: float, log_scale_base: float | None = None) -> Rule:
    """Leaky ReRoPE: distance i − j below w, w + (i − j − w)/k beyond.

    As in leaky_rerope_patch.py, far pairs use a linear-scaling rotary (positions / k) with the query moved
    by w(k − 1): query at (i + w(k − 1))/k, key at j/k. Same optional log scale as :func:`rerope`.
    """
    _positive(window=window, k=k)

    def table(i, j):
        near = i - j < window
        query_pos = torch.where(near, _f64(i), (_f64(i) + window * (k - 1)) / k)
        key_pos = torch.where(near, _f64(j), _f64(j) / k)
        return torch.ones((), dtype=torch.bool), query_pos, key_pos, _log_scale(i, log_scale_base)

    return Rule(f"leaky-rerope-{window}-{k:g}", table)


def string(
    shifted_offset: int, small_local_value: int = 128, attention_factor: float = STRING_ATTENTION_FACTOR
) -> Rule:
    """STRING with STRING's own names: ``shifted_offset`` S (``diag_size``) and ``small_local_value`` W.

    i − j < S: true positions. Otherwise the query moves to i − S + W (key stays at j), so the distance is
    i − j − S + W. Every logit is multiplied by ``attention_factor`` squared (cos and sin carry the factor).
    This is STRING's decode semantics; its flash prefill also counts the key at i − j = S in both branches.
    """
    _positive(shifted_offset=shifted_offset, small_local_value=small_local_value)

    def table(i, j):
        near = i - j < shifted_offset
        query_pos = torch.where(near, i, i - shifted_offset + small_local_value)
        return torch.ones((), dtype=torch.bool), query_pos, j, torch.tensor(attention_factor**2)

    return Rule(f"string-{shifted_offset}-{small_local_value}", table)


def dual_chunk(chunk_size: int, local_window: int, pretraining_length: int | None = None) -> Rule:
    """Dual chunk attention (ChunkLlama) with its own names: ``chunk_size`` s and ``local_window`` w.

    Chunks have length c = s − w (``chunk_len``) and start at 0. Every key sits at j mod c. The query sits at
    i mod c for keys of its own chunk, at min(i mod c + c, s) for the previous chunk, and at min(2c − 1, s)
    (= s whenever c > w) for older chunks. ``replace_with_chunkllama(L)`` sets s = 3L/4 (integer division)
    and w = L/8. With ``pretraining_length`` L and N keys in the call, N > L also multiplies every logit by
    (0.05 ln(N/L) + 1)², the factor ChunkLlamaRotaryEmbedding puts on cos and sin.
    """
    _positive(chunk_size=chunk_size, local_window=local_window)
    chunk_len = chunk_size - local_window
    if chunk_len < 1:
        raise ValueError(f"chunk_size ({chunk_size}) must exceed local_window ({local_window})")

    def table(i, j):
        query_chunk, key_chunk = i // chunk_len, j // chunk_len
        offset = i % chunk_len
        query_pos = torch.where(
            query_chunk == key_chunk,
            offset,
            torch.where(
                query_chunk - key_chunk == 1,
                (offset + chunk_len).clamp(max=chunk_size),
                torch.full_like(offset, min(2 * chunk_len - 1, chunk_size)),
            ),
        )
        scale = 1.0
        n_keys = int(j.max()) + 1
        if pretraining_length is not None and n_keys > pretraining_length:
            scale = (0.05 * math.log(n_keys / pretraining_length) + 1.0) ** 2
        return torch.ones((), dtype=torch.bool), query_pos, j % chunk_len, torch.tensor(scale)

    return Rule(f"dual-chunk-{chunk_size}-{local_window}", table)


# ------------------------------------------------------------------------------------------ rotation


def family_rotation(model, attention) -> Callable[..., torch.Tensor]:
    """``rotate(x [B, H, P, D], positions [P], inverse=False) -> x`` with the family's own rotary code.

    Positions may be fractional. The rotary module's attention factor (YaRN, longrope) is divided out, so
    un-rotating and rotating again keeps whatever factor the model already put on q and k.
    """
    modeling = sys.modules[type(attention).__module__]
    rotary = getattr(attention, "rotary_emb", None) or next(
        m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")
    )
    if hasattr(modeling, "rotate_every_two"):
        return _interleaved_rotation(modeling, rotary)
    per_layer_type = isinstance(getattr(rotary, "rope_type", None), dict)  # Gemma-3 style rotary module
    layer_type = getattr(attention, "layer_type", None) if per_layer_type else None
    rope_type = rotary.rope_type[layer_type] if per_layer_type else rotary.rope_type
    if rope_type in STATEFUL_ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} recomputes its frequencies from the positions of each call; the "
            "reference would change the rotary module's state from inside attention"
        )
    scale = getattr(rotary, "attention_scaling", None)
    scale = scale or getattr(rotary, f"{layer_type}_attention_scaling", 1.0)

    def rotate(x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        pos = torch.as_tensor(positions).to(device=x.device, dtype=torch.float32).reshape(1, -1)
        cos, sin = rotary(x, pos) if layer_type is None else rotary(x, pos, layer_type)
        cos, sin = cos / scale, sin / scale
        out, _ = modeling.apply_rotary_pos_emb(x, x, cos, -sin if inverse else sin)
        return out

    return rotate


def _interleaved_rotation(modeling, rotary) -> Callable[..., torch.Tensor]:
    """GPT-J: (sin, cos) from its integer table where positions are integral, else from its own formula."""
    dim = rotary.pos_embd_dim
    table = rotary.embed_positions
    # the frequencies of create_sinusoidal_positions in modeling_gptj.py (base 10000 is hard-coded there)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
    angles = torch.arange(len(table), dtype=torch.int64).float()[:, None] * inv_freq
    if not torch.allclose(torch.cat([angles.sin(), angles.cos()], 1), table.float().cpu(), atol=1e-6):
        raise ValueError("GPT-J's sinusoid table does not follow create_sinusoidal_positions' formula")

    def rotate(x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        pos = torch.as_tensor(positions).to(x.device).reshape(-1)
        integral = bool((pos == pos.round()).all()) and bool((pos >= 0).all()) and int(pos.max()) < len(table)
        if integral:
            sin, cos = rotary(x, position_ids=pos.long().reshape(1, -1))
        else:
            angle = pos.to(torch.float32)[:, None] * inv_freq.to(x.device)
            sin, cos = angle.sin()[None].to(x.dtype), angle.cos()[None].to(x.dtype)
        xt = x.transpose(1, 2)  # GPT-J applies RoPE on [B, P, H, D]
        rot = modeling.apply_rotary_pos_emb(xt[..., :dim], -sin if inverse else sin, cos)
        return torch.cat([rot, xt[..., dim:]], dim=-1).transpose(1, 2)

    return rotate


# ------------------------------------------------------------------------------------------ attention


class PeerReference(RegisteredAttention):
    """Registers a dense attention that applies ``rule`` to every layer without a sliding window.

    Use as a context manager around forwards (and decoding with a full ``DynamicCache``: the rule sees the
    absolute positions K − Q + q, so prefill and decode follow the same semantics). No padding masks: every
    row of a batch is a sequence starting at position 0.
    """

    name = PEER_REFERENCE_NAME

    def __init__(self, model, rule: Rule):
        super().__init__(model)
        self.rule = rule

    def attend(
        self,
        module,
        query,
        key,
        value,
        attention_mask,
        scaling=None,
        dropout=0.0,
        softcap=None,
        sliding_window=None,
        **kwargs,
    ):
        batch, heads, n_q, head_dim = query.shape
        n_k = key.shape[2]
        groups = heads // key.shape[1]
        scaling = module.head_dim**-0.5 if scaling is None else scaling
        i = torch.arange(n_k - n_q, n_k)
        j = torch.arange(n_k)
        window = sliding_window or getattr(module, "sliding_window", None)
        if window is not None:  # the model's own sliding layers keep their behaviour
            logits = query.float() @ key.repeat_interleave(groups, 1).float().transpose(-1, -2) * scaling
            dist = i[:, None] - j[None, :]
            visible = (dist >= 0) & (dist < window)
        else:
            pairs = self.rule(i, j)
            visible = pairs.visible
            rotate = family_rotation(self.model, module)
            q_plain = rotate(query, i, inverse=True)
            k_plain = rotate(key, j, inverse=True).repeat_interleave(groups, 1)
            q_pairs = q_plain[:, :, :, None, :].expand(batch, heads, n_q, n_k, head_dim)
            k_pairs = k_plain[:, :, None, :, :].expand(batch, heads, n_q, n_k, head_dim)
            shape = (batch, heads, n_q * n_k, head_dim)
            q_rot = rotate(q_pairs.reshape(shape), pairs.query_pos.reshape(-1)).float()
            k_rot = rotate(k_pairs.reshape(shape), pairs.key_pos.reshape(-1)).float()
            logits = (q_rot * k_rot).sum(-1).view(batch, heads, n_q, n_k) * scaling
            logits = logits * pairs.logit_scale.to(device=logits.device, dtype=logits.dtype)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~visible.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = probs @ value.repeat_interleave(groups, 1).float()
        return out.transpose(1, 2).contiguous().to(query.dtype), probs


# ------------------------------------------------------------------------------------------ RoPE rescaling

# Keys of the model's own rope parameters that a new rope_parameters dict inherits unless it sets them:
# from_pretrained replaces the whole dict, so without them rope_theta is lost (a crash) and a partial-rotary
# model (Phi-3, GPT-NeoX) silently starts rotating its whole head.
INHERITED_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")


def model_with_rope_parameters(model, rope_parameters: dict[str, Any], **load_kwargs: Any):
    """The same weights as ``model``, loaded by ``from_pretrained`` with new ``rope_parameters``.

    This is the reference for RoPE rescaling (``{"rope_type": "linear", "factor": f}``, ``"dynamic"``,
    ``"yarn"``, ``"llama3"``, ``"longrope"``): the model is saved to a temporary folder and loaded back the
    way a user would load it. ``rope_theta`` and ``partial_rotary_factor`` are kept from the model unless
    given.
    For configs with one rope dict per layer type (Gemma 3) a flat dict applies to every layer type; a dict
    keyed by layer type applies per type. Models without ``rope_parameters`` (GPT-J) raise ValueError.
    """
    own = getattr(model.config, "rope_parameters", None)
    if not own:
        raise ValueError(f"{type(model).__name__} has no rope_parameters to change")
    nested = all(isinstance(value, dict) for value in own.values())
    if nested:
        per_type = rope_parameters if set(rope_parameters) <= set(own) and rope_parameters else None
        new = {
            layer_type: _inherit(params, per_type.get(layer_type, {}) if per_type else rope_parameters)
            for layer_type, params in own.items()
        }
    else:
        new = _inherit(own, rope_parameters)
    load_kwargs.setdefault("dtype", model.dtype)
    load_kwargs.setdefault("attn_implementation", model.config._attn_implementation)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder, rope_parameters=new, **load_kwargs)
    return loaded.to(next(model.parameters()).device).eval()


def _inherit(own: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = {key: own[key] for key in INHERITED_ROPE_KEYS if key in own}
    merged.update(copy.deepcopy(new))
    return merged

"""Independent dense references for the attention engine, written out by hand for tests.

The reference rotates with each model family's *own* RoPE code (its rotary module and its
``apply_rotary_pos_emb``), not with :mod:`oodlens.rope`, and builds the full n×n logit matrix, so it shares
no code path with the engine it checks.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

REFERENCE_NAME = "oodlens_test_reference"


def model_rotation(model, attention):
    """``rotate(x [B,H,P,D], positions [P], inverse) -> x`` using the family's own rotary code."""
    modeling = sys.modules[type(attention).__module__]
    rotary = getattr(attention, "rotary_emb", None) or next(
        m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")
    )
    per_layer_type = isinstance(getattr(rotary, "rope_type", None), dict)  # Gemma-3 style rotary module
    layer_type = getattr(attention, "layer_type", None) if per_layer_type else None

    def rotate(x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        pos = positions.reshape(1, -1).to(x.device)
        if hasattr(modeling, "rotate_every_two"):  # GPT-J: (sin, cos) table, interleaved, partial by slicing
            sin, cos = rotary(x, position_ids=pos)
            sin = -sin if inverse else sin
            dim = rotary.pos_embd_dim
            xt = x.transpose(1, 2)  # GPT-J applies RoPE on [B, P, H, D]
            rot = modeling.apply_rotary_pos_emb(xt[..., :dim], sin, cos)
            return torch.cat([rot, xt[..., dim:]], dim=-1).transpose(1, 2)
        args = (x, pos) if layer_type is None else (x, pos, layer_type)
        cos, sin = rotary(*args)
        scale = getattr(rotary, "attention_scaling", None) or getattr(
            rotary, f"{layer_type}_attention_scaling", 1.0
        )
        cos, sin = cos / scale, sin / scale
        sin = -sin if inverse else sin
        out, _ = modeling.apply_rotary_pos_emb(x, x, cos, sin)
        return out

    return rotate


class RegisteredAttention:
    """Makes ``self.attend`` the model's attention (registered under ``name``, without a mask function) inside
    a ``with`` block, and puts the model's own implementation back on exit."""

    name: str

    def __init__(self, model):
        self.model = model
        self.previous = model.config._attn_implementation

    def __enter__(self):
        AttentionInterface.register(self.name, self.attend)
        AttentionMaskInterface.register(self.name, lambda *a, **k: None)
        self.model.set_attn_implementation(self.name)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)


class DenseReference(RegisteredAttention):
    """Registers a dense attention that implements a policy's semantics by hand.

    Semantics: query i attends key j iff j ≤ i and (i − j < window or j < n_global); local keys use the
    model's rotation; far keys use the key unrotated and the query rotated to ``distance_limit``; with top-k,
    each head adds its k best middle keys seen at ``distance_limit // 2`` (layers ≥ ``top_k_from_layer``).
    """

    name = REFERENCE_NAME

    def __init__(self, model, window=None, n_global=0, distance_limit=None, top_k=0, top_k_from_layer=0):
        super().__init__(model)
        self.window, self.n_global, self.limit = window, n_global, distance_limit
        self.top_k, self.top_k_from_layer = top_k, top_k_from_layer

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
        n_q, n_k = query.shape[2], key.shape[2]
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, 1).float()
        value = value.repeat_interleave(groups, 1).float()
        q = query.float()
        i = torch.arange(n_k - n_q, n_k, device=query.device)[:, None]
        j = torch.arange(n_k, device=query.device)[None, :]
        dist = i - j

        def cap(x):
            return x if softcap is None else torch.tanh(x / softcap) * softcap

        logits = cap(q @ key.transpose(-1, -2) * scaling)
        window = sliding_window or getattr(module, "sliding_window", None)
        if window is not None:  # the model's own sliding layers keep their behaviour
            visible = (dist >= 0) & (dist < window)
            logits = logits.masked_fill(~visible, float("-inf"))
        elif self.window is None:
            logits = logits.masked_fill(dist < 0, float("-inf"))
        else:
            local = (dist >= 0) & (dist < self.window)
            far = (dist >= self.window) & (j < self.n_global)
            rotate = model_rotation(self.model, module)
            q_plain = rotate(query, i[:, 0], inverse=True)
            k_plain = rotate(key.to(query.dtype), torch.arange(n_k), inverse=True).float()
            if self.limit is None:
                far_logits = logits
            else:
                q_far = rotate(q_plain, torch.full((n_q,), self.limit)).float()
                far_logits = cap(q_far @ k_plain.transpose(-1, -2) * scaling)
            logits = torch.where(
                local, logits, torch.where(far, far_logits, torch.full_like(logits, float("-inf")))
            )
            if self.top_k and module.layer_idx >= self.top_k_from_layer:
                q_mid = rotate(q_plain, torch.full((n_q,), self.limit // 2)).float()
                mid_logits = cap(q_mid @ k_plain.transpose(-1, -2) * scaling)
                middle = (dist >= self.window) & (j >= self.n_global)
                mid_logits = mid_logits.masked_fill(~middle, float("-inf"))
                k = min(self.top_k, n_k)
                best, index = mid_logits.topk(k, dim=-1)
                chosen = torch.full_like(mid_logits, float("-inf")).scatter(-1, index, best)
                logits = torch.where(middle, chosen, logits)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = probs @ value
        return out.transpose(1, 2).contiguous().to(query.dtype), probs

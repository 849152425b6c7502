"""Rotate queries and keys by arbitrary position offsets, using the model's own rotary frequencies.

LM-Infinite's distance limit needs keys "un-rotated" to position 0 and queries rotated to position
``distance_limit``. transformers hands the attention function tensors that are already rotated, so we
undo and redo rotations here. The frequencies are read from the model's rotary-embedding module
(``inv_freq``, or ``{layer_type}_inv_freq`` for Gemma-3 style per-layer RoPE), so scaled variants
(linear, NTK, YaRN, llama3, longrope) stay correct. Angles are computed in float32 exactly as
transformers computes them, so un-rotating a key reproduces the model's unrotated key to rounding.

Two pair layouts exist: "half" (``rotate_half``; Llama, Mistral, Qwen, Gemma, Phi3, GPT-NeoX) and
"interleaved" (``rotate_every_two``; GPT-J, CodeGen). Partial rotary (GPT-NeoX, Phi) rotates only the
first ``rotary_dim`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .compiling import fused_on_gpu
from .errors import OodlensError
from .models.anatomy import interleaved_pairs, layer_type, rotary_module


@dataclass
class RotarySpec:
    """How one attention layer applies RoPE.

    Attributes:
        rotary: the model's rotary-embedding module (frequencies are read from it at call time, so dynamic
            scaling that updates ``inv_freq`` in place is followed).
        inv_freq_attr: name of the frequency buffer on ``rotary``.
        interleaved: True for GPT-J style pairs (0,1),(2,3)…; False for (i, i + rotary_dim/2) pairs.
        fixed_inv_freq: frequencies for modules that keep only a sin/cos table (GPT-J).
    """

    rotary: nn.Module | None
    inv_freq_attr: str | None
    interleaved: bool
    fixed_inv_freq: torch.Tensor | None = None

    def inv_freq(self) -> torch.Tensor:
        """Current frequencies, float32, shape ``[rotary_dim / 2]``."""
        if self.fixed_inv_freq is not None:
            return self.fixed_inv_freq
        return getattr(self.rotary, self.inv_freq_attr).float()

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq().numel()

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Same float32 product as transformers' rotary modules, so un-rotation is exact up to rounding.
        angles = positions.to(device).float().unsqueeze(-1) * self.inv_freq().to(device)
        return angles.cos(), angles.sin()

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return fused_on_gpu(_rotate_pairs)(x, cos, sin, self.interleaved)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
        """Rotate ``x`` by ``sign * positions``.

        Args:
            x: ``[..., P, head_dim]`` queries or keys.
            positions: integer positions broadcastable to ``[..., P]`` (commonly ``[P]``).
            sign: +1 rotates forward (as the model does at that position); -1 undoes that rotation.
        Returns:
            Tensor of ``x``'s shape and dtype.
        """
        cos, sin = self._cos_sin(positions, x.device)
        return self._apply(x, cos, sign * sin)

    def move(self, x: torch.Tensor, from_positions: torch.Tensor, to_positions: torch.Tensor) -> torch.Tensor:
        """Re-rotate ``x`` from the positions it was rotated at to new positions, in one pass.

        The angle difference is formed from the two float32 angles by the addition theorem, so the result
        equals undoing the model's rotation exactly and rotating again.
        """
        cos_from, sin_from = self._cos_sin(from_positions, x.device)
        cos_to, sin_to = self._cos_sin(to_positions, x.device)
        cos = cos_to * cos_from + sin_to * sin_from
        sin = sin_to * cos_from - cos_to * sin_from
        return self._apply(x, cos, sin)


def _gptj_style_inv_freq(rotary: nn.Module) -> torch.Tensor:
    dim = rotary.pos_embd_dim
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))


def rotary_spec_for(model: nn.Module, attention: nn.Module) -> RotarySpec:
    """Build the :class:`RotarySpec` for one attention module of ``model``.

    Raises:
        OodlensError: when the model does not use rotary position embeddings.
    """
    rotary = rotary_module(model, attention)
    if rotary is None:
        raise OodlensError(
            f"{type(model).__name__} has no rotary position embedding; the distance limit needs RoPE "
            "(use a RoPE model such as Llama, Mistral, Qwen, Gemma, Phi3, GPT-NeoX or GPT-J)"
        )
    interleaved = interleaved_pairs(attention)
    kind = layer_type(attention)
    for attr in (f"{kind}_inv_freq", "inv_freq"):
        if isinstance(getattr(rotary, attr, None), torch.Tensor):
            return RotarySpec(rotary, attr, interleaved)
    if hasattr(rotary, "embed_positions") and hasattr(rotary, "pos_embd_dim"):
        return RotarySpec(rotary, None, interleaved, fixed_inv_freq=_gptj_style_inv_freq(rotary))
    raise OodlensError(
        f"cannot read rotary frequencies from {type(rotary).__name__}; "
        "please open an issue with the model name so we can support it"
    )


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x``'s rotary pairs turned by the angles of ``cos``/``sin`` (in float32; the rest of ``x`` kept)."""
    dim = 2 * cos.shape[-1]
    rot = x[..., :dim].float()
    if interleaved:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    else:
        first, second = rot[..., : dim // 2], rot[..., dim // 2 :]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    if dim == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat((rotated.to(x.dtype), x[..., dim:]), dim=-1)

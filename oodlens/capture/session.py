"""Running a capture: :class:`CaptureSession` routes a model through a policy with both observers attached;
:func:`capture` (a context manager around forwards you run yourself) and :func:`diagnose` (one call) use it.
Both restore the model's attention implementation and remove their hooks on exit, also on error, and leave
the model's outputs unchanged."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import OodlensError
from ..models import ModelParts, train_length_of
from ..models.anatomy import check_positions
from ..policies import Policy, PolicyHandle, apply_policy, vanilla
from ..storage import json_ready, runtime_versions
from .config import CaptureConfig, CaptureGeometry, resolve_geometry
from .diagnosis import TABLE_KINDS, Diagnosis
from .hidden import HiddenStateObserver, resolve_hidden_layers
from .logits import LogitObserver
from .position_probe import position_probe


def _sequence_shape(args: tuple, kwargs: dict) -> tuple[int, int]:
    """``(batch, length)`` of a decoder layer's input hidden states ``[B, T, d]``."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise OodlensError("capture could not read the hidden states entering the first decoder layer")
    return hidden.shape[0], hidden.shape[1]


class CaptureSession:
    """Routes a model through a policy with both observers attached; see :func:`capture`.

    Every forward between :meth:`open` and :meth:`close` is captured. Windows must all have the length of
    the first forward (the bins are fixed by it), and only prefill forwards are supported (no decoding
    steps against a cache). Left-padded rows are measured at their real positions.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Policy | None = None,
        config: CaptureConfig | None = None,
        train_length: int | None = None,
        name: str | None = None,
        progress: bool = False,
    ):
        self.model = model
        self.progress = progress
        self.policy = policy or vanilla()
        self.config = config or CaptureConfig()
        self.train_length = train_length_of(model, train_length)
        self.name = name or getattr(model.config, "name_or_path", None) or model.config.model_type
        self.parts = ModelParts.of(model)
        n_layers = len(self.parts.attention)
        self.attention_layers = self._attention_layers(n_layers)
        self.logits = LogitObserver(self.config)
        self.hidden = HiddenStateObserver(
            self.parts.decoder_layers, resolve_hidden_layers(self.config.hidden_layers, n_layers), self.config
        )
        self.geometry: CaptureGeometry | None = None
        self.n_windows = 0
        self._handle: PolicyHandle | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._bar: tqdm | None = None

    def _attention_layers(self, n_layers: int) -> list[int]:
        layers = list(range(n_layers)) if self.config.layers is None else sorted(set(self.config.layers))
        if any(not 0 <= layer < n_layers for layer in layers):
            raise OodlensError(f"layers {self.config.layers} must lie in 0..{n_layers - 1}")
        return layers

    def open(self) -> None:
        """Apply the policy with the observer on the chosen layers and attach the hooks."""
        self._handle = apply_policy(
            self.model, self.policy, train_length=self.train_length, block_size=self.config.block_size
        )
        self._handle.observe(self.logits, self.attention_layers)
        first_layer = self.parts.decoder_layers[0]
        self._hooks = [
            self.model.register_forward_pre_hook(self._check_positions, with_kwargs=True),
            first_layer.register_forward_pre_hook(self._begin_forward, with_kwargs=True),
        ]
        if self.progress:  # a long forward takes minutes on a CPU: one step per decoder layer
            self._bar = tqdm(total=len(self.parts.decoder_layers), unit="layer", leave=False)
            self._hooks += [
                layer.register_forward_hook(self._layer_done) for layer in self.parts.decoder_layers
            ]
        self.hidden.attach()

    def close(self) -> None:
        """Remove the hooks and restore the attention implementation (idempotent; safe if open failed)."""
        try:
            self.hidden.detach()
            while self._hooks:
                self._hooks.pop().remove()
            if self._bar is not None:
                self._bar.close()
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None

    def _layer_done(self, module: nn.Module, args: Any, output: Any) -> None:
        self._bar.update()

    def _check_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Refuse, before the embedding fails, a forward longer than a learned position table holds."""
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor):
            check_positions(self.model, ids.shape[-1])

    def fix_length(self, length: int) -> None:
        """Fix the bins for windows of up to ``length`` tokens (else the first forward's length fixes
        them)."""
        self.geometry = resolve_geometry(self.config, length, self.train_length)
        self.logits.begin(self.geometry)
        self.hidden.begin(self.geometry)

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Fix the geometry at the first forward; count windows; refuse a longer window than the bins
        cover."""
        batch, length = _sequence_shape(args, kwargs)
        if self.geometry is None:
            self.fix_length(length)
        elif length > self.geometry.length:
            raise OodlensError(
                f"capture's bins cover windows of up to {self.geometry.length} tokens, "
                f"then came a forward of {length}: capture each length separately "
                "(decoding steps against a cache are not captured)"
            )
        self.hidden.begin_forward(self.n_windows)
        self.n_windows += batch
        if self.progress:
            self._bar.reset(total=len(self.parts.decoder_layers))
            self._bar.set_description(f"capture {self.policy.name}, window {self.n_windows}")

    def run(self, input_ids: torch.Tensor) -> None:
        """One captured forward of ``input_ids [B, T]`` (only the last position gets vocabulary logits)."""
        with torch.no_grad():
            self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    def result(self) -> Diagnosis:
        """The :class:`Diagnosis` of everything captured so far."""
        if self.geometry is None:
            raise OodlensError("nothing was captured: run at least one forward inside the capture")
        tables = {**self.logits.tables(), **self.hidden.tables()}
        samples = self.hidden.samples()
        tables["position_probe"] = position_probe(samples, self.config.n_global, self.config.seed)
        return Diagnosis(self._meta(), {kind: tables[kind] for kind in TABLE_KINDS}, samples)

    def _meta(self) -> dict[str, Any]:
        parameter = next(self.model.parameters())
        policy = self._handle.policy if self._handle is not None else self.policy.resolve(self.train_length)
        g = self.geometry
        return {
            "model": self.name,
            "train_length": self.train_length,
            "length": g.length,
            "n_windows": self.n_windows,
            "policy": json_ready(asdict(policy)),  # as saved and loaded: lists, not tuples
            "dtype": str(parameter.dtype).removeprefix("torch."),
            "device": str(parameter.device),
            "attention_layers": self.attention_layers,
            "hidden_layers": self.hidden.layer_indices,
            "query_stride": g.query_stride,
            "n_sampled_queries": len(g.sampled_positions),
            "config": {
                key: (list(value) if isinstance(value, Sequence) else value)
                for key, value in asdict(self.config).items()
            },
            "versions": runtime_versions(),
            "non_finite": [*self.logits.non_finite.values(), *self.hidden.non_finite.values()],
        }


@contextmanager
def capture(
    model: nn.Module,
    policy: Policy | None = None,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
    progress: bool = False,
) -> Iterator[CaptureSession]:
    """Capture every forward run inside the block; ``session.result()`` gives the :class:`Diagnosis`.

    The model's attention implementation and hooks are restored on exit, also when the block raises.

    Example::

        with capture(model, lm_infinite()) as session:
            model(ids, logits_to_keep=1)
        diagnosis = session.result()
    """
    session = CaptureSession(model, policy, config, train_length, name, progress)
    try:
        session.open()
        yield session
    finally:
        session.close()


def diagnose(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Mapping[str, Any],
    policy: Policy | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
    progress: bool = True,
) -> Diagnosis:
    """Capture the three OOD factors of ``model`` on each row of ``input_ids``, one forward a row.

    Args:
        input_ids: ``[n_windows, length]`` (or ``[length]``) token ids, or what a tokenizer returns (a
            ``BatchEncoding`` or dict with ``input_ids`` and ``attention_mask``).
        policy: attention policy to diagnose (``None``: vanilla); the same call with ``lm_infinite()`` shows
            the fix.
        attention_mask: ``[n_windows, length]``, 0 at padding; padding is left out, so a padded row counts
            only its real tokens (at positions from 0). Rows may then differ in length.
        config: what to capture (:class:`CaptureConfig` defaults otherwise).
        train_length: the pretraining length (default: read from the model's config).
        name: model name for ``meta`` (default: the config's ``name_or_path``).
        progress: a progress bar over the decoder layers of each forward.
    """
    rows = real_rows(input_ids, attention_mask)
    device = next(model.parameters()).device
    with capture(model, policy, config, train_length, name, progress) as session:
        session.fix_length(max(len(row) for row in rows))
        for row in rows:
            session.run(row.unsqueeze(0).to(device))
    return session.result()


def real_rows(
    input_ids: torch.Tensor | Sequence[Sequence[int]] | Mapping[str, Any], attention_mask: torch.Tensor | None
) -> list[torch.Tensor]:
    """The rows of ``input_ids`` without their padding (1-D LongTensors of at least 2 tokens each)."""
    if isinstance(input_ids, Mapping):  # a BatchEncoding or a dict from a tokenizer
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype.is_floating_point:
        raise OodlensError(
            f"input_ids must be token ids [n_windows, length], got {tuple(ids.shape)} {ids.dtype}"
        )
    if attention_mask is None:
        rows = list(ids)
    else:
        mask = torch.as_tensor(attention_mask).reshape(ids.shape).bool()
        rows = []
        for row, keep in zip(ids, mask, strict=True):
            real = keep.nonzero().squeeze(-1)
            if real.numel() and real[-1] - real[0] + 1 != real.numel():
                raise OodlensError("attention_mask has padding between real tokens: pad on the left or right")
            rows.append(row[keep])
    if not rows or min(len(row) for row in rows) < 2:
        raise OodlensError("diagnose needs at least one row of at least 2 real tokens")
    return rows

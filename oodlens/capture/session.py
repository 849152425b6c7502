"""Running a capture: :class:`CaptureSession` routes a model through a policy with both observers attached;
:func:`capture` (a context manager around forwards you run yourself) and :func:`diagnose` (one call) use it.
Both restore the model's attention implementation and remove their hooks on exit, also on error, and leave
the model's outputs unchanged."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..errors import OodlensError
from ..models import ModelParts, train_length_of
from ..policies import Policy, PolicyHandle, apply_policy, vanilla
from ..storage import runtime_versions
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
    ):
        self.model = model
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
        self._length_hook: torch.utils.hooks.RemovableHandle | None = None

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
        self._length_hook = first_layer.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self.hidden.attach()

    def close(self) -> None:
        """Remove the hooks and restore the attention implementation (idempotent; safe if open failed)."""
        try:
            self.hidden.detach()
            if self._length_hook is not None:
                self._length_hook.remove()
                self._length_hook = None
        finally:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Fix the geometry at the first forward; count windows; refuse a different length."""
        batch, length = _sequence_shape(args, kwargs)
        if self.geometry is None:
            self.geometry = resolve_geometry(self.config, length, self.train_length)
            self.logits.begin(self.geometry)
            self.hidden.begin(self.geometry)
        elif length != self.geometry.length:
            raise OodlensError(
                f"capture saw windows of {self.geometry.length} tokens, then a forward of {length}: capture "
                "each length separately (decoding steps against a cache are not captured)"
            )
        self.hidden.begin_forward(self.n_windows)
        self.n_windows += batch

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
            "policy": asdict(policy),
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
        }


@contextmanager
def capture(
    model: nn.Module,
    policy: Policy | None = None,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
) -> Iterator[CaptureSession]:
    """Capture every forward run inside the block; ``session.result()`` gives the :class:`Diagnosis`.

    The model's attention implementation and hooks are restored on exit, also when the block raises.

    Example::

        with capture(model, lm_infinite()) as session:
            model(ids, logits_to_keep=1)
        diagnosis = session.result()
    """
    session = CaptureSession(model, policy, config, train_length, name)
    try:
        session.open()
        yield session
    finally:
        session.close()


def diagnose(
    model: nn.Module,
    input_ids: torch.Tensor,
    policy: Policy | None = None,
    *,
    config: CaptureConfig | None = None,
    train_length: int | None = None,
    name: str | None = None,
) -> Diagnosis:
    """Capture the three OOD factors of ``model`` on ``input_ids [n_windows, length]``, one forward a window.

    Args:
        policy: attention policy to diagnose (``None``: vanilla); the same call with ``lm_infinite()`` shows
            the fix.
        config: what to capture (:class:`CaptureConfig` defaults otherwise).
        train_length: the pretraining length (default: read from the model's config).
        name: model name for ``meta`` (default: the config's ``name_or_path``).
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    device = next(model.parameters()).device
    with capture(model, policy, config, train_length, name) as session:
        for window in ids:
            session.run(window.unsqueeze(0).to(device))
    return session.result()

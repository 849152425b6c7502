"""The static bounded cache (oodlens.cache.StaticBoundedCache): decoding through its slots equals the
independent dense reference on every tiny RoPE family, it keeps a fixed number of slots, and a decoding step
reads nothing back from the device (what capturing it as a CUDA graph needs)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oodlens
from oodlens.attention import binding_of
from oodlens.evaluate.scoring import cache_kwargs
from oodlens.evaluate.speed import _captured
from oodlens.policies import apply_policy, lambda_mask, lm_infinite, self_extend, streaming_llm, vanilla
from oodlens.tiny import tiny_model

from .reference import DenseReference
from .test_attention import DEVICE, ROPE_FAMILIES, TOL, _ids

TRAIN = 64
LENGTH = 96  # past the training length, so the ring wraps and the starting tokens become far keys
CASES = {
    "lm-infinite": (
        lm_infinite(n_global=3, n_local=20, distance_limit=16),
        dict(window=20, n_global=3, distance_limit=16),
    ),
    "lambda": (lambda_mask(n_global=3, n_local=20), dict(window=20, n_global=3)),
    "streaming-llm": (streaming_llm(n_sink=4, window=17), None),  # its reference: its own forward
}
KEPT = {"lm-infinite": (3, 20), "lambda": (3, 20), "streaming-llm": (4, 17)}  # starting tokens, window


@pytest.fixture(scope="module", params=ROPE_FAMILIES)
def family_model(request):
    overrides = {"max_position_embeddings": 256} if request.param == "gptj" else {}
    model = tiny_model(request.param, **overrides).model.to(DEVICE)
    try:
        apply_policy(model, vanilla(), train_length=TRAIN).remove()
    except oodlens.OodlensError as error:
        pytest.skip(f"{request.param}: {error}")
    return model


def _decode(model, handle, ids, prefill: list[int], position_ids: bool) -> torch.Tensor:
    """Logits of every position: the prompt in the pieces ``prefill`` (several tokens per call), then one
    token per call through a static bounded cache."""
    cache = handle.new_cache(static=True)
    pieces, start = [], 0
    for size in prefill:
        piece = model(ids[:, start : start + size], use_cache=True, **cache_kwargs(model, cache))
        pieces.append(piece.logits)
        start += size
    for position in range(start, ids.shape[1]):
        extra = {"position_ids": torch.tensor([[position]], device=DEVICE)} if position_ids else {}
        step = model(ids[:, position : position + 1], use_cache=True, **extra, **cache_kwargs(model, cache))
        pieces.append(step.logits)
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("prefill", [[5, 2], [40]], ids=["short prefills", "a prefill past the ring"])
@pytest.mark.parametrize("case", list(CASES))
def test_static_decoding_equals_the_reference(family_model, case, prefill):
    policy, dense = CASES[case]
    ids = _ids(family_model, length=LENGTH)
    with torch.no_grad():
        if dense is not None:
            with DenseReference(family_model, **dense):
                reference = family_model(ids).logits
        with apply_policy(family_model, policy, train_length=TRAIN) as handle:
            if dense is None:
                reference = family_model(ids).logits
            logits, cache = _decode(family_model, handle, ids, prefill=prefill, position_ids=True)
    assert (logits - reference).abs().max().item() < TOL
    n_global, window = KEPT[case]
    own_window = getattr(family_model.config, "sliding_window", None)
    for stored, layer in zip(cache.stored_tokens(), cache.layers, strict=True):
        # slots allocated once: scratch and starting tokens, and a ring of the window; the model's own
        # sliding-window layers keep a ring of their window
        expected = own_window if layer.n_global == 0 else 2 * n_global + window
        assert stored == expected


def test_position_ids_may_be_left_to_transformers():
    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids(model, length=LENGTH)
    with torch.no_grad(), apply_policy(model, CASES["lm-infinite"][0], train_length=TRAIN) as handle:
        reference = model(ids).logits
        logits, _ = _decode(model, handle, ids, prefill=[1], position_ids=False)
    assert (logits - reference).abs().max().item() < TOL


class _HostReads(TorchDispatchMode):
    """Counts the operators that make the host wait for the device: a value read back, or a result whose
    shape depends on values. On a CPU it cannot see copies to the host (``.cpu()`` is then no copy) — the
    CUDA replay test below is the full check."""

    WAITING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.WAITING:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("case", ["lm-infinite", "streaming-llm"])
def test_a_static_step_never_waits_for_the_device(family, case):
    model = tiny_model(family).model.to(DEVICE)
    ids = _ids(model, length=LENGTH)
    with torch.no_grad(), apply_policy(model, CASES[case][0], train_length=TRAIN) as handle:
        for static, expect_reads in ((True, False), (False, True)):  # the dynamic cache does read back
            cache = handle.new_cache(static=static)
            model(ids[:, :-1], use_cache=True, **cache_kwargs(model, cache))
            reads = _HostReads()
            with reads:
                model(
                    ids[:, -1:],
                    position_ids=torch.tensor([[LENGTH - 1]], device=DEVICE),
                    use_cache=True,
                    **cache_kwargs(model, cache),
                )
            assert bool(reads.seen) == expect_reads, dict(reads.seen)


def test_static_cache_refusals_name_the_fix():
    model = tiny_model("llama").model.to(DEVICE)
    ids = _ids(model, length=30)
    with torch.no_grad(), apply_policy(model, CASES["lm-infinite"][0], train_length=TRAIN) as handle:
        padded = torch.ones(1, 30, dtype=torch.long, device=DEVICE)
        handle.new_cache(attention_mask=padded, static=True)  # a mask without padding is welcome
        padded[0, 0] = 0
        with pytest.raises(oodlens.OodlensError, match="pass static=False"):
            handle.new_cache(attention_mask=padded, static=True)
        cache = handle.new_cache(static=True)
        model(ids[:, :-1], use_cache=True, **cache_kwargs(model, cache))
        for module in handle.parts.attention:  # as a capture would bind them
            binding_of(module).observer = object()
        with pytest.raises(oodlens.OodlensError, match="without observers"):
            model(ids[:, -1:], use_cache=True, **cache_kwargs(model, cache))
    with apply_policy(model, self_extend(group_size=2, window=8), train_length=TRAIN) as handle:
        with pytest.raises(oodlens.OodlensError, match="whole history"):
            handle.new_cache(static=True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (OODLENS_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("case", ["lm-infinite", "streaming-llm"])
def test_a_captured_step_replays_as_the_forward(case):
    """Eager steps, the capture, then replays, exactly as decode_speed's static mode runs them on a GPU: every
    replayed step's logits equal the full forward's at that position."""
    model = tiny_model("qwen2").model.to(DEVICE)
    ids = _ids(model, length=LENGTH)
    start = 40
    with torch.no_grad(), apply_policy(model, CASES[case][0], train_length=TRAIN) as handle:
        reference = model(ids).logits
        cache = handle.new_cache(static=True)
        model(ids[:, :start], use_cache=True, **cache_kwargs(model, cache))
        token, position = ids[:, start : start + 1].clone(), torch.tensor([[start]], device=DEVICE)
        steps = []

        def step() -> torch.Tensor:
            out = model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(model, cache))
            return out.logits

        def advance(logits: torch.Tensor) -> None:
            steps.append(logits.clone())
            position.add_(1)
            token.copy_(ids.gather(1, position.clamp(max=LENGTH - 1)))

        replay = _captured(step, advance, DEVICE)
        while len(steps) < LENGTH - start:
            advance(replay())
    assert (torch.cat(steps, dim=1) - reference[:, start:]).abs().max().item() < 1e-4

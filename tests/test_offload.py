"""A model larger than one device: loaded with a ``device_map`` that offloads layers (accelerate's hooks move
their weights in for each forward), every policy and the capture give what the model in memory gives.
OODLENS_TEST_DEVICE=cuda puts the first layer on the GPU and offloads the rest to the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from oodlens.capture import diagnose
from oodlens.models import load_model
from oodlens.policies import apply_policy, lm_infinite, self_extend, streaming_llm, vanilla
from oodlens.tiny import tiny_model

TRAIN, TOL = 64, 1e-5
POLICIES = {
    "vanilla": vanilla(),
    "lm-infinite": lm_infinite(n_global=3, n_local=20, distance_limit=16),
    "streaming-llm": streaming_llm(n_sink=4, window=17),
    "self-extend": self_extend(group_size=4, window=16),
}
DEVICE = torch.device(os.environ.get("OODLENS_TEST_DEVICE", "cpu"))
# the first layer on the device, the second and the output head offloaded (to disk from a CPU, to the CPU
# from a GPU): their weights are moved in for every forward
MAIN, OFFLOADED = (0, "cpu") if DEVICE.type == "cuda" else ("cpu", "disk")
DEVICE_MAP = {
    "model.embed_tokens": MAIN,
    "model.rotary_emb": MAIN,
    "model.layers.0": MAIN,
    "model.layers.1": OFFLOADED,
    "model.norm": MAIN,
    "lm_head": OFFLOADED,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    in_memory = tiny_model("llama")
    in_memory.model.save_pretrained(folder)
    in_memory.tokenizer.save_pretrained(folder)
    offloaded = load_model(
        str(folder),
        dtype="float32",
        train_length=TRAIN,
        device_map=DEVICE_MAP,
        offload_folder=str(tmp_path_factory.mktemp("offload")),
    )
    return in_memory.model.to(DEVICE), offloaded.model


def _ids(length: int = 96) -> torch.Tensor:
    return torch.randint(3, 290, (1, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def test_the_layers_really_are_offloaded(models):
    _, offloaded = models
    second = offloaded.model.layers[1]
    assert hasattr(second, "_hf_hook") and second.self_attn.q_proj.weight.device.type == "meta"


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_equals_the_model_in_memory(models, name):
    in_memory, offloaded = models
    ids = _ids()
    with torch.no_grad():
        with apply_policy(in_memory, POLICIES[name], train_length=TRAIN):
            expected = in_memory(ids).logits
        with apply_policy(offloaded, POLICIES[name], train_length=TRAIN):
            got = offloaded(ids).logits
        plain = offloaded(ids).logits
    assert (got - expected).abs().max().item() < TOL
    if name != "vanilla":
        assert (got - plain).abs().max().item() > 1e-3  # the policy was applied to the offloaded layers too


def test_the_capture_equals_the_model_in_memory(models):
    in_memory, offloaded = models
    ids = _ids()
    policy = POLICIES["lm-infinite"]
    expected = diagnose(in_memory, ids, policy, train_length=TRAIN, progress=False)
    got = diagnose(offloaded, ids, policy, train_length=TRAIN, progress=False)
    for kind in ("entropy_by_position", "max_logit_by_position"):
        a, b = getattr(expected, kind)(), getattr(got, kind)()
        numeric = a.select_dtypes("number").columns
        assert len(a) == len(b) > 0
        assert (a[numeric] - b[numeric]).abs().max().max() < TOL

"""The compiled CPU entropy kernel against a dense float64 reference, and the engine's use of it."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from oodlens.attention import cpu_kernel as kernel
from oodlens.attention import kernels
from oodlens.capture import CaptureConfig, diagnose
from oodlens.policies import lm_infinite
from oodlens.tiny import tiny_model

BUILDS_HERE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    and shutil.which("c++") is not None
)
needs_kernel = pytest.mark.skipif(
    not BUILDS_HERE, reason="the kernel needs x86-64 with AVX2 and a C++ compiler"
)


def dense_reference(q, k, v, mask, scale):
    """Output, log-sum-exp and E_p[logit] from the full float64 score matrix."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    logits = (q.double() @ k.transpose(-1, -2)) * scale
    if isinstance(mask, str):
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    mean = (probs * logits.nan_to_num(neginf=0.0)).sum(-1)
    return probs @ v, lse, mean


@needs_kernel
def test_kernel_builds_where_it_should() -> None:
    assert kernel.compiled() is not None


CASES = {
    # name: (batch, query heads, key heads, queries, keys, head dim, mask)
    "causal GQA, partial blocks": (1, 9, 3, 300, 300, 64, "causal"),
    "no mask, two rows of batch": (2, 4, 2, 70, 530, 16, None),
    "boolean mask": (1, 6, 3, 130, 257, 64, "bool"),
    "odd head dim, tiny": (1, 2, 1, 5, 9, 12, "bool"),
}


@needs_kernel
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_dense_reference(case: str) -> None:
    batch, heads, kv_heads, rows, keys, dim, mask = CASES[case]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, rows, dim, generator=gen) * 2
    k = torch.randn(batch, kv_heads, keys, dim, generator=gen) * 2
    v = torch.randn(batch, kv_heads, keys, dim, generator=gen)
    if mask == "bool":
        mask = torch.rand(rows, keys, generator=gen) > 0.4
        mask[0] = False  # a query that sees nothing: lse -inf, output and mean 0
        mask[1:, 0] = True
    out, lse, mean = kernel.entropy_attention(q, k, v, mask, 0.3)
    ref_out, ref_lse, ref_mean = dense_reference(q, k, v, mask, 0.3)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    entropy = lse.double() - mean.double()
    seen = ref_lse.isfinite()
    assert (entropy[seen] >= -1e-5).all()


@needs_kernel
def test_kernel_reads_sliced_keys_and_agrees_across_thread_counts() -> None:
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 200, 64, generator=gen)
    k_all, v_all = torch.randn(2, 1, 2, 900, 64, generator=gen)
    k, v = k_all[:, :, 100:700], v_all[:, :, 100:700]  # views along the sequence, as the engine passes them
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.entropy_attention(q, k, v, None, 0.125)
        torch.set_num_threads(2)
        two = kernel.entropy_attention(q, k, v, None, 0.125)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[1].double(), dense_reference(q, k, v, None, 0.125)[1])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 70])
def test_kernel_reads_transposed_projections_in_place(rows: int) -> None:
    """Queries and keys as transformers makes them ([B, T, H, D] viewed as [B, H, T, D]), one row included."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, rows, 6, 32, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, rows, 2, 32, generator=gen).transpose(1, 2) for _ in range(2))
    assert q.stride(-2) == 6 * 32
    out, lse, mean = kernel.entropy_attention(q, k, v, "causal", 0.2)
    ref_out, ref_lse, ref_mean = dense_reference(q, k, v, "causal", 0.2)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_capture_with_and_without_the_kernel_agree(monkeypatch) -> None:
    llama = tiny_model("llama")
    # 129 tokens in blocks of 64: the last block holds one query
    ids = torch.randint(0, 200, (1, 129), generator=torch.Generator().manual_seed(3))
    config = CaptureConfig(hidden_layers=[], query_stride=7, block_size=64)
    calls = []
    run_kernel = kernel.entropy_attention
    monkeypatch.setattr(kernel, "entropy_attention", lambda *args: calls.append(1) or run_kernel(*args))
    with_kernel = diagnose(llama.model, ids, lm_infinite(), config=config, train_length=48)
    assert calls  # the capture really went through the kernel
    monkeypatch.setattr(kernel, "compiled", lambda: None)
    portable = diagnose(llama.model, ids, lm_infinite(), config=config, train_length=48)
    for kind in ("entropy_by_position", "max_logit_by_position"):
        a, b = with_kernel.to_dataframe(kind), portable.to_dataframe(kind)
        for column in a.columns:
            torch.testing.assert_close(
                torch.tensor(a[column].to_numpy(dtype=float)),
                torch.tensor(b[column].to_numpy(dtype=float)),
                rtol=1e-5,
                atol=1e-5,
                equal_nan=True,
            )


def test_build_failure_warns_once_and_falls_back(monkeypatch) -> None:
    from torch.utils import cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    kernel.compiled.cache_clear()
    try:
        with pytest.warns(UserWarning, match="cannot build the CPU entropy kernel.*command not found"):
            assert kernel.compiled() is None
        assert kernel.compiled() is None  # remembered: no second warning, no second build
    finally:
        kernel.compiled.cache_clear()
    seg = kernels.Segment(slice(0, 8), *torch.randn(3, 1, 2, 8, 16), "causal")
    monkeypatch.setattr(kernel, "compiled", lambda: None)
    fused = kernels.run_segment(seg, 0.25, None, True)  # the portable path still gives the mean logit
    _, lse, mean = dense_reference(seg.queries, seg.keys, seg.values, "causal", 0.25)
    torch.testing.assert_close(fused.mean_logit.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.lse.double(), lse, rtol=1e-5, atol=1e-5)

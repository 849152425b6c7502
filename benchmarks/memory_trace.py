"""Where a forward's memory peak sits: resident set after every decoder layer's attention and MLP.

Forward hooks on each layer's ``self_attn`` and ``mlp`` record the process's resident set and its peak
(Linux ``/proc/self/status``; the peak is reset once the model is loaded). Run it under
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1048576`` to have glibc
return every freed block of 1 MiB or more at once, so the resident set is the memory in use (docs/results.md
compares vanilla and LM-Infinite at 32k this way).

    python benchmarks/memory_trace.py --method lm-infinite --length 32768
    python benchmarks/memory_trace.py --model tiny:llama --length 256     # seconds
"""

from __future__ import annotations

import argparse

import torch

from oodlens.data import corpus_tokens, load_corpus
from oodlens.evaluate import cycle_tokens
from oodlens.memory import reset_peak_memory, resident_gib
from oodlens.models import attention_modules, load_model
from oodlens.policies import POLICIES, native_or_policy


def _recorder(rows: list, point: str):
    def record(*_) -> None:
        rows.append((point, *resident_gib()))

    return record


def trace(model_name: str, method: str, length: int) -> list[tuple[str, float, float]]:
    """``(point, resident GiB, peak GiB)`` after each layer's attention and MLP of one forward."""
    loaded = load_model(model_name)
    ids = torch.cat(list(cycle_tokens(corpus_tokens(load_corpus(), loaded.tokenizer), length)))
    rows: list[tuple[str, float, float]] = []
    handles = []
    for index, attention in enumerate(attention_modules(loaded.model)):
        handles.append(attention.register_forward_hook(_recorder(rows, f"layer {index} attention")))
    mlps = [module for name, module in loaded.model.named_modules() if name.endswith(".mlp")]
    for index, mlp in enumerate(mlps):
        handles.append(mlp.register_forward_hook(_recorder(rows, f"layer {index} mlp")))
    try:
        with torch.no_grad(), native_or_policy(loaded.model, method, loaded.info.train_length):
            reset_peak_memory()
            rows.append(("start", *resident_gib()))
            loaded.model(ids[None], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="lm-infinite", choices=sorted(POLICIES))
    parser.add_argument("--length", type=int, default=32768)
    args = parser.parse_args()
    rows = trace(args.model, args.method, args.length)
    for point, current, peak in rows:
        print(f"{point:22s} resident {current:.4f} GiB  peak {peak:.4f} GiB")
    print(f"peak of the forward: {max(peak for _, _, peak in rows):.4f} GiB")


if __name__ == "__main__":
    main()

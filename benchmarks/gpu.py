"""LM-Infinite against vanilla SDPA on a GPU, on random-weight models of real shapes (no hub access needed).

Cases, each timed after a warm-up on the same shapes (CUDA synchronised, peak memory from the allocator):

0. ``kernels``: the fused CUDA kernels' self-check against the float32 reference, per dtype; ``policies``:
   every policy by name on tiny models of four families (GQA, partial rotary, soft-capping) on CUDA, float32
   against the CPU engine (which the test suite holds against dense references) and bfloat16 against float32.
1. ``attention``: the attention call alone, as the FlexAttention and official-kernel anchors of
   ../shared/FACTS.md §4 are timed: Llama-2-7B's shape (32 heads × 128) and Llama-3-8B's (32 / 8 GQA), bf16,
   LM-Infinite with ``n_global=10`` and window 4096, 8k–128k: flash SDPA (full causal) against the engine's
   fused path and its segment path, side by side.
   ``one-layer``: one attention layer of Llama-2-7B's shape (a minimal MLP, projections included) with
   ``n_global=10``, window and distance limit 4096, 8k–128k. ``one-layer-gqa``: Llama-3-8B's.
2. ``smollm2``: SmolLM2-135M's shape (30 layers, 9 query / 3 key-value heads, bf16), window 8192, one
   prefill forward from 8k to 128k tokens.
3. ``llama-2-7b``: Llama-2-7B's shape (bf16), window 4096, prefill at 8k–32k.
   ``band-tuning``: the band kernel alone at 64k under a few FlexAttention kernel settings, and with a block
   mask written from indices instead of looked-up positions, beside flash: how close the kernel can get.
4. ``capture``: the cost of capturing the three factors (observed forward) on the SmolLM2 shape at 32k.
5. ``decode``: time per generated token and cache size after 8k–128k tokens of context on the SmolLM2 shape
   (:func:`oodlens.evaluate.decode_speed`: vanilla, LM-Infinite and StreamingLLM), eager (dynamic and bounded
   caches) beside static (preallocated caches, each step one replayed CUDA graph); ``decode-7b``: the same on
   Llama-2-7B's shape (window 4096), where the keys, not the launches, dominate a long context's step.

    python benchmarks/gpu.py --out results/                   # writes gpu.json and prints tables
    python benchmarks/gpu.py --cases one-layer --lengths 8192,65536
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import oodlens
from oodlens.attention import binding_of, flex, fused_attention
from oodlens.attention.blockwise import RowGroup, attend_group
from oodlens.evaluate import decode_speed
from oodlens.policies import POLICIES, apply_policy, lm_infinite, native_or_policy, policy_by_name, vanilla
from oodlens.tiny import tiny_model

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
)
LLAMA2_7B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
ONE_LAYER_SHAPE = LLAMA2_7B_SHAPE | dict(num_hidden_layers=1, intermediate_size=128, vocab_size=256)
LLAMA3_8B_SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
ONE_LAYER_GQA_SHAPE = LLAMA3_8B_SHAPE | dict(num_hidden_layers=1, intermediate_size=128, vocab_size=256)
POLICY_FAMILIES = ("llama", "qwen2", "phi3", "gemma2")


def random_model(shape: dict, dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised Llama of ``shape`` on the GPU, SDPA attention, eval mode."""
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**shape), dtype=dtype, attn_implementation="sdpa"
        )
    return model.eval()


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak GiB allocated during ``run()`` (beyond what was allocated before)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**30


AGREEMENT = 0.02  # bf16 outputs of the two paths, max difference over the outputs' scale
ENGINE_PATHS = {"lm-infinite": "auto", "lm-infinite-segments": "never"}  # fused (FlexAttention) / segments


def prefill(model, length: int, method: str, train_length: int) -> dict:
    """One forward of ``length`` random tokens, ``vanilla`` as loaded (flash SDPA on the GPU) or LM-Infinite
    through the engine's fused path or its segment path; returns time and extra peak memory."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    policy = method.removesuffix("-segments")
    with torch.no_grad(), native_or_policy(model, policy, train_length), fused_attention(
        ENGINE_PATHS.get(method, "auto")
    ):
        model(ids, use_cache=False, logits_to_keep=1)  # warm-up at this length: the fused path compiles
        seconds, peak = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
    return {"method": method, "length": length, "seconds": seconds, "peak_gib": peak}


def compare(model, lengths: list[int], train_length: int, label: str) -> list[dict]:
    rows = []
    for length in lengths:
        pair = {m: prefill(model, length, m, train_length) for m in ("vanilla", *ENGINE_PATHS)}
        for row in pair.values():
            row |= {"model": label, "ms_per_token": 1000 * row["seconds"] / length}
            row["time_ratio"] = row["seconds"] / pair["vanilla"]["seconds"]
            row["memory_ratio"] = row["peak_gib"] / max(pair["vanilla"]["peak_gib"], 1e-9)
            rows.append(row)
            print(
                f"{label:10s} {row['method']:12s} {length:7d}: {1000 * row['seconds']:9.1f} ms "
                f"{row['peak_gib']:7.2f} GiB  time ×{row['time_ratio']:.2f}  "
                f"memory ×{row['memory_ratio']:.2f}",
                flush=True,
            )
        torch.cuda.empty_cache()
    return rows


def attention_only(lengths: list[int], kv_heads: int, repeats: int = 5) -> list[dict]:
    """The attention call alone on ``[1, 32, n, 128]`` bf16 queries: flash SDPA (full causal) against
    LM-Infinite's plan (n_global 10, window 4096) through the engine's fused and segment paths; the fastest
    of ``repeats`` timed runs after a warm-up (which compiles), interleaved per length."""
    model = random_model(ONE_LAYER_SHAPE | {"num_key_value_heads": kv_heads})
    attention = model.model.layers[0].self_attn
    rows = []
    with torch.no_grad(), apply_policy(model, lm_infinite(), train_length=4096):
        plan = binding_of(attention).plan
        for n in lengths:
            rows += _attention_at(plan, n, kv_heads, repeats)
            torch.cuda.empty_cache()
    return rows


def _attention_at(plan, n: int, kv_heads: int, repeats: int) -> list[dict]:
    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, n, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    positions = torch.arange(n, device="cuda")

    def engine():
        group = RowGroup(q, k, v, positions, positions, 0)
        return attend_group(plan, group, 128**-0.5, None, None, 0, None)

    def flash():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=kv_heads != 32
        )

    host = positions.cpu()
    band = flex._block_mask("local", plan.window, positions, positions, host, host)

    def band_kernel():  # the fused path's one big kernel alone: what its other work adds shows beside it
        return flex._flex_call(q, k, v, band, 128**-0.5)[0]

    runs = {
        "flash": (flash, "auto"),
        "fused": (engine, "auto"),
        "band-kernel": (band_kernel, "auto"),
        "segments": (engine, "never"),
    }
    outputs = {}
    for label, (run, mode) in runs.items():  # warm-up (compiles the fused path for this shape)
        with fused_attention(mode):
            outputs[label] = run().float()
    # the two paths of the engine agree (bf16 outputs), relative to the outputs' scale
    agreement = (outputs["fused"] - outputs["segments"]).abs().max() / outputs["segments"].abs().max()
    del outputs
    best: dict[str, tuple[float, float]] = {label: (float("inf"), float("inf")) for label in runs}
    for _ in range(repeats):
        for label, (run, mode) in runs.items():
            with fused_attention(mode):
                seconds, peak = timed(run)
            best[label] = (min(best[label][0], seconds), min(best[label][1], peak))
    rows = []
    for label, (seconds, peak) in best.items():
        row = {"kv_heads": kv_heads, "length": n, "path": label, "ms": 1000 * seconds, "peak_gib": peak}
        row["fused_vs_segments"] = float(agreement)
        row["paths_agree"] = bool(agreement < AGREEMENT)
        row["ratio_to_flash"] = seconds / best["flash"][0]
        rows.append(row)
        print(
            f"attention kv={kv_heads:2d} {n:7d} {label:9s}: {row['ms']:8.2f} ms {peak:6.2f} GiB "
            f"x{row['ratio_to_flash']:.3f} of flash (fused vs segments {float(agreement):.1e}"
            f"{'' if row['paths_agree'] else ', DISAGREE'})",
            flush=True,
        )
    return rows


BAND_OPTIONS = (  # FlexAttention kernel settings to try for the band (None: PyTorch's choice for the GPU)
    None,
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    {"USE_TMA": True},
)


def band_tuning(n: int = 65536, window: int = 4096, repeats: int = 5) -> list[dict]:
    """The band kernel alone at ``n`` tokens (``[1, 32, n, 128]`` bf16, window 4096) under each of
    :data:`BAND_OPTIONS`, with the engine's block mask (positions looked up) and with one written from the
    indices (contiguous positions, no lookups), beside flash SDPA: what the kernel itself can reach."""
    q, k, v = (torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    positions = torch.arange(n, device="cuda")
    host = positions.cpu()
    masks = {
        "looked-up": flex._block_mask("local", window, positions, positions, host, host),
        "indices": flex._flex.create_block_mask(
            lambda b, h, i, j: (i - j >= 0) & (i - j < window), None, None, n, n, device="cuda"
        ),
    }
    kernel = torch.compile(flex._flex.flex_attention, dynamic=False)
    def flash():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    flash()
    flash_s = min(timed(flash)[0] for _ in range(repeats))
    rows = []
    for options in BAND_OPTIONS:
        for mask_name, mask in masks.items():
            def run(mask=mask, options=options):
                return kernel(q, k, v, block_mask=mask, scale=128**-0.5, kernel_options=options)

            try:
                run()
                seconds = min(timed(run)[0] for _ in range(repeats))
            except Exception as error:  # a setting this GPU or PyTorch refuses: say so, try the next
                print(f"band {options} {mask_name}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            row = {"options": options, "mask": mask_name, "ms": 1000 * seconds}
            row["ratio_to_flash"] = seconds / flash_s
            rows.append(row)
            print(f"band {str(options):70s} {mask_name:9s}: {row['ms']:7.2f} ms, "
                  f"x{row['ratio_to_flash']:.3f} of flash ({1000 * flash_s:.2f} ms)", flush=True)
    return rows


def capture_cost(length: int) -> list[dict]:
    """Observed forward (all layers, every query's entropy, sampled logit rows) against the plain forward."""
    from oodlens.capture import capture

    model = random_model(SMOLLM2_SHAPE)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    rows = []
    with torch.no_grad():
        model(ids[:, :2048], use_cache=False, logits_to_keep=1)
        plain, plain_peak = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
        for policy in (vanilla(), lm_infinite()):
            with capture(model, policy, train_length=8192, name="smollm2-shape"):
                model(ids[:, :2048], use_cache=False, logits_to_keep=1)
            with capture(model, policy, train_length=8192, name="smollm2-shape"):
                seconds, peak = timed(lambda: model(ids, use_cache=False, logits_to_keep=1))
            rows.append(
                {
                    "policy": policy.name,
                    "length": length,
                    "plain_seconds": plain,
                    "capture_seconds": seconds,
                    "time_ratio": seconds / plain,
                    "memory_ratio": peak / plain_peak,
                }
            )
            print(f"capture ({policy.name}) at {length}: {rows[-1]}", flush=True)
    return rows


def decode(shape: dict, train_length: int, contexts: list[int], steps: int = 16) -> list[dict]:
    """Time per generated token and cache size after each context (random keys and values of the model's
    shape fill the caches, so no long prefill is needed), every method and mode interleaved."""
    model = random_model(shape)
    methods = ["vanilla", "lm-infinite", "streaming-llm"]
    result = decode_speed(
        model,
        methods,
        contexts,
        modes=("eager", "static"),
        steps=steps,
        repeats=2,
        train_length=train_length,
        progress=False,
    )
    rows = result.to_dataframe().to_dict("records")
    for row in rows:
        print(f"decode {row['method']:14s} {row['mode']:6s} after {row['context']:7d}: "
              f"{row['ms_per_token']:7.2f} ms/token ({row['ms_low']:.2f}–{row['ms_high']:.2f}), "
              f"cache {row['cache_mib']:8.1f} MiB", flush=True)
    for context in contexts:
        same = result.ratio("lm-infinite", "vanilla", context, "static")
        against_eager = result.ratio("lm-infinite", "vanilla", context, "static", "eager")
        print(f"decode at {context}: LM-Infinite static {same:.2f}× vanilla static, {against_eager:.2f}× "
              "vanilla eager", flush=True)
    del model
    torch.cuda.empty_cache()
    return rows


def policies_on_cuda(length: int = 300) -> list[dict]:
    """Every policy by name on CUDA: float32 against the CPU engine, bfloat16 against CUDA float32 (max
    absolute logit difference, and relative to the logits' scale)."""
    rows = []
    for family in POLICY_FAMILIES:
        cpu = tiny_model(family).model
        ids = torch.randint(3, cpu.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        for name in POLICIES:
            policy = policy_by_name(name, target_length=length)
            try:
                with torch.no_grad(), apply_policy(cpu, policy):
                    reference = cpu(ids).logits.float()
            except oodlens.OodlensError as error:  # e.g. a policy this family cannot take
                rows.append({"family": family, "policy": name, "skipped": str(error)})
                continue
            row = {"family": family, "policy": name}
            for dtype in (torch.float32, torch.bfloat16):
                model = tiny_model(family).model.to("cuda", dtype)
                with torch.no_grad(), apply_policy(model, policy):
                    logits = model(ids.cuda()).logits.float().cpu()
                difference = (logits - reference).abs().max().item()
                label = str(dtype).removeprefix("torch.")
                row[f"{label}_max_abs"] = difference
                row[f"{label}_relative"] = difference / reference.abs().max().item()
            rows.append(row)
            print(f"policy {family:7s} {name:15s}: {row}", flush=True)
    return rows


def profile(length: int, out: Path) -> dict:
    """Where the time of LM-Infinite's prefill and of the capture goes on the SmolLM2 shape at ``length``:
    torch.profiler's top operators by host and by device time, written to ``out/profile.txt``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from oodlens.capture import capture

    model = random_model(SMOLLM2_SHAPE)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")
    report, summary = [], {}
    runs = {
        "lm-infinite prefill": lambda: apply_policy(model, lm_infinite(), train_length=8192),
        "capture (vanilla)": lambda: capture(model, vanilla(), train_length=8192, name="smollm2-shape"),
    }
    for label, context in runs.items():
        with torch.no_grad():
            with context():
                model(ids[:, :2048], use_cache=False, logits_to_keep=1)  # warm-up
            with context(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        events = prof.key_averages()
        syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "aten::item")
        launches = sum(e.count for e in events if "Launch" in e.key)
        summary[label] = {"sync_or_item_calls": syncs, "launches": launches}
        report += [f"== {label} at {length}: {summary[label]}"]
        report += [events.table(sort_by="self_cpu_time_total", row_limit=15)]
        report += [events.table(sort_by="self_cuda_time_total", row_limit=10)]
    (out / "profile.txt").write_text("\n".join(report))
    print(summary, flush=True)
    return summary


CASES = (
    "kernels",
    "policies",
    "attention",
    "one-layer",
    "one-layer-gqa",
    "smollm2",
    "llama-2-7b",
    "capture",
    "decode",
    "decode-7b",
    "band-tuning",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--lengths", default=None, help="override every case's prefill lengths")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU")
    override = [int(n) for n in args.lengths.split(",")] if args.lengths else None
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "oodlens": oodlens.__version__,
    }
    import transformers

    results["transformers"] = transformers.__version__
    print(results, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def record(name: str, compute: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            results[name] = compute()
        except Exception as error:  # keep the other cases' numbers
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"{name} failed: {error!r}", flush=True)
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2))

    from oodlens.attention import fused_kernel_works

    cases = args.cases.split(",")
    if "kernels" in cases:
        record(
            "kernels",
            lambda: {
                str(dtype): fused_kernel_works(torch.device("cuda"), dtype)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
            },
        )
    if "policies" in cases:
        record("policies", policies_on_cuda)
    long = [8192, 16384, 32768, 65536, 131072]
    if "attention" in cases:
        record(
            "attention",
            lambda: attention_only(override or long, 32) + attention_only(override or long, 8),
        )
    if "one-layer" in cases:
        record(
            "one-layer",
            lambda: compare(random_model(ONE_LAYER_SHAPE), override or long, 4096, "one-layer"),
        )
    if "one-layer-gqa" in cases:
        record(
            "one-layer-gqa",
            lambda: compare(random_model(ONE_LAYER_GQA_SHAPE), override or long, 4096, "one-layer-gqa"),
        )
    if "smollm2" in cases:
        record(
            "smollm2",
            lambda: compare(
                random_model(SMOLLM2_SHAPE), override or [8192, 16384, 32768, 131072], 8192, "smollm2"
            ),
        )
    if "llama-2-7b" in cases:
        record(
            "llama-2-7b",
            lambda: compare(
                random_model(LLAMA2_7B_SHAPE), override or [8192, 16384, 32768], 4096, "llama-2-7b"
            ),
        )
    if "band-tuning" in cases:
        record("band-tuning", lambda: band_tuning((override or [65536])[-1]))
    if "capture" in cases:
        record("capture", lambda: capture_cost((override or [32768])[-1]))
    if "profile" in cases:  # not in the default cases: run it alone
        record("profile", lambda: profile((override or [32768])[-1], args.out))
    if "decode" in cases:
        record("decode", lambda: decode(SMOLLM2_SHAPE, 8192, override or [8192, 32768, 131072]))
    if "decode-7b" in cases:
        record("decode-7b", lambda: decode(LLAMA2_7B_SHAPE, 4096, override or [8192, 32768, 131072]))


if __name__ == "__main__":
    main()

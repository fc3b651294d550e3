"""Decode-step time of GQA, MLA-naive and MLA-absorbed at equal model width, side by side.

    python benchmarks/decode.py                      # CPU, contexts 512 … 16K, batch 1 and 8
    python benchmarks/decode.py --device cuda --dtype bf16

For each context length the three variants are timed in the same loop, so the
printed ratios compare like with like on a shared, noisy machine.  Caches are
filled with random rows (the step's cost does not depend on their values) and
preallocated, so no step pays for a buffer growing.  Each figure is the median of
``--repeats`` steps after ``--warmup`` steps.

Columns: ms per decode step; cache MB read per step (b · t · elements/token · bytes;
naive MLA reads the same latent rows as absorbed but also writes and reads the
up-projected per-head K/V, shown as "naive extra MB"); ratios naive/absorbed and
absorbed/GQA (time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.mla import MLA

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--contexts", default="512,2048,8192,16384", help="comma-separated cached token counts")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="GQA's KV heads (head_dim = d_model / heads)")
    p.add_argument("--kv-lora-rank", type=int, default=256, help="MLA's d_c")
    p.add_argument("--rope-dim", type=int, default=64, help="MLA's d_R")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    return p.parse_args(argv)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_median_ms(steps: dict, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each step, running the steps in turn within every repeat.

    Interleaving means a burst of load on a shared machine hits all variants alike.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def time_one_case(gqa, mla, batch: int, context: int, args, dtype) -> dict[str, float]:
    """Fill caches of ``context`` random tokens and time one decode step of each variant."""
    device, steps = args.device, args.warmup + args.repeats
    g = torch.Generator(device="cpu").manual_seed(context)
    gqa_cache = gqa.new_cache(capacity=context + steps)
    kv_shape = (batch, gqa.n_kv_heads, context, gqa.head_dim)
    gqa_cache.append(*(torch.randn(kv_shape, generator=g).to(device, dtype) for _ in range(2)))
    latent_caches = {}
    for path in ("naive", "absorbed"):
        latent_caches[path] = mla.new_cache(capacity=context + steps)
        latent_caches[path].append(
            torch.randn(batch, context, mla.kv_lora_rank, generator=g).to(device, dtype),
            torch.randn(batch, context, mla.qk_rope_head_dim, generator=g).to(device, dtype),
        )
    x = torch.randn(batch, 1, mla.d_model, generator=g).to(device, dtype)
    return interleaved_median_ms(
        {
            "gqa": lambda: gqa(x, gqa_cache),
            "naive": lambda: mla(x, latent_caches["naive"], path="naive"),
            "absorbed": lambda: mla(x, latent_caches["absorbed"], path="absorbed"),
        },
        device,
        args.warmup,
        args.repeats,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run without --device cuda to benchmark on the CPU")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device
    head_dim = args.d_model // args.heads
    gqa = GroupedQueryAttention(args.d_model, args.heads, args.kv_heads, head_dim).to(device, dtype)
    mla = MLA(
        args.d_model,
        args.heads,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=head_dim,
        qk_rope_head_dim=args.rope_dim,
        v_head_dim=head_dim,
    ).to(device, dtype)
    element = torch.tensor([], dtype=dtype).element_size()
    print(
        f"device {device}, {args.dtype}, d_model {args.d_model}, {args.heads} heads of {head_dim}; "
        f"GQA n_kv {args.kv_heads} ({gqa.cache_elements_per_token()} elements/token) vs "
        f"MLA d_c {args.kv_lora_rank} + d_R {args.rope_dim} ({mla.cache_elements_per_token()} elements/token); "
        f"torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'batch':>5} {'context':>7} | {'GQA ms':>8} {'naive ms':>9} {'absorbed ms':>11} | "
        f"{'GQA MB':>7} {'MLA MB':>7} {'naive extra MB':>14} | {'naive/absorbed':>14} {'absorbed/GQA':>12}"
    )
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                ms = time_one_case(gqa, mla, batch, context, args, dtype)
                gqa_ms, naive_ms, absorbed_ms = ms["gqa"], ms["naive"], ms["absorbed"]
                gqa_mb = batch * context * gqa.cache_elements_per_token() * element / 1e6
                mla_mb = batch * context * mla.cache_elements_per_token() * element / 1e6
                # naive writes then reads n_h·(d_N + d_v) up-projected elements per cached token
                naive_extra_mb = 2 * batch * context * args.heads * (2 * head_dim) * element / 1e6
                print(
                    f"{batch:>5} {context:>7} | {gqa_ms:>8.2f} {naive_ms:>9.2f} {absorbed_ms:>11.2f} | "
                    f"{gqa_mb:>7.1f} {mla_mb:>7.1f} {naive_extra_mb:>14.1f} | "
                    f"{naive_ms / absorbed_ms:>14.2f} {absorbed_ms / gqa_ms:>12.2f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

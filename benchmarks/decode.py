"""One decode step of absorbed MLA against its roofline, next to naive MLA, GQA of equal cache and stock DeepSeek-V3.

    python benchmarks/decode.py                       # CPU, one thread: 1K, 8K, 32K tokens, batch 1 and 8
    python benchmarks/decode.py --device cuda --dtype bf16 --threads 0

The attention is DeepSeek-V3's, one layer: d_model 2048, 16 heads, d_c 512, d_R 64, d_N = d_v = 128 (no query
bottleneck).  Each decode step appends one token to a cache of ``context`` random rows (preallocated, so no step
pays for a buffer growing) and attends over all of them.  Variants, timed in turn within every repeat so that a
burst of load on a shared machine hits them alike (each figure the median of ``--repeats`` steps after
``--warmup``):

- ``absorbed``: ``MLA(..., path="absorbed")``, attention over the latent rows themselves;
- ``naive``: the same module and weights, ``path="naive"``: every cached latent up-projected every step;
- ``stock``: transformers' ``DeepseekV3Attention`` loaded with the same weights, as a user would run it
  (SDPA, a ``DynamicCache`` holding the same rows); skipped when transformers is not installed;
- ``GQA``: 16 query heads sharing ``--gqa-kv-heads`` KV heads of (d_c + d_R) / (2 · n_kv) = 144, so that its
  cache holds exactly MLA's d_c + d_R = 576 elements per token;
- ``copy`` and ``matmul``: a plain copy of ``--copy-mib`` MiB and an n × n product in the step's dtype
  (``--matmul-n``), the two rates of the roofline, measured in the same loop as the steps;
- ``attention``: the absorbed step's attention alone (``mla_decode`` over the same rows, the step's backend), to
  split the step's time between the attention and everything else (projections, RoPE, the cache append).

The roofline (``mla_ref.profile.decode_step_cost``): a step must read its weights and cache (bytes) and run its
matrix products (FLOPs: each weight element once, then per cached row and head a score over d_c + d_R and a
value over d_c), so it takes at least max(bytes / copy rate, FLOPs / matmul rate).  "x floor" is the absorbed
step's time over that floor.  "attn" is the time of the attention alone and the rate its two products reach
(``attention_flops`` = 2 · b · n_h · T · (2 d_c + d_R) over that time): with 16 heads each product is only 16
rows tall, so compare that rate with the square product's.  The naive and stock variants rebuild
n_h · (d_N + d_v) elements per cached token every step, so they run only where batch · context ≤
``--slow-max-tokens`` (the others print "-").

``--parts`` times the absorbed step's two unavoidable parts apart, in the same loop: its weight products alone
(``weights``: the query, latent, W_UK, W_UV and output products of one token, on weights read from memory as the
step reads them) and the attention's two products over the cached rows in the step's blocks (``products``: the
scores over d_c + d_R and the values over d_c, block after block, with every block but the first still in the CPU's
caches).  One thread runs them one after the other, so their sum bounds the step from below however little else it
does; "sum x floor" sets that bound beside the roofline's.

Before timing, one step of each MLA variant on the same input must agree with the absorbed one (fp32: within
1e-4 of the output's largest magnitude), so all of them compute the same attention.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from mla_ref.attention import GroupedQueryAttention
from mla_ref.kernels import mla_decode
from mla_ref.kernels.reference import CPU_BLOCK_ROWS
from mla_ref.mla import MLA
from mla_ref.roofline import decode_step_cost

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # of max |y|, against absorbed
SLOW = ("naive", "stock")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--contexts", default="1024,8192,32768", help="comma-separated cached token counts")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-lora-rank", type=int, default=512, help="MLA's d_c")
    p.add_argument("--rope-dim", type=int, default=64, help="MLA's d_R")
    p.add_argument("--nope-dim", type=int, default=128, help="MLA's d_N")
    p.add_argument("--v-dim", type=int, default=128, help="MLA's d_v")
    p.add_argument("--gqa-kv-heads", type=int, default=2, help="GQA's n_kv; its head size makes its cache MLA's")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's choice (default: 1)")
    p.add_argument("--slow-max-tokens", type=int, default=65536, help="run naive and stock where b·T ≤ this")
    p.add_argument("--copy-mib", type=int, default=64, help="size of the copy that measures the copy rate")
    p.add_argument("--matmul-n", type=int, default=1024, help="n of the n × n product that measures the matmul rate")
    p.add_argument(
        "--parts", action="store_true", help="also time the weight products and the attention's products apart"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
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


def stock_attention(mla: MLA, device: str, dtype: torch.dtype):
    """transformers' DeepseekV3Attention, its rotary embedding and config, holding ``mla``'s weights.

    None when transformers is not installed.
    """
    if importlib.util.find_spec("transformers") is None:
        return None
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    config = DeepseekV3Config(
        hidden_size=mla.d_model,
        num_attention_heads=mla.n_heads,
        num_key_value_heads=mla.n_heads,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        rope_interleave=mla.rope_layout == "interleaved",
        rope_parameters={"rope_type": "default", "rope_theta": mla.rope_theta},
        attention_bias=False,
        num_hidden_layers=1,
        max_position_embeddings=1 << 20,
    )
    config._attn_implementation = "sdpa"  # what from_pretrained picks on this hardware
    attention = DeepseekV3Attention(config, layer_idx=0)
    attention.load_state_dict(mla.state_dict(), strict=True)
    return attention.to(device, dtype).eval(), DeepseekV3RotaryEmbedding(config).to(device), config


def stock_rows(rope_key: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """mla_ref's roped key in stock's order: stock turns interleaved pairs, then stores the evens before the odds."""
    return torch.cat([rope_key[..., 0::2], rope_key[..., 1::2]], dim=-1) if interleaved else rope_key


def part_probes(mla: MLA, x: torch.Tensor, rows: torch.Tensor, q: torch.Tensor) -> dict:
    """The absorbed step's two unavoidable parts as separate steps: its weight products, and its attention products.

    Shapes: x (b, 1, d_model) the new token; rows (b, T, d_c + d_R) the cache; q (b, h, d_c + d_R).
    ``weights`` runs every weight product of one step on inputs of the step's shapes; ``products`` runs the
    attention's scores and values products over ``rows`` in the blocks the CPU reference walks (one block on
    other devices), each block's two products one after the other as the step runs them.
    """
    d_c, batch = mla.kv_lora_rank, x.shape[0]
    q_nope = torch.randn(batch, mla.n_heads, 1, mla.qk_nope_head_dim).to(x)  # (b, h, 1, d_N)
    out_latent = torch.randn(batch, mla.n_heads, 1, d_c).to(x)  # (b, h, 1, d_c)
    attention_out = torch.randn(batch, 1, mla.n_heads * mla.v_head_dim).to(x)  # (b, 1, h · d_v)

    def weights():
        mla._queries(x)  # q_proj (or its low-rank pair)
        mla.kv_a_proj_with_mqa(x)  # [c ; k^R] of the new token
        torch.einsum("bhsd,hdc->bhsc", q_nope, mla.key_up_proj())  # W_UK absorbed into the query
        torch.einsum("bhsc,hdc->bhsd", out_latent, mla.value_up_proj())  # W_UV after the attention
        mla.o_proj(attention_out)

    tokens = rows.shape[1]
    block_rows = CPU_BLOCK_ROWS if rows.device.type == "cpu" else tokens
    # the step's blocks by size (the last one partial), each read from the first rows: after the first, from cache
    blocks = [rows[:, : min(block_rows, tokens - start)] for start in range(0, tokens, block_rows)]  # (b, n, d_c + d_R)

    def products():
        for block in blocks:
            scores = q @ block.mT  # (b, h, n): q · [c ; k^R]
            scores @ block[..., :d_c]  # (b, h, d_c): p · c (any p costs the same)

    return {"weights": weights, "products": products}


def time_one_case(modules: dict, batch: int, context: int, args, dtype) -> dict[str, float]:
    """Fill caches of ``context`` random tokens, check the MLA variants agree, and time one decode step of each."""
    device, steps = args.device, args.warmup + args.repeats + 1
    mla, gqa, stock = modules["mla"], modules["gqa"], modules["stock"]
    slow = batch * context <= args.slow_max_tokens
    g = torch.Generator(device="cpu").manual_seed(context)
    latent = torch.randn(batch, context, mla.kv_lora_rank, generator=g).to(device, dtype)
    rope_key = torch.randn(batch, context, mla.qk_rope_head_dim, generator=g).to(device, dtype)
    x = torch.randn(batch, 1, mla.d_model, generator=g).to(device, dtype)

    variants, caches = {}, {}
    for path in ("absorbed", "naive") if slow else ("absorbed",):
        caches[path] = mla.new_cache(capacity=context + steps)
        caches[path].append(latent, rope_key)
        variants[path] = lambda path=path: mla(x, caches[path], path=path)
    if slow and stock is not None:
        from transformers import DynamicCache

        attention, rotary, config = stock
        stock_cache = DynamicCache(config=config)
        interleaved = mla.rope_layout == "interleaved"
        stock_cache.update(latent[:, None], stock_rows(rope_key, interleaved)[:, None], 0)

        def stock_step():
            position = torch.full((batch, 1), stock_cache.get_seq_length(), device=device)
            return attention(x, rotary(x, position), None, cache=stock_cache)[0]

        variants["stock"] = stock_step
    gqa_cache = gqa.new_cache(capacity=context + steps)
    kv_shape = (batch, gqa.n_kv_heads, context, gqa.head_dim)
    gqa_cache.append(*(torch.randn(kv_shape, generator=g).to(device, dtype) for _ in range(2)))
    variants["gqa"] = lambda: gqa(x, gqa_cache)

    # one step of every MLA variant on the same rows and input: the same attention, so the same output
    outputs = {name: variants[name]().float() for name in ("absorbed", *SLOW) if name in variants}
    scale = outputs["absorbed"].abs().max().item()
    for name, out in outputs.items():
        error = (out - outputs["absorbed"]).abs().max().item() / scale
        assert error <= AGREEMENT[dtype], f"{name} differs from absorbed by {error:.1e} · max|y|"

    copy_bytes = args.copy_mib << 20
    source = torch.full((copy_bytes,), 7, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    a, b = (torch.randn(args.matmul_n, args.matmul_n, generator=g).to(device, dtype) for _ in range(2))
    rows = caches["absorbed"].latent_and_rope_key  # (b, T, d_c + d_R): the absorbed step's own rows
    q = torch.randn(batch, mla.n_heads, rows.shape[-1], generator=g).to(device, dtype)  # (b, h, d_c + d_R)
    lengths = torch.full((batch,), rows.shape[1], dtype=torch.int32, device=device)
    decode = dict(kv_lora_rank=mla.kv_lora_rank, softmax_scale=mla.softmax_scale)  # the step's own backend
    probes = {
        "attention": lambda: mla_decode(q, rows, lengths, **decode),
        "copy": lambda: target.copy_(source),
        "matmul": lambda: a @ b,
    }
    if args.parts:
        probes.update(part_probes(mla, x, rows, q))
    ms = interleaved_median_ms({**variants, **probes}, device, args.warmup, args.repeats)
    ms["copy_rate"] = 2 * copy_bytes / (ms["copy"] / 1e3)  # bytes read + written per second, as STREAM counts
    ms["matmul_rate"] = 2 * args.matmul_n**3 / (ms["matmul"] / 1e3)  # FLOP/s
    return ms


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run without --device cuda to benchmark on the CPU")
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device
    cache_width = args.kv_lora_rank + args.rope_dim
    if cache_width % (4 * args.gqa_kv_heads) != 0:
        raise SystemExit(
            f"d_c + d_R = {cache_width} is not 2 · n_kv · (an even head size) for n_kv {args.gqa_kv_heads}"
        )
    gqa_head_dim = cache_width // (2 * args.gqa_kv_heads)
    torch.manual_seed(0)
    mla = MLA(
        args.d_model,
        args.heads,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.nope_dim,
        qk_rope_head_dim=args.rope_dim,
        v_head_dim=args.v_dim,
    )
    stock = stock_attention(mla, device, dtype)  # from the fp32 weights, then cast like mla
    mla = mla.to(device, dtype).eval()
    gqa = GroupedQueryAttention(args.d_model, args.heads, args.gqa_kv_heads, gqa_head_dim).to(device, dtype).eval()
    modules = {"mla": mla, "gqa": gqa, "stock": stock}
    weights = decode_step_cost(mla, 1, 1, dtype).weight_bytes
    print(
        f"device {device}, {args.dtype}, torch threads {torch.get_num_threads()}; MLA d_model {args.d_model}, "
        f"{args.heads} heads, d_c {args.kv_lora_rank} + d_R {args.rope_dim}, d_N {args.nope_dim}, d_v {args.v_dim} "
        f"({weights / 1e6:.1f} MB of weights); GQA {args.heads} heads sharing {args.gqa_kv_heads} KV heads of "
        f"{gqa_head_dim} ({gqa.cache_elements_per_token()} cache elements/token, MLA {mla.cache_elements_per_token()})"
    )
    if stock is None:
        print("transformers is not installed: the stock DeepseekV3Attention column is skipped")
    print(f"naive and stock run where batch · context <= {args.slow_max_tokens:,}; ratios are time / absorbed time")
    header = (
        f"{'batch':>5} {'context':>7} | {'absorbed':>8} {'floor':>6} {'x floor':>7} {'bound':>5} | "
        f"{'copy':>6} {'matmul':>7} {'MB':>6} {'GFLOP':>6} | {'attn':>6} {'attn':>7} | "
        f"{'GQA':>6} {'naive':>8} {'stock':>8} | {'GQA/':>5} {'naive/':>6} {'stock/':>6}"
    )
    units = (
        f"{'':>5} {'':>7} | {'ms':>8} {'ms':>6} {'':>7} {'':>5} | {'GB/s':>6} {'GFLOP/s':>7} {'':>6} {'':>6} | "
        f"{'ms':>6} {'GFLOP/s':>7} | {'ms':>6} {'ms':>8} {'ms':>8} | {'abs':>5} {'abs':>6} {'abs':>6}"
    )
    print(header)
    print(units)
    print("-" * len(header))
    parts = []  # lines of the --parts table, printed after the main one
    with torch.no_grad():
        for batch in map(int, args.batches.split(",")):
            for context in map(int, args.contexts.split(",")):
                ms = time_one_case(modules, batch, context, args, dtype)
                cost = decode_step_cost(mla, batch, context + 1, dtype)  # the cached rows and the new one
                bytes_s, flops_s = cost.bytes / ms["copy_rate"], cost.flops / ms["matmul_rate"]
                floor_ms = cost.floor_seconds(ms["copy_rate"], ms["matmul_rate"]) * 1e3
                absorbed = ms["absorbed"]
                slow = {name: f"{ms[name]:>8.1f}" if name in ms else f"{'-':>8}" for name in SLOW}
                ratios = {name: f"{ms[name] / absorbed:>6.1f}" if name in ms else f"{'-':>6}" for name in SLOW}
                print(
                    f"{batch:>5} {context:>7} | {absorbed:>8.2f} {floor_ms:>6.2f} {absorbed / floor_ms:>7.2f} "
                    f"{'bytes' if bytes_s >= flops_s else 'FLOPs':>5} | {ms['copy_rate'] / 1e9:>6.1f} "
                    f"{ms['matmul_rate'] / 1e9:>7.1f} {cost.bytes / 1e6:>6.1f} {cost.flops / 1e9:>6.2f} | "
                    f"{ms['attention']:>6.2f} {cost.attention_flops / ms['attention'] / 1e6:>7.1f} | "
                    f"{ms['gqa']:>6.2f} {slow['naive']} {slow['stock']} | {ms['gqa'] / absorbed:>5.2f} "
                    f"{ratios['naive']} {ratios['stock']}",
                    flush=True,
                )
                if args.parts:
                    total = ms["weights"] + ms["products"]
                    parts.append(
                        f"{batch:>5} {context:>7} | {ms['weights']:>7.2f} {ms['products']:>8.2f} {total:>7.2f} "
                        f"{floor_ms:>6.2f} | {total / floor_ms:>9.2f} {absorbed / floor_ms:>7.2f}"
                    )
    if parts:
        print(
            "\nparts, timed apart in the same loop: the weight products alone (read from memory), and the attention's "
            f"two products over blocks of {CPU_BLOCK_ROWS:,} cached rows (all but the first in the CPU's caches); "
            "one thread runs them in turn, so the step takes at least their sum"
        )
        print(
            f"{'batch':>5} {'context':>7} | {'weights':>7} {'products':>8} {'sum':>7} {'floor':>6} | {'sum':>9} {'step':>7}"
        )
        print(f"{'':>5} {'':>7} | {'ms':>7} {'ms':>8} {'ms':>7} {'ms':>6} | {'x floor':>9} {'x floor':>7}")
        print("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

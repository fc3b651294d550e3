"""Wall time and peak memory of ``python -m mla_ref convert``: random models of published shapes, and SmolLM2-135M.

    python benchmarks/convert_speed.py                   # Qwen2.5-0.5B shape: exact and transmla, 512 tokens
    python benchmarks/convert_speed.py --methods exact --calib-tokens 2048
    python benchmarks/convert_speed.py --model llama-3.2-1b --methods recipe --profile engine
    python benchmarks/convert_speed.py --model smollm2-135m --methods exact,transmla,mha2mla,recipe \
        --budgets 0.5,0.25,0.125 --calib-tokens 16384 --eval-tokens 4096    # the converter's defaults

``--model qwen2.5-0.5b`` (default) and ``--model llama-3.2-1b`` are *randomly initialised* models of those published
shapes — Qwen2.5-0.5B: 24 layers, d_model 896, 14 query heads over 2 KV heads of 64, SwiGLU 4864, vocabulary
151,936, tied embeddings, q/k/v biases, θ = 10⁶; Llama-3.2-1B: 16 layers, d_model 2048, 32 query heads over 8 KV
heads of 64 (a cache of 1,024 elements per token and layer, so ``--profile engine``'s 512 + 64 applies), SwiGLU
8192, vocabulary 128,256, tied embeddings, θ = 500,000 — written as Hugging Face directories in bf16, in
safetensors shards with their index (nothing is downloaded).  Random weights make the quality numbers
meaningless; only time and memory are measured.  ``--model smollm2-135m`` converts the real model that
``python -m mla_ref fetch smollm2-135m`` (``make models``) put in its cache; each lossy method runs at every
``--budgets`` fraction.

Each conversion runs in its own process.  Peak memory is that process's ``resource.getrusage(RUSAGE_SELF)
.ru_maxrss`` (peak resident set size, Linux: KiB), which includes the interpreter and torch: the "floor" column
is the same figure for a process that only imports the converter, and "peak − floor" is what converting adds.
The resident set also counts pages of the source's files that safetensors maps rather than copies (the
embedding matrix is read that way, and the quality report's head touches all of it): those are the page cache,
shared and dropped under pressure.  So the peak of the process's anonymous memory (``RssAnon`` in
/proc/self/status, sampled every 10 ms) is given as well: what the conversion itself allocates.
(A forked child starts from its parent's peak, so this script's own process never imports torch: the source is
written by a child process as well.)
Compare it with the model's size: the bf16 source on disk, and the same weights in fp32.  The wall time covers
the whole command after its imports: reading the calibration corpus (the Python standard library), converting,
the quality report and writing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Qwen2.5-0.5B's published config.json values, as a TinyLM config
QWEN25_05B = dict(
    vocab_size=151936,
    d_model=896,
    n_layers=24,
    n_heads=14,
    head_dim=64,
    mlp_hidden=4864,
    attention="gqa",
    n_kv_heads=2,
    rope_theta=1_000_000.0,
    tie_embeddings=True,
    attention_bias=True,
)
# Llama-3.2-1B's published config.json values
LLAMA32_1B = dict(
    vocab_size=128256,
    d_model=2048,
    n_layers=16,
    n_heads=32,
    head_dim=64,
    mlp_hidden=8192,
    attention="gqa",
    n_kv_heads=8,
    rope_theta=500_000.0,
    tie_embeddings=True,
)
RANDOM_SHAPES = {"qwen2.5-0.5b": (QWEN25_05B, "qwen2"), "llama-3.2-1b": (LLAMA32_1B, "llama")}
REAL = "smollm2-135m"
CHILD = """
import resource, sys, threading, time
import mla_ref.cli.convert as cli

peak_anon = [0]  # KiB: the largest RssAnon seen, sampled every 10 ms

def sample():
    while True:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    peak_anon[0] = max(peak_anon[0], int(line.split()[1]))
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
if sys.argv[1:] == ["--floor"]:
    rc, seconds = 0, 0.0
else:
    start = time.perf_counter()
    rc = cli.convert_command(sys.argv[1:])
    seconds = time.perf_counter() - start
print("result", rc, round(seconds, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_anon[0])
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b", choices=(*RANDOM_SHAPES, REAL), help="the source")
    p.add_argument("--methods", default="exact,transmla", help="comma-separated conversion methods")
    p.add_argument("--budgets", default="0.5", help="comma-separated cache fractions for the lossy methods")
    p.add_argument("--profile", default=None, choices=("engine",), help="--profile engine (the lossy methods)")
    p.add_argument("--calib-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=512, help="tokens of the quality report (0 skips it)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--write-source", default=None, help=argparse.SUPPRESS)  # internal: the writer child
    p.add_argument("--write-model", default="qwen2.5-0.5b", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_source(directory: Path, shards: int, model: str = "qwen2.5-0.5b", seed: int = 0) -> int:
    """A random model of ``model``'s shape as a Hugging Face directory in bf16 shards; returns its weights' bytes."""
    import torch

    from mla_ref.hf.llama import expected_shapes, llama_config
    from mla_ref.model import ModelConfig
    from mla_ref.tensor_files import write_safetensors
    from mla_ref.testing import write_byte_tokenizer

    shape, layout = RANDOM_SHAPES[model]
    config = ModelConfig(**shape)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps(llama_config(config, layout, torch.bfloat16, max_positions=32768), indent=2)
    )
    shapes = expected_shapes(config)
    total = sum(torch.Size(shape).numel() for shape in shapes.values()) * 2
    budget, weight_map, shard, size, index = total / shards, {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        name = f"model-{index + 1:05d}.safetensors"
        write_safetensors(directory / name, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            tensor = 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        shard[name] = tensor.to(torch.bfloat16)
        size += tensor.numel() * 2
        if size >= budget and index < shards - 1:
            flush()
    flush()
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    write_byte_tokenizer(directory)  # a vocabulary other than 256 reads its text through a tokenizer
    return total


def run_child(arguments: list[str]) -> tuple[int, float, int, int]:
    """(exit code, seconds, peak RSS, peak anonymous RSS; both in KiB) of one converter process."""
    done = subprocess.run([sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("result ")]
    if not lines:
        raise RuntimeError(f"the converter process failed:\n{done.stderr[-2000:]}")
    _, rc, seconds, peak, peak_anon = lines[-1].split()
    if int(rc) != 0:
        raise RuntimeError(f"convert exited with {rc}:\n{done.stderr[-2000:]}")
    return int(rc), float(seconds), int(peak), int(peak_anon)


def conversions(args) -> list[tuple[str, list[str]]]:
    """(label, convert options) of every conversion asked for: exact once, each lossy method at each budget."""
    runs = []
    for method in args.methods.split(","):
        if method == "exact":
            runs.append(("exact", ["--method", "exact"]))
        elif args.profile is not None:
            runs.append((f"{method} engine", ["--method", method, "--profile", args.profile]))
        else:
            for budget in args.budgets.split(","):
                runs.append((f"{method} {float(budget):.1%}", ["--method", method, "--budget", budget]))
    return runs


def source_model(args, tmp: str) -> tuple[Path, int, str]:
    """(source directory, bytes of its weights as stored, one line on it)."""
    if args.model == REAL:
        from mla_ref.pipelines.fetch import fetched_model_dir

        source = fetched_model_dir(REAL)  # the cached model, checked; a clear error names `make models` otherwise
        weight_bytes = sum(path.stat().st_size for path in source.glob("*.safetensors"))
        return source, weight_bytes, f"SmolLM2-135M from {source}; fp32 on disk {weight_bytes / 2**20:,.0f} MiB"
    source = Path(tmp) / f"{args.model}-shape"
    writer = [sys.executable, __file__, "--write-source", str(source), "--shards", str(args.shards)]
    writer += ["--write-model", args.model]
    written = subprocess.run(writer, capture_output=True, text=True, check=True).stdout.split()
    weight_bytes = int(written[written.index("weight_bytes") + 1])
    line = (
        f"random {args.model} shape, {weight_bytes // 2 / 1e6:,.0f} M parameters; bf16 on disk "
        f"{weight_bytes / 2**20:,.0f} MiB in {args.shards} shards (fp32: {2 * weight_bytes / 2**20:,.0f} MiB)"
    )
    return source, weight_bytes, line


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_source:
        print("weight_bytes", write_source(Path(args.write_source), args.shards, args.write_model))
        return
    with tempfile.TemporaryDirectory(prefix="convert-speed-") as tmp:
        source, weight_bytes, described = source_model(args, tmp)
        mib = 2**20
        _, _, floor, floor_anon = run_child(["--floor"])
        print(f"source: {described}")
        print(
            f"settings: --calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens} --seq-len {args.seq_len}, "
            f"{os.cpu_count()} CPUs; peak = ru_maxrss of the converting process"
        )
        print()
        header = (
            "conversion",
            "wall s",
            "peak MiB",
            "floor MiB",
            "peak − floor MiB",
            "(peak − floor) / model",
            "anon peak − floor MiB",
            "anon / model",
        )
        rows = []
        for k, (label, options) in enumerate(conversions(args)):
            out = Path(tmp) / f"out-{k}"
            command = [str(source), str(out), *options, "--quiet", "--calib-tokens", str(args.calib_tokens)]
            command += ["--eval-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len)]
            _, seconds, peak, peak_anon = run_child(command)
            added = (peak - floor) * 1024
            added_anon = (peak_anon - floor_anon) * 1024
            rows.append(
                (
                    label,
                    f"{seconds:.1f}",
                    f"{peak / 1024:,.0f}",
                    f"{floor / 1024:,.0f}",
                    f"{added / mib:,.0f}",
                    f"{added / weight_bytes:.2f}",
                    f"{added_anon / mib:,.0f}",
                    f"{added_anon / weight_bytes:.2f}",
                )
            )
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            print(
                "  ".join(
                    [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
                )
            )


if __name__ == "__main__":
    main()

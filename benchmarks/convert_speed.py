"""Wall time and peak memory of ``python -m mla_ref convert`` on a model of Qwen2.5-0.5B's published shape.

    python benchmarks/convert_speed.py                   # exact and transmla, 512 calibration / evaluation tokens
    python benchmarks/convert_speed.py --methods exact --calib-tokens 2048

The source is a *randomly initialised* model with Qwen2.5-0.5B's shape — 24 layers, d_model 896, 14 query heads
over 2 KV heads of 64, SwiGLU 4864, vocabulary 151,936, tied embeddings, q/k/v biases, θ = 10⁶ — written as a
Hugging Face qwen2 directory in bf16, in safetensors shards with their index (nothing is downloaded).  Random
weights make the quality numbers meaningless; only time and memory are measured.

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
    p.add_argument("--methods", default="exact,transmla", help="comma-separated conversion methods")
    p.add_argument("--calib-tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=512, help="tokens of the quality report (0 skips it)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--write-source", default=None, help=argparse.SUPPRESS)  # internal: the writer child
    return p.parse_args(argv)


def write_source(directory: Path, shards: int, seed: int = 0) -> int:
    """A random Qwen2.5-0.5B-shaped model as a qwen2 directory in bf16 shards; returns the bytes of its weights."""
    import torch

    from mla_ref.hf.llama import expected_shapes, llama_config
    from mla_ref.model import ModelConfig
    from mla_ref.tensor_files import write_safetensors
    from mla_ref.testing import write_byte_tokenizer

    config = ModelConfig(**QWEN25_05B)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(
        json.dumps(llama_config(config, "qwen2", torch.bfloat16, max_positions=32768), indent=2)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.write_source:
        print("weight_bytes", write_source(Path(args.write_source), args.shards))
        return
    with tempfile.TemporaryDirectory(prefix="convert-speed-") as tmp:
        source = Path(tmp) / "qwen2.5-0.5b-shape"
        writer = [sys.executable, __file__, "--write-source", str(source), "--shards", str(args.shards)]
        written = subprocess.run(writer, capture_output=True, text=True, check=True).stdout.split()
        weight_bytes = int(written[written.index("weight_bytes") + 1])
        parameters = weight_bytes // 2
        mib = 2**20
        _, _, floor, floor_anon = run_child(["--floor"])
        print(
            f"source: random Qwen2.5-0.5B shape, {parameters / 1e6:.0f} M parameters; bf16 on disk "
            f"{weight_bytes / mib:,.0f} MiB in {args.shards} shards (fp32: {2 * weight_bytes / mib:,.0f} MiB)"
        )
        print(
            f"settings: --calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens} --seq-len {args.seq_len}, "
            f"{os.cpu_count()} CPUs; peak = ru_maxrss of the converting process"
        )
        print()
        header = (
            "method",
            "wall s",
            "peak MiB",
            "floor MiB",
            "peak − floor MiB",
            "(peak − floor) / bf16 model",
            "anon peak − floor MiB",
            "anon / bf16 model",
        )
        rows = []
        for method in args.methods.split(","):
            out = Path(tmp) / f"out-{method}"
            command = [str(source), str(out), "--method", method, "--quiet", "--calib-tokens", str(args.calib_tokens)]
            command += ["--eval-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len)]
            _, seconds, peak, peak_anon = run_child(command)
            added = (peak - floor) * 1024
            added_anon = (peak_anon - floor_anon) * 1024
            rows.append(
                (
                    method,
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

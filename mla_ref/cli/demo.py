"""``python -m mla_ref demo``: a headless tour that checks what it shows.

Each section runs part of the package — small random modules first, then the shipped GQA teacher and
its conversion to MLA, then the real model (SmolLM2-135M, when ``make models`` has fetched it) converted to half
its cache by the converter's defaults — and prints figures that were asserted a line earlier, so the demo doubles
as a smoke test of the package.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mla_ref.attention import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention
from mla_ref.calculator import format_bytes, report
from mla_ref.convert import mean_pool_kv_heads
from mla_ref.mla import MLA
from mla_ref.model_shapes import load_model_shape

D_MODEL, N_HEADS, HEAD_DIM = 256, 8, 32
PROMPT, DECODE_STEPS = 48, 16


def _prefill_then_decode(module, x: torch.Tensor, **kwargs):
    """Run x[:, :PROMPT] as one prompt, then the rest one token at a time; return (outputs, cache)."""
    cache = module.new_cache()
    outputs = [module(x[:, :PROMPT], cache, **kwargs)]
    outputs += [module(x[:, t : t + 1], cache, **kwargs) for t in range(PROMPT, x.shape[1])]
    return torch.cat(outputs, dim=1), cache


def gqa_family_section(x: torch.Tensor) -> None:
    print("== The GQA family: MHA, GQA and MQA share one implementation ==")
    print(f"d_model {D_MODEL}, {N_HEADS} query heads of {HEAD_DIM}, {x.shape[1]} tokens, fp32")
    torch.manual_seed(0)
    mha = MultiHeadAttention(D_MODEL, N_HEADS, HEAD_DIM)
    for name, module in (
        ("MHA (n_kv=8)", mha),
        ("GQA (n_kv=2)", mean_pool_kv_heads(mha, 2)),
        ("MQA (n_kv=1)", mean_pool_kv_heads(mha, 1)),
    ):
        full = module(x)
        cached, cache = _prefill_then_decode(module, x)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
        assert cache.nbytes == x.shape[1] * module.cache_elements_per_token() * 4
        error = ((full - mha(x)).norm() / mha(x).norm()).item()
        print(
            f"  {name}: cache {cache.nbytes:>7,} bytes = {module.cache_elements_per_token():>3} elements/token; "
            f"prefill+decode = full recompute: True; mean-pooled vs MHA rel. error {error:.3f}"
        )
    assert isinstance(MultiQueryAttention(D_MODEL, N_HEADS, HEAD_DIM), GroupedQueryAttention)


def mla_section(x: torch.Tensor) -> None:
    print("\n== MLA: a latent cache, and two paths that agree ==")
    torch.manual_seed(0)
    mla = MLA(D_MODEL, N_HEADS, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    naive, naive_cache = _prefill_then_decode(mla, x, path="naive")
    absorbed, absorbed_cache = _prefill_then_decode(mla, x, path="absorbed")
    torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)
    max_diff = (absorbed - naive).abs().max().item()
    assert naive_cache.nbytes == absorbed_cache.nbytes == x.shape[1] * (64 + 16) * 4
    print(f"  d_c 64 + d_R 16 = {mla.cache_elements_per_token()} elements/token; cache {naive_cache.nbytes:,} bytes")
    print(f"  naive vs absorbed (prefill {PROMPT} + decode {DECODE_STEPS}): max |diff| {max_diff:.1e} (fp32)")
    gqa_elements = 2 * 2 * HEAD_DIM
    mha_elements = 2 * N_HEADS * HEAD_DIM
    print(
        f"  cache per token: MHA {mha_elements}, GQA(n_kv=2) {gqa_elements}, MQA {2 * HEAD_DIM}, "
        f"MLA {mla.cache_elements_per_token()} elements  (MLA = {mla.cache_elements_per_token() / mha_elements:.1%}"
        " of MHA)"
    )


def real_models_section() -> None:
    print("\n== Real models: KV cache per token in bf16, over all layers ==")
    for name in ("llama-2-7b", "llama-3-8b", "qwen2.5-7b", "deepseek-v3"):
        result = report(load_model_shape(name), context=32_768, batch=1, dtype="bf16")
        own, mla = result["variants"][0], next(v for v in result["variants"] if v["name"].startswith("MLA (d_c=512"))
        print(
            f"  {name:<12} {own['name']:<32} {own['bytes_per_token']:>9,} B/token; "
            f"{format_bytes(own['total_bytes'])} at 32K tokens; MLA 512+64 needs {mla['bytes_per_token']:,} B/token"
        )
    print("  (python -m mla_ref kv-cache MODEL for the full table)")


def teacher_section() -> None:
    """The shipped GQA teacher: its perplexity against its record, its cache, a sample, and MLA versions of it."""
    from mla_ref import checkpoint
    from mla_ref.convert import gqa_to_mla_exact
    from mla_ref.convert.model import convert_model, convert_model_by_method
    from mla_ref.data import load_corpus, random_batch, validation_windows
    from mla_ref.train import TEACHERS_DIR, evaluate, read_record

    print("\n== The GQA teacher, and the same model with MLA attention ==")
    directory = TEACHERS_DIR / "gqa"
    teacher, record = checkpoint.load(directory), read_record(directory)
    corpus = load_corpus()
    windows = validation_windows(corpus.val, record["seq_len"], record["val_tokens"])
    evaluation = evaluate(teacher, windows)
    same_corpus = corpus.val_sha256 == record["corpus"]["val_sha256"]
    if same_corpus:  # the same bytes: only the order of fp32 sums differs from the record
        torch.testing.assert_close(evaluation.loss, record["val_loss"], rtol=1e-4, atol=0)
    else:  # another Python's standard library: other validation text
        assert abs(evaluation.perplexity / record["val_perplexity"] - 1) < 0.25, evaluation.perplexity
    print(
        f"  {teacher.num_parameters():,} parameters, trained on {record['tokens_seen']:,} bytes; validation "
        f"perplexity {evaluation.perplexity:.3f} over {evaluation.tokens:,} bytes "
        f"({'equals the record' if same_corpus else 'another corpus than the record: within 25% of it'})"
    )

    prompt = torch.tensor([list(b"def __init__(self, ")])
    caches = teacher.new_caches()
    teacher(prompt, caches)
    per_token = sum(cache.nbytes for cache in caches) // prompt.shape[1]
    c = teacher.config
    assert per_token == 2 * c.kv_heads * c.head_dim * c.n_layers * 4 == teacher.kv_cache_bytes_per_token()
    sample = bytes(teacher.generate(prompt, max_new_tokens=48)[0].tolist()).decode("utf-8", errors="replace")
    print(f"  KV cache: 2 x {c.kv_heads} x {c.head_dim} x {c.n_layers} layers x 4 B = {per_token:,} B/token (fp32)")
    print(f"  greedy sample: {sample!r}")

    tokens = windows[:4, :-1]  # (4, s) validation bytes
    exact = convert_model(teacher, lambda attention, _inputs: gqa_to_mla_exact(attention))
    torch.testing.assert_close(exact(tokens), teacher(tokens), atol=1e-4, rtol=1e-4)
    assert exact.kv_cache_bytes_per_token() == teacher.kv_cache_bytes_per_token()
    print(f"  exact MLA (d_c = d_R = 2 n_kv d_h): logits = teacher's within 1e-4, cache {per_token:,} B/token")

    calibration, _ = random_batch(corpus.train, 16, record["seq_len"], torch.Generator().manual_seed(0))
    # the registry's recipe at half the cache, its split of the budget chosen as `convert` chooses it
    compressed = convert_model_by_method(teacher, "recipe", calibration, budget=0.5)
    ratio = evaluate(compressed, windows).perplexity / evaluation.perplexity
    assert 2 * compressed.kv_cache_bytes_per_token() == teacher.kv_cache_bytes_per_token()
    assert ratio < 1.35, ratio  # the project's training-free target at half the cache
    print(
        f"  MLA at half the cache (method 'recipe', no training, d_R {compressed.config.qk_rope_head_dim}): "
        f"{compressed.kv_cache_bytes_per_token():,} B/token, perplexity {ratio:.3f}x the teacher's"
    )


# The real model's section: a prompt of code, the tokens it is continued by, and the budget it is converted at
REAL_PROMPT, REAL_NEW_TOKENS, REAL_BUDGET = "def fibonacci(n):", 24, 0.5
TRAINING_FREE_TARGET = 1.35  # the project's bound on perplexity × source at half the cache, before any training


def real_model_section(
    directory: Path, *, budget: float = REAL_BUDGET, max_ratio: float = TRAINING_FREE_TARGET
) -> None:
    """Convert ``directory`` to ``budget`` of its cache with ``convert``'s defaults (method, calibration, DeepSeek-V3
    form, quality report), load the result with stock ``transformers`` and set it beside the source: cache per token
    read from real caches, perplexity (asserted under ``max_ratio`` × the source's), a greedy sample, and the time
    the conversion took."""
    import transformers
    from transformers.utils import logging as hf_logging

    from mla_ref.hf import load_model, text_tokens
    from mla_ref.pipelines import ConvertOptions, convert_checkpoint
    from mla_ref.pipelines.guard import WRITTEN_FORM

    print(f"\n== A real model at {budget:.0%} of its cache: {directory.name}, converted by the defaults ==")
    with tempfile.TemporaryDirectory(prefix="mla-ref-demo-") as scratch:
        output = Path(scratch) / "mla"
        start = time.perf_counter()
        report = convert_checkpoint(directory, output, ConvertOptions(budget=budget))
        seconds = time.perf_counter() - start
        source, converted = load_model(directory), load_model(output)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        stock = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()

    prompt = text_tokens(directory, REAL_PROMPT.encode(), source.config.vocab_size)[None]  # (1, s)
    cache_bytes = {}
    for name, model in (("source", source), ("converted", converted)):
        caches = model.new_caches()
        model(prompt, caches)
        cache_bytes[name] = sum(cache.nbytes for cache in caches) // prompt.shape[1]  # read from the caches, fp32
    assert cache_bytes["converted"] == converted.kv_cache_bytes_per_token()
    assert abs(cache_bytes["converted"] / cache_bytes["source"] - budget) < 0.01, cache_bytes
    assert type(stock).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(stock(prompt).logits, converted(prompt), atol=5e-4, rtol=5e-4)

    ratio = report.quality[WRITTEN_FORM].perplexity / report.quality["source"].perplexity
    assert 1 <= ratio < max_ratio, ratio
    sizes = report.mla_sizes
    print(
        f"  converted in {seconds:.0f} s ({report.options['method']}, {report.options['calib_tokens']:,} calibration "
        f"tokens): d_c {sizes['d_c']} + d_R {sizes['d_R']}; written as DeepSeek-V3, loaded by transformers as "
        f"{type(stock).__name__}, its logits = mla_ref's within 5e-4"
    )
    print(
        f"  KV cache per token (read from the caches, fp32, all layers): source {cache_bytes['source']:,} B, "
        f"converted {cache_bytes['converted']:,} B"
    )
    print(
        f"  perplexity on {report.evaluation}: source {report.quality['source'].perplexity:.3f}, converted "
        f"{report.quality[WRITTEN_FORM].perplexity:.3f} ({ratio:.3f}x, under {max_ratio}x)"
    )
    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        decode = Tokenizer.from_file(str(tokenizer_file)).decode
    else:  # a byte-level model: every token is a byte

        def decode(ids):
            return bytes(ids).decode("utf-8", errors="replace")

    for name, model in (("source", source), ("converted", converted)):
        sample = model.generate(prompt, REAL_NEW_TOKENS)[0, prompt.shape[1] :].tolist()
        print(f"  greedy, {name:9s}: {REAL_PROMPT + decode(sample)!r}")


def _real_model_dir() -> Path | None:
    """SmolLM2-135M's directory when ``make models`` has fetched it, else None (and a line saying so)."""
    from mla_ref.pipelines.fetch import default_fetch_problem, default_model_dir

    problem = default_fetch_problem("smollm2-135m")
    if problem is not None:
        print(f"\n(SmolLM2-135M is not fetched: {problem}; `make models` fetches it, then the demo converts it)")
        return None
    return default_model_dir("smollm2-135m")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mla_ref demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-real-model", action="store_true", help="leave out the real model's conversion (minutes on a laptop CPU)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(1, PROMPT + DECODE_STEPS, D_MODEL)
    with torch.no_grad():
        gqa_family_section(x)
        mla_section(x)
        real_models_section()
        teacher_section()
        directory = None if args.skip_real_model else _real_model_dir()
        if directory is not None:
            real_model_section(directory)
    print("\nAll checks in this demo passed.")
    return 0

"""Real checkpoints in and out (mla_ref.hf): Llama / Qwen2 / Mistral in, stock DeepSeek-V3 out.

Tiny random Hugging Face models are built in-process and saved with safetensors; nothing is downloaded.
Tolerances: fp32 logits of the same weights computed by two implementations agree to ~1e-6 here (logits of
size ~1–3, a few layers); rtol = atol = 1e-5 leaves room for a different summation order and nothing more.
Tests that need transformers skip with a reason when it is missing; the reading and writing themselves do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mla_ref import checkpoint
from mla_ref.cli.convert import convert_command, export_command
from mla_ref.cli.lab import evaluate_command
from mla_ref.convert.rope_table import fit_rope_theta, standard_table
from mla_ref.convert.stock_form import input_bound, stock_mla
from mla_ref.data import load_corpus, read_text_folder
from mla_ref.hf import export_model, llama3_frequencies, load_llama, load_model, text_tokens
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.pipelines import ConvertOptions, convert_checkpoint
from mla_ref.pipelines.calibration import CalibrationText, calibration_windows, interleave_windows
from mla_ref.testing import write_byte_tokenizer
from mla_ref.train import TEACHERS_DIR

try:
    import transformers
    from transformers.utils import logging as hf_logging
except ImportError:  # the `hf` extra is optional
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the 'hf' extra) is not installed")
FP32 = dict(rtol=1e-5, atol=1e-5)  # see the module docstring
WORDS = "the latent cache of every layer holds one vector per token while queries absorb the key map".split()


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    """A few deterministic text files: the calibration and evaluation corpus of every conversion here."""
    folder = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    for i in range(6):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(120))
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


def _small_options(**kwargs) -> ConvertOptions:
    return ConvertOptions(calib_tokens=512, eval_tokens=256, seq_len=64, **kwargs)


def _perturbed(model):
    """Move every parameter off its initial value (norms ≠ 1, biases ≠ 0) so each one is exercised."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
    "rope_theta": 500000.0,
}
FAMILIES = {
    # llama3 RoPE scaling, head_dim ≠ hidden / heads, rms_norm_eps 1e-5
    "llama-llama3": ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5, rope_parameters=LLAMA3)),
    # q/k/v biases, tied embeddings, 14 query heads over 2
    "qwen2-14-over-2": ("qwen2", dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    # 9 query heads over 3, head_dim ≠ hidden / heads, no sliding window
    "mistral-9-over-3": ("mistral", dict(hidden_size=96, num_attention_heads=9, num_key_value_heads=3, head_dim=16, sliding_window=None)),
    # MHA, odd vocabulary
    "llama-mha": ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, vocab_size=263)),
}  # fmt: skip


def _hf_classes(model_type: str):
    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[model_type]


def _save_hf(path: Path, model_type: str, seed: int = 0, **overrides):
    """A tiny random model of ``model_type`` saved at ``path``; returns the transformers model."""
    torch.manual_seed(seed)
    config_class, model_class = _hf_classes(model_type)
    kwargs = dict(vocab_size=300, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    model = _perturbed(model_class(config_class(**{**kwargs, **overrides})))
    model.save_pretrained(path, safe_serialization=True)
    write_byte_tokenizer(path)  # its vocabulary is not 256: without a tokenizer its text would be refused
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory, transformers model) for every family above."""
    if transformers is None:
        pytest.skip("transformers (the 'hf' extra) is not installed")
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, _save_hf(root / name, model_type, **kw)) for name, (model_type, kw) in FAMILIES.items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A bias-free GQA model in Llama layout, written by mla_ref itself (needs no transformers)."""
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = _perturbed(
        TinyLM(
            ModelConfig(
                vocab_size=300,
                d_model=64,
                n_layers=2,
                n_heads=4,
                attention="gqa",
                n_kv_heads=2,
                head_dim=16,
                mlp_hidden=96,
            )
        )
    )
    checkpoint.save(model, root / "ckpt")
    write_byte_tokenizer(root / "ckpt")  # its vocabulary is not 256: without a tokenizer its text would be refused
    export_model(root / "ckpt", root / "llama", "llama")  # which carries the tokenizer along
    return root / "llama"


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def _load_quietly(directory: Path):
    """AutoModelForCausalLM.from_pretrained, returning (model in fp32, loading info, transformers' log text).

    transformers keeps a bf16 checkpoint in bf16; the comparisons run both sides in fp32 on the same weights.
    """
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    return model.float().eval(), info, stream.getvalue()


def _assert_clean_load(info: dict, log: str) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert "MISSING" not in log and "UNEXPECTED" not in log and "MISMATCH" not in log, log


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


# ---- import -------------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_import_equals_transformers(hf_models, name):
    directory, reference = hf_models[name]
    ours = load_llama(directory)
    tokens = _tokens(ours.config.vocab_size)
    torch.testing.assert_close(_logits(ours, tokens), _logits(reference, tokens), **FP32)


@needs_transformers
def test_import_reads_sharded_checkpoints(tmp_path):
    reference = _save_hf(tmp_path / "one", "qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    reference.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    tokens = _tokens(300)
    torch.testing.assert_close(_logits(load_llama(tmp_path / "shards"), tokens), _logits(reference, tokens), **FP32)


@needs_transformers
@given(
    theta=st.floats(100.0, 1e6),
    half=st.integers(1, 32),
    factor=st.floats(1.5, 32.0),
    low=st.floats(0.5, 2.0),
    gap=st.floats(0.5, 8.0),
    context=st.integers(8, 8192),
)
def test_llama3_table_is_transformers_own(theta, half, factor, low, gap, context):
    params = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=low, high_freq_factor=low + gap)
    params["original_max_position_embeddings"] = context
    config = transformers.LlamaConfig(hidden_size=2 * half, num_attention_heads=1, rope_parameters=params)
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = torch.tensor(llama3_frequencies(theta, 2 * half, params, context))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # the same fp32 operations: bit for bit


# ---- export -----------------------------------------------------------------------------------------------
@needs_transformers
@pytest.mark.parametrize("layout", ["rotate_half", "interleaved"])
def test_export_llama_loads_in_transformers(tmp_path, layout):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=6, attention="gqa", n_kv_heads=3, head_dim=12, mlp_hidden=64, tie_embeddings=True, rope_layout=layout, norm_eps=1e-5)  # fmt: skip
    model = _perturbed(TinyLM(config))
    checkpoint.save(model, tmp_path / "ckpt")
    assert export_command([str(tmp_path / "ckpt"), str(tmp_path / "llama"), "--format", "llama"]) == 0
    loaded, info, log = _load_quietly(tmp_path / "llama")
    _assert_clean_load(info, log)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    tokens = _tokens(300)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(model, tokens), **FP32)


@needs_transformers
def test_teacher_exported_as_llama_loads_in_transformers(tmp_path):
    teacher = TEACHERS_DIR / "gqa"
    assert export_command([str(teacher), str(tmp_path / "llama"), "--format", "llama"]) == 0
    loaded, info, log = _load_quietly(tmp_path / "llama")
    _assert_clean_load(info, log)
    tokens = _tokens(256)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(checkpoint.load(teacher), tokens), **FP32)


# ---- convert ----------------------------------------------------------------------------------------------
CONVERSIONS = {
    "qwen2-exact-gain": ("qwen2-14-over-2", dict(method="exact")),
    "llama3-transmla-anchor-qlora": ("llama-llama3", dict(method="transmla", norm="anchor", q_lora_rank=24)),
    "mistral-mha2mla": ("mistral-9-over-3", dict(method="mha2mla", dtype="bf16")),
}


@pytest.fixture(scope="module")
def converted(hf_models, calib_dir, tmp_path_factory):
    """name -> (source directory, output directory, report, source hashes before the conversion)."""
    root = tmp_path_factory.mktemp("converted")
    results = {}
    for name, (family, options) in CONVERSIONS.items():
        source = hf_models[family][0]
        before = _hashes(source)
        report = convert_checkpoint(source, root / name, _small_options(calib_dir=str(calib_dir), **options))
        results[name] = (source, root / name, report, before)
    return results


@needs_transformers
@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_deepseek_output_loads_in_stock_transformers(converted, name):
    _, output, _, _ = converted[name]
    loaded, info, log = _load_quietly(output)
    _assert_clean_load(info, log)
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    ours = load_model(output)
    tokens = _tokens(ours.config.vocab_size)
    torch.testing.assert_close(_logits(loaded, tokens), _logits(ours, tokens), **FP32)


@needs_transformers
def test_deepseek_config_builds_no_moe(converted):
    _, output, report, _ = converted["qwen2-exact-gain"]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["first_k_dense_replace"] == config["num_hidden_layers"]
    loaded, _, _ = _load_quietly(output)
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in loaded.model.layers)
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == report.cache["output_elements"]


@needs_transformers
def test_conversion_leaves_source_unchanged_and_writes_record(converted):
    for source, output, report, before in converted.values():
        assert _hashes(source) == before
        record = (output / "CONVERSION.md").read_text()
        assert "## Quality against the source" in record and "as written (DeepSeek-V3)" in record
        assert set(report.quality) == {"source", "converted (mla-ref form)", "as written (DeepSeek-V3)"}
        assert all(math.isfinite(q.perplexity) for q in report.quality.values())
        assert report.calibration.startswith("512 tokens in 8 windows of 64 spread evenly over the train split")
        assert f"- calibration: {report.calibration}" in record


def test_calibration_windows_come_from_evenly_spaced_stretches(tmp_path):
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    windows, spread = calibration_windows(tmp_path, data, 256, n_tokens=8 * 64, seq_len=64)  # bytes: no tokenizer
    assert spread and windows.shape == (8, 65)
    for k in range(8):  # window k starts stretch k, 4096 / 8 bytes apart
        assert torch.equal(windows[k], data[k * 512 : k * 512 + 65].long())


def test_a_text_too_short_to_spread_calibrates_on_its_first_windows(tmp_path):
    data = torch.arange(300, dtype=torch.uint8)
    windows, spread = calibration_windows(tmp_path, data, 256, n_tokens=8 * 64, seq_len=64)
    assert not spread and windows.shape == (4, 65)  # 299 targets hold four windows of 64
    assert torch.equal(windows[:, :-1].flatten(), torch.arange(256))


def _assert_same_weights(expected_dir: Path, written_dir: Path) -> None:
    """The two checkpoints' model.safetensors hold the same tensors, bit for bit."""
    expected, written = load_file(expected_dir / "model.safetensors"), load_file(written_dir / "model.safetensors")
    assert expected.keys() == written.keys()
    for name in expected:
        torch.testing.assert_close(written[name], expected[name], rtol=0, atol=0)


def test_calibration_text_given_by_the_caller_replaces_the_folders_windows(llama_dir, calib_dir, tmp_path):
    """The windows the folder would give, passed in by hand, give the same weights; the report names them."""
    options = _small_options(calib_dir=str(calib_dir), kv_lora_rank=24, rope_dim=8)
    config = json.loads((llama_dir / "config.json").read_text())
    windows, _ = calibration_windows(llama_dir, load_corpus(calib_dir).train, config["vocab_size"], 512, 64)
    from_folder = convert_checkpoint(llama_dir, tmp_path / "folder", options)
    given = convert_checkpoint(
        llama_dir, tmp_path / "given", options, calibration_text=CalibrationText(windows, "the folder's windows")
    )
    assert given.calibration == "512 tokens in 8 windows of 64 given by the caller: the folder's windows"
    assert from_folder.calibration.startswith("512 tokens in 8 windows of 64 spread evenly")
    _assert_same_weights(tmp_path / "folder", tmp_path / "given")


def test_interleaved_windows_keep_both_kinds_in_every_leading_slice():
    first, second = torch.zeros(6, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long)
    mixed = interleave_windows(first, second)
    assert mixed[:, 0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 1]  # the second's spaced evenly among the first's
    assert torch.equal(interleave_windows(first, second[:0]), first)


@pytest.fixture(scope="module")
def prose_dir(tmp_path_factory) -> Path:
    """A second folder of text, of another kind than ``calib_dir``'s: three files of numbers."""
    folder = tmp_path_factory.mktemp("prose")
    for i in range(3):
        (folder / f"chapter{i}.txt").write_text(" ".join(str(k * (i + 2)) for k in range(400)) + "\n")
    return folder


def test_a_second_calibration_folder_is_spaced_among_the_first(llama_dir, calib_dir, prose_dir, tmp_path):
    """The folder's windows and the second folder's, interleaved by hand, give the same weights; the report names
    both parts."""
    options = _small_options(calib_dir=str(calib_dir), kv_lora_rank=24, rope_dim=8)
    vocab = json.loads((llama_dir / "config.json").read_text())["vocab_size"]
    windows, _ = calibration_windows(llama_dir, load_corpus(calib_dir).train, vocab, 512, 64)
    extra, _ = calibration_windows(llama_dir, read_text_folder(prose_dir)[0], vocab, 256, 64)
    by_hand = convert_checkpoint(
        llama_dir, tmp_path / "hand", options, calibration_text=CalibrationText(interleave_windows(windows, extra), "")
    )
    two_folders = convert_checkpoint(
        llama_dir,
        tmp_path / "two",
        dataclasses.replace(options, calib_extra_dir=str(prose_dir), calib_extra_tokens=256),
    )
    assert by_hand.calibration.startswith("768 tokens in 12 windows of 64")
    assert two_folders.calibration == (
        "768 tokens in 12 windows of 64 in two parts, the second's windows spaced evenly among the first's: "
        f"512 tokens spread evenly over the train split of {calib_dir}; 256 tokens spread evenly over the 3 text "
        f"files of {prose_dir}"
    )
    _assert_same_weights(tmp_path / "hand", tmp_path / "two")


def test_bad_second_calibration_folders_are_refused_before_anything_is_written(
    llama_dir, calib_dir, prose_dir, tmp_path, capsys
):
    with pytest.raises(ValueError, match="--calib-extra-tokens needs --calib-extra-dir"):
        _small_options(calib_dir=str(calib_dir), calib_extra_tokens=256)
    with pytest.raises(ValueError, match="calib_extra_tokens must be a positive integer"):
        _small_options(calib_dir=str(calib_dir), calib_extra_dir=str(prose_dir), calib_extra_tokens=0)
    missing = _small_options(
        calib_dir=str(calib_dir), kv_lora_rank=24, rope_dim=8, calib_extra_dir=str(tmp_path / "no")
    )
    with pytest.raises(ValueError, match="text folder .* does not exist or is not a directory"):
        convert_checkpoint(llama_dir, tmp_path / "out", missing)
    both = _small_options(calib_dir=str(calib_dir), kv_lora_rank=24, rope_dim=8, calib_extra_dir=str(prose_dir))
    windows = torch.zeros(8, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="give calibration_text or a second calibration folder"):
        convert_checkpoint(llama_dir, tmp_path / "out", both, calibration_text=CalibrationText(windows, "mix"))
    argv = [str(llama_dir), str(tmp_path / "out"), "--rope-dim", "8", "--kv-lora-rank", "24", "--quiet"]
    assert convert_command([*argv, "--calib-extra-dir", str(tmp_path / "no")]) == 2
    assert "does not exist or is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "windows, message",
    [
        (torch.zeros(4, 64, dtype=torch.long), r"with s ≥ 65"),
        (torch.zeros(4, 66, dtype=torch.long), r"must be 65 tokens long \(seq_len \+ 1\), got 66"),
        (torch.zeros(4, 65), "integer token ids"),
        (torch.full((4, 65), 10**6), r"ids outside \[0, "),
    ],
)
def test_bad_calibration_text_is_refused_before_anything_is_written(llama_dir, calib_dir, tmp_path, windows, message):
    with pytest.raises(ValueError, match=message):
        convert_checkpoint(
            llama_dir,
            tmp_path / "out",
            _small_options(calib_dir=str(calib_dir), kv_lora_rank=24, rope_dim=8),
            calibration_text=CalibrationText(windows, "bad"),
        )
    assert not (tmp_path / "out").exists()


@needs_transformers
def test_exact_conversion_of_mqa_is_exact_in_stock_form(tmp_path, calib_dir):
    """n_kv = 1: the shared key is the source's key (the standard table, θ' = θ); the anchor keeps the latent
    norm and the query bias exact.  So stock DeepSeek-V3 reproduces the source itself."""
    source = tmp_path / "mqa"
    reference = _save_hf(source, "qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=1)
    report = convert_checkpoint(source, tmp_path / "out", _small_options(calib_dir=str(calib_dir), norm="anchor"))
    assert report.rope["exact"]
    loaded, info, log = _load_quietly(tmp_path / "out")
    _assert_clean_load(info, log)
    tokens = _tokens(300)
    # the anchor's per-token rms varies by < 2⁻²⁶, below fp32 rounding of these logits
    torch.testing.assert_close(_logits(loaded, tokens), _logits(reference, tokens), **FP32)


def test_mla_ref_format_keeps_the_exact_form(llama_dir, calib_dir, tmp_path):
    options = _small_options(calib_dir=str(calib_dir), format="mla-ref", dtype="fp32")
    report = convert_checkpoint(llama_dir, tmp_path / "out", options)
    converted_model = checkpoint.load(tmp_path / "out")
    assert converted_model.config.attention == "mla" and not converted_model.config.latent_norm
    tokens = _tokens(300)
    torch.testing.assert_close(_logits(converted_model, tokens), _logits(load_llama(llama_dir), tokens), **FP32)
    assert report.quality["converted (mla-ref form)"].max_logit_error < 1e-4  # the same check, on the report


@needs_transformers
def test_mla_ref_format_holds_a_biased_source(tmp_path, calib_dir):
    """Qwen2's q/k/v biases become MLA biases (q_proj, kv_a_proj_with_mqa, o_proj) that the mla_ref
    checkpoint stores and loads back: the exact conversion still reproduces the source."""
    source = tmp_path / "qwen2"
    reference = _save_hf(source, "qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    options = _small_options(calib_dir=str(calib_dir), method="exact", format="mla-ref", dtype="fp32")
    convert_checkpoint(source, tmp_path / "out", options)
    converted_model = checkpoint.load(tmp_path / "out")
    assert converted_model.config.attention_bias
    assert all(layer.self_attn.o_proj.bias is not None for layer in converted_model.layers)
    tokens = _tokens(300)
    torch.testing.assert_close(_logits(converted_model, tokens), _logits(reference, tokens), **FP32)


def test_recipe_is_closer_to_its_source_than_transmla_as_published(llama_dir, calib_dir, tmp_path):
    """At a quarter of the cache, the recipe (rotation budget, score metric, output refit) beats TransMLA as published."""
    kl = {}
    for method in ("transmla", "recipe"):
        # the refit solves h·d_v unknowns per output from the calibration tokens: give it 2,048 (of windows spread
        # over the small text; with 512 its fit was noise and the recipe lost to transmla by 1%)
        options = ConvertOptions(
            calib_dir=str(calib_dir),
            method=method,
            kv_lora_rank=8,
            rope_dim=8,
            calib_tokens=2048,
            eval_tokens=256,
            seq_len=64,
        )
        report = convert_checkpoint(llama_dir, tmp_path / method, options)
        assert report.options["method"] == method
        assert f"method `{method}`: {report.method_title}" in (tmp_path / method / "CONVERSION.md").read_text()
        kl[method] = report.quality["converted (mla-ref form)"].kl_to_source
    assert kl["recipe"] < kl["transmla"], kl
    print("KL", kl)


def test_mla_ref_checkpoint_is_a_source_too(llama_dir, calib_dir, tmp_path, capsys):
    from mla_ref.cli.kv_cache import main as kv_cache

    source = llama_dir.parent / "ckpt"  # the mla_ref checkpoint the Llama directory was exported from
    report = convert_checkpoint(source, tmp_path / "out", _small_options(calib_dir=str(calib_dir), format="mla-ref"))
    assert report.quality["converted (mla-ref form)"].max_logit_error < 1e-4  # exact: fp32 rounding only
    assert kv_cache([str(tmp_path / "out"), "--json"]) == 0  # the mla_ref format's config.json
    shape = json.loads(capsys.readouterr().out)["variants"][0]
    assert shape["elements_per_token_per_layer"] == 2 * 2 * 16  # exact: the source's 2 · n_kv · d_h


def test_tokenizer_is_carried_and_used(llama_dir, calib_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package (the 'hf' extra) is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    source = tmp_path / "src"
    source.mkdir()
    for path in llama_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([p.read_text() for p in sorted(calib_dir.iterdir())], trainer)
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "generation_config.json").write_text('{"do_sample": false}\n')
    text = (calib_dir / "part0.txt").read_bytes()
    ids = text_tokens(source, text, 300)
    assert ids.numel() < len(text) / 2  # merged tokens, not bytes
    assert convert_command([str(source), str(tmp_path / "out"), "--calib-dir", str(calib_dir), "--calib-tokens", "256", "--eval-tokens", "128", "--seq-len", "32", "--quiet"]) == 0  # fmt: skip
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes()


# ---- the pieces of the stock form -----------------------------------------------------------------------------------
@given(theta=st.floats(2.0, 1e7), half=st.integers(2, 32))
def test_rope_fit_recovers_a_standard_table(theta, half):
    table = standard_table(theta, 2 * half)[torch.randperm(half)]  # in any order
    fit = fit_rope_theta([table, table], context=256)
    assert fit.exact and fit.phase_error == 0
    torch.testing.assert_close(standard_table(fit.theta, 2 * half), standard_table(theta, 2 * half), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_anchored_stock_layer_equals_the_exact_form(bias):
    """With a standard RoPE table, the anchor makes the stock layer (normalised latent, interleaved RoPE, query
    bias through the anchored bottleneck) compute the exact-form layer's outputs to fp32 tolerance."""
    torch.manual_seed(0)
    exact = MultiHeadLatentAttention(32, 4, 24, 8, 8, 12, latent_norm=False, bias=bias, rope_layout="rotate_half")
    _perturbed(exact)
    norm_weight = 1 + 0.1 * torch.randn(32)
    x = torch.randn(2, 20, 32)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt() * norm_weight  # what an input RMSNorm can output
    stock = stock_mla(exact, theta=exact.rope_theta, mode="anchor", fit=None, bound=input_bound(norm_weight), bias=True)
    assert stock.latent_norm and stock.rope_layout == "interleaved" and stock.kv_lora_rank == 25
    with torch.no_grad():
        torch.testing.assert_close(stock(x), exact(x), **FP32)


# ---- refusals -------------------------------------------------------------------------------------------------
def _copy(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


REFUSALS = {
    "unknown model_type": (lambda d: _edit_config(d, model_type="gpt2"), "unknown model_type 'gpt2'"),
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.norm.weight")), "missing tensors"),
    "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(2))), "does not describe"),
    "shape": (lambda d: _edit_config(d, intermediate_size=80), "has shape"),
    "qk-norm config": (lambda d: _edit_config(d, use_qk_norm=True), "QK-norm"),
    "qk-norm tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)})), "QK-norm"),
    "sliding window": (lambda d: _edit_config(d, model_type="mistral", sliding_window=16, max_position_embeddings=256), "sliding_window=16"),
    "qwen2 sliding window": (lambda d: _edit_config(d, model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0, max_position_embeddings=256), "use_sliding_window"),
    "rope scaling": (lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'yarn'"),
    "activation": (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act 'gelu'"),
    "o_proj bias": (lambda d: _edit_config(d, attention_bias=True), "o_proj"),
    "no config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem(llama_dir, tmp_path, capsys, case):
    edit, message = REFUSALS[case]
    broken = _copy(llama_dir, tmp_path / "src")
    edit(broken)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_llama(broken) if case != "unknown model_type" else load_model(broken)
    assert convert_command([str(broken), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_pickle_only_checkpoints_are_refused_without_unpickling(llama_dir, tmp_path):
    broken = _copy(llama_dir, tmp_path / "src")
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail differently")
    with pytest.raises(ValueError, match=r"only pickle checkpoints \['pytorch_model.bin'\].*never unpickles"):
        load_llama(broken)


def test_missing_directory_and_bad_options_are_refused(llama_dir, tmp_path, capsys):
    assert convert_command([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert convert_command([str(llama_dir), str(tmp_path / "out"), "--method", "exact", "--kv-lora-rank", "8"]) == 2
    assert "method 'exact' keeps the source's cache" in capsys.readouterr().err
    assert convert_command([str(llama_dir), str(tmp_path / "out"), "--budget", "1.5"]) == 2
    assert "budget must be a fraction of the source's cache in (0, 1], got 1.5" in capsys.readouterr().err
    assert convert_command([str(llama_dir), str(tmp_path / "out"), "--method", "svd"]) == 2
    assert "invalid choice: 'svd'" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert convert_command([str(llama_dir), str(tmp_path / "out")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err


def test_interrupted_conversion_leaves_no_output(llama_dir, calib_dir, tmp_path, monkeypatch):
    from mla_ref.convert.methods.base import Method

    calls = []
    real = Method.convert_layer

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(Method, "convert_layer", failing)
    before = _hashes(llama_dir)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_checkpoint(llama_dir, tmp_path / "out", _small_options(calib_dir=str(calib_dir)))
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a staging folder
    assert _hashes(llama_dir) == before


def test_a_budget_with_a_rope_dim_splits_the_budget_that_way(llama_dir, calib_dir, tmp_path, capsys):
    from mla_ref.cli.kv_cache import main as kv_cache
    from mla_ref.records import read_record

    out = tmp_path / "split"
    assert convert_command([str(llama_dir), str(out), "--budget", "0.5", "--rope-dim", "8", "--calib-dir", str(calib_dir), "--calib-tokens", "256", "--eval-tokens", "0", "--seq-len", "32", "--quiet"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["qk_rope_head_dim"] == 8  # the recipe's rule would give d_R = min(B/2, d_h) = 16
    assert kv_cache([str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variants"][0]["elements_per_token_per_layer"] == 32  # still half
    record = read_record(out / "CONVERSION.md")
    options = record["options"]
    assert options["budget"] == 0.5 and options["rope_dim"] == 8 and options["method"] == "recipe"
    assert record["split"] == ""  # d_R given: nothing chosen


def test_a_budget_alone_lets_the_recipe_choose_its_split_by_the_model_kl(llama_dir, calib_dir, tmp_path):
    import re

    from mla_ref.records import read_record

    out = tmp_path / "chosen"
    assert convert_command([str(llama_dir), str(out), "--budget", "0.25", "--calib-dir", str(calib_dir), "--calib-tokens", "512", "--eval-tokens", "0", "--seq-len", "32", "--quiet"]) == 0  # fmt: skip
    record = read_record(out / "CONVERSION.md")
    # B = 16 of the source's 2 · 2 · 16: d_R = B/2 = 8 (the rule) and B/3 → 4, one element of d_c the anchor
    pattern = r"d_R (\d+) \+ d_c (\d+): KL ([0-9.]+), mean E_l ([0-9.]+)"
    tried = {int(d): (int(c), float(kl), float(e)) for d, c, kl, e in re.findall(pattern, record["split"])}
    assert set(tried) == {8, 4}, record["split"]
    assert all(d_c == 15 - d_r for d_r, (d_c, _, _) in tried.items())
    chosen = min(tried, key=lambda d_r: tried[d_r][1])  # the lower KL to the source on calibration text
    assert re.search(rf"d_R {chosen} \+ d_c \d+: [^,]+, [^,]+ \(chosen\)", record["split"]), record["split"]
    assert record["split"].count("(chosen)") == 1
    assert json.loads((out / "config.json").read_text())["qk_rope_head_dim"] == chosen
    assert "split of the budget chosen by the KL to the source" in (out / "CONVERSION.md").read_text()


# ---- eval and kv-cache on the written directories ------------------------------------------------------------------
def test_eval_and_kv_cache_read_every_layout(llama_dir, calib_dir, tmp_path, capsys):
    from mla_ref.cli.kv_cache import main as kv_cache

    out = tmp_path / "ds"
    assert convert_command([str(llama_dir), str(out), "--method", "transmla", "--calib-dir", str(calib_dir), "--calib-tokens", "256", "--eval-tokens", "0", "--seq-len", "32", "--quiet"]) == 0  # fmt: skip
    for directory in (llama_dir, out):
        assert evaluate_command([str(directory), "--data", str(calib_dir), "--tokens", "256", "--seq-len", "32"]) == 0
        assert "perplexity" in capsys.readouterr().out
    assert kv_cache([str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variants"][0]["elements_per_token_per_layer"] == 32  # d_c + d_R: half the source's 2 · 2 · 16
    # CONVERSION.md names the source, so the saving against it is shown without being asked for
    assert result["compare"]["model"] == str(llama_dir / "config.json")
    assert result["compare"]["elements_per_token_per_layer"] == 2 * 2 * 16 and result["saving"]["fraction"] == 0.5
    shutil.copytree(out, tmp_path / "moved")
    (tmp_path / "moved" / "CONVERSION.md").write_text(
        (out / "CONVERSION.md").read_text().replace(str(llama_dir), str(tmp_path / "gone"))
    )
    assert kv_cache([str(tmp_path / "moved"), "--json"]) == 0  # the recorded source has gone: no comparison
    assert "compare" not in json.loads(capsys.readouterr().out)
    assert kv_cache([str(tmp_path / "moved"), "--compare", str(llama_dir)]) == 0
    assert "this model's cache is 50.0% of it" in capsys.readouterr().out

"""The KV-cache calculator: preset figures, config reading, errors, the CLI, and agreement with real caches."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref import MLA, GroupedQueryAttention
from mla_ref import __main__ as cli
from mla_ref.calculator import (
    cache_variants,
    elements_per_token_per_layer,
    format_bytes,
    format_table,
    gqa_elements_per_token_per_layer,
    mha_equivalent_elements_per_token_per_layer,
    mla_elements_per_token_per_layer,
    report,
)
from mla_ref.cli.kv_cache import main
from mla_ref.dtypes import DTYPES
from mla_ref.model_shapes import PRESETS, ModelShape, load_model_shape

# bf16 bytes per token over all layers, worked out by hand from each published config.json.
HAND_COMPUTED_BF16_BYTES_PER_TOKEN = {
    "llama-2-7b": 524_288,  # 2 · 32 kv heads · 128 d_h · 32 layers · 2 bytes
    "llama-3-8b": 131_072,  # 2 · 8 · 128 · 32 · 2
    "llama-3.2-1b": 32_768,  # 2 · 8 · 64 · 16 · 2
    "qwen2.5-0.5b": 12_288,  # 2 · 2 · 64 · 24 · 2
    "qwen2.5-7b": 57_344,  # 2 · 4 · 128 · 28 · 2
    "mistral-7b": 131_072,  # 2 · 8 · 128 · 32 · 2
    "smollm2-135m": 23_040,  # 2 · 3 · 64 · 30 · 2
    "deepseek-v2": 69_120,  # (512 d_c + 64 d_R) · 60 layers · 2 bytes
    "deepseek-v3": 70_272,  # (512 + 64) · 61 · 2
}

JSON_KEYS = {"model", "layers", "dtype", "bytes_per_element", "context", "batch", "variants"}
VARIANT_KEYS = {"name", "elements_per_token_per_layer", "bytes_per_token", "total_bytes"}


def write_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def module_for(shape: ModelShape) -> torch.nn.Module:
    """One attention layer of ``shape`` (build it on the meta device for real model sizes)."""
    if shape.attention == "MLA":
        return MLA(
            shape.d_model,
            shape.n_heads,
            shape.kv_lora_rank,
            shape.qk_nope_head_dim,
            shape.qk_rope_head_dim,
            shape.v_head_dim,
        )
    return GroupedQueryAttention(shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim)


# ---- presets ------------------------------------------------------------------------------------
def test_every_preset_has_a_hand_computed_figure():
    assert set(PRESETS) == set(HAND_COMPUTED_BF16_BYTES_PER_TOKEN)


@pytest.mark.parametrize("name", list(HAND_COMPUTED_BF16_BYTES_PER_TOKEN))
def test_preset_bytes_per_token(name):
    result = report(load_model_shape(name), context=1, batch=1, dtype="bf16")
    assert result["variants"][0]["bytes_per_token"] == HAND_COMPUTED_BF16_BYTES_PER_TOKEN[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_agrees_with_its_attention_module(name):
    shape = PRESETS[name]
    with torch.device("meta"):  # real model widths, no memory allocated
        module = module_for(shape)
    assert elements_per_token_per_layer(shape) == module.cache_elements_per_token()
    assert ModelShape.from_module(module, layers=shape.layers, name=name) == shape


def test_deepseek_presets_list_the_mha_equivalent_last():
    names = [v.name for v in cache_variants(PRESETS["deepseek-v3"])]
    assert names == [
        "MLA (d_c=512, d_R=64)",
        "MLA (d_c=256, d_R=64)",
        "MLA (d_c=128, d_R=32)",
        "MHA-equivalent (n_h=128, d_k=192, d_v=128)",
    ]
    # 128 heads · (128 d_N + 64 d_R + 128 d_v)
    assert cache_variants(PRESETS["deepseek-v3"])[-1].elements_per_token_per_layer == 40_960


def test_gqa_presets_list_own_cache_then_mla_latents():
    names = [v.name for v in cache_variants(PRESETS["llama-3-8b"])]
    assert names == ["GQA (n_kv=8, d_h=128)", "MLA (d_c=512, d_R=64)", "MLA (d_c=256, d_R=64)", "MLA (d_c=128, d_R=32)"]
    assert cache_variants(PRESETS["llama-2-7b"])[0].name == "MHA (n_kv=32, d_h=128)"
    mqa = ModelShape("mqa", 2, 64, 4, n_kv_heads=1, head_dim=16)
    assert cache_variants(mqa)[0].name == "MQA (n_kv=1, d_h=16)"


# ---- formulas against the modules and against real caches -----------------------------------------
@st.composite
def gqa_shapes(draw):
    n_kv = draw(st.integers(1, 4))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 8))
    return ModelShape("gqa", draw(st.integers(1, 3)), 8 * draw(st.integers(1, 4)), n_heads, n_kv, head_dim)


@st.composite
def mla_shapes(draw):
    return ModelShape(
        "mla",
        draw(st.integers(1, 3)),
        8 * draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        kv_lora_rank=draw(st.integers(1, 24)),
        qk_rope_head_dim=2 * draw(st.integers(0, 4)),
        qk_nope_head_dim=draw(st.integers(1, 8)),
        v_head_dim=draw(st.integers(1, 8)),
    )


@given(shape=st.one_of(gqa_shapes(), mla_shapes()))
def test_formula_equals_module_cache_elements_per_token(shape):
    module = module_for(shape)
    assert elements_per_token_per_layer(shape) == module.cache_elements_per_token()
    assert report(shape, 1)["variants"][0]["elements_per_token_per_layer"] == module.cache_elements_per_token()


@given(
    shape=st.one_of(gqa_shapes(), mla_shapes()),
    batch=st.integers(1, 3),
    prompt=st.integers(1, 6),
    decode_steps=st.integers(0, 3),
    dtype=st.sampled_from(list(DTYPES)),
)
def test_calculator_equals_nbytes_of_real_caches(shape, batch, prompt, decode_steps, dtype):
    torch.manual_seed(0)
    layers = [module_for(shape).to(DTYPES[dtype]) for _ in range(shape.layers)]
    caches = [layer.new_cache() for layer in layers]
    x = torch.randn(batch, prompt + decode_steps, shape.d_model, dtype=DTYPES[dtype])
    with torch.no_grad():
        for layer, cache in zip(layers, caches, strict=True):
            layer(x[:, :prompt], cache)  # prefill
            for step in range(prompt, prompt + decode_steps):
                layer(x[:, step : step + 1], cache)  # one decode step
    context = prompt + decode_steps
    result = report(shape, context=context, batch=batch, dtype=dtype)
    assert all(cache.length == context for cache in caches)
    assert result["variants"][0]["total_bytes"] == sum(cache.nbytes for cache in caches)
    assert result["variants"][0]["bytes_per_token"] * context * batch == sum(cache.nbytes for cache in caches)


def test_formulas_by_name():
    assert gqa_elements_per_token_per_layer(n_kv_heads=8, head_dim=128) == 2_048
    assert mla_elements_per_token_per_layer(kv_lora_rank=512, qk_rope_head_dim=64) == 576
    assert mla_elements_per_token_per_layer(kv_lora_rank=512, qk_rope_head_dim=0) == 512
    assert mha_equivalent_elements_per_token_per_layer(2, 3, 4, 5) == 24  # 2 · (3 + 4 + 5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: gqa_elements_per_token_per_layer(0, 128), "n_kv_heads must be a positive integer, got 0"),
        (lambda: gqa_elements_per_token_per_layer(8, 12.5), "head_dim must be a positive integer, got 12.5"),
        (lambda: mla_elements_per_token_per_layer(512, -2), "qk_rope_head_dim must be a non-negative integer"),
    ],
)
def test_formulas_reject_bad_dimensions(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- reports, JSON, table ---------------------------------------------------------------------------
def test_report_schema_and_ordering():
    result = report(PRESETS["qwen2.5-7b"], context=1000, batch=3, dtype="fp32")
    assert set(result) == JSON_KEYS
    assert (result["model"], result["layers"], result["dtype"]) == ("qwen2.5-7b", 28, "fp32")
    assert (result["bytes_per_element"], result["context"], result["batch"]) == (4, 1000, 3)
    assert [v["name"] for v in result["variants"]] == [v.name for v in cache_variants(PRESETS["qwen2.5-7b"])]
    assert result["variants"][0]["name"] == "GQA (n_kv=4, d_h=128)"
    for variant in result["variants"]:
        assert set(variant) == VARIANT_KEYS
        assert variant["bytes_per_token"] == variant["elements_per_token_per_layer"] * 28 * 4
        assert variant["total_bytes"] == variant["bytes_per_token"] * 1000 * 3


def test_json_output_is_one_object(capsys):
    assert main(["deepseek-v2", "--json", "--context", "128", "--batch", "2", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # fails on anything but exactly one JSON document
    assert set(result) == JSON_KEYS
    assert result == report(PRESETS["deepseek-v2"], context=128, batch=2, dtype="fp16")
    assert result["variants"][0]["name"] == "MLA (d_c=512, d_R=64)"
    assert result["variants"][-1]["name"].startswith("MHA-equivalent")
    assert len({v["name"] for v in result["variants"]}) == len(result["variants"])


def test_table_lists_every_variant_with_its_ratio(capsys):
    assert main(["llama-2-7b", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    result = report(PRESETS["llama-2-7b"], context=32768)
    assert out.strip() == format_table(result)
    assert "llama-2-7b" in out and "32 layers" in out and "bf16" in out and "32,768" in out
    lines = out.splitlines()
    own = result["variants"][0]["bytes_per_token"]
    for variant in result["variants"]:
        (row,) = [line for line in lines if line.startswith(variant["name"])]
        assert f"{variant['bytes_per_token']:,}" in row
        assert format_bytes(variant["total_bytes"]) in row
        assert row.endswith(f"{variant['bytes_per_token'] / own:.3f}x")
    assert "[model]" in [line for line in lines if line.startswith(result["variants"][0]["name"])][0]


def test_compare_reports_the_saving_against_another_model(capsys):
    assert main(["deepseek-v3", "--compare", "llama-3-8b", "--context", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # deepseek-v3: 61 layers × (512 + 64) × 2 B; llama-3-8b: 32 layers × 2 · 8 · 128 × 2 B
    own, other = 61 * 576 * 2, 32 * 2 * 8 * 128 * 2
    assert result["compare"]["bytes_per_token"] == other and result["compare"]["layers"] == 32
    assert result["saving"] == {
        "fraction": own / other,
        "bytes_per_token": other - own,
        "total_bytes": (other - own) * 1000,
    }
    assert main(["llama-2-7b", "--compare", "llama-3-8b"]) == 0  # a bigger cache: the table says "needs … more"
    out = capsys.readouterr().out
    assert "against llama-3-8b: GQA (n_kv=8, d_h=128), 32 layers, 131,072 bytes/token" in out
    assert "400.0% of it: needs 393,216 bytes/token, 1.50 GiB at this context and batch more" in out


def test_compare_refuses_an_unknown_model(capsys):
    assert main(["llama-2-7b", "--compare", "no-such-model"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown model 'no-such-model'")


@pytest.mark.parametrize(
    "n_bytes, text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (36_864, "36.00 KiB"), (2 * 1024**3, "2.00 GiB")],
)
def test_format_bytes(n_bytes, text):
    assert format_bytes(n_bytes) == text


# ---- reading config.json ---------------------------------------------------------------------------
def test_llama_config_with_explicit_head_dim(tmp_path):
    # hidden_size / heads = 160, but head_dim says 128: the explicit integer wins.
    path = write_config(
        tmp_path,
        model_type="llama",
        num_hidden_layers=40,
        hidden_size=5120,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    )
    shape = load_model_shape(path)
    assert (shape.layers, shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim) == (40, 5120, 32, 8, 128)
    assert report(shape, 1)["variants"][0]["bytes_per_token"] == 2 * 8 * 128 * 40 * 2


def test_llama_config_without_head_dim_or_kv_heads(tmp_path):
    path = write_config(
        tmp_path, model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, head_dim=None
    )
    shape = load_model_shape(path)
    assert (shape.n_kv_heads, shape.head_dim, shape.attention) == (32, 128, "MHA")
    assert shape == ModelShape(str(path), 32, 4096, 32, n_kv_heads=32, head_dim=128)


def test_qwen2_config(tmp_path):
    path = write_config(
        tmp_path,
        model_type="qwen2",
        num_hidden_layers=24,
        hidden_size=896,
        num_attention_heads=14,
        num_key_value_heads=2,
    )
    shape = load_model_shape(path)
    assert (shape.n_kv_heads, shape.head_dim) == (2, 64)
    assert report(shape, 1)["variants"][0]["bytes_per_token"] == HAND_COMPUTED_BF16_BYTES_PER_TOKEN["qwen2.5-0.5b"]


def test_deepseek_v3_config_and_directory(tmp_path):
    write_config(
        tmp_path / "DeepSeek-V3",
        model_type="deepseek_v3",
        num_hidden_layers=61,
        hidden_size=7168,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )
    shape = load_model_shape(tmp_path / "DeepSeek-V3")  # a directory holding config.json
    assert shape.attention == "MLA"
    assert shape.name == str(tmp_path / "DeepSeek-V3" / "config.json")
    fields = ("layers", "d_model", "n_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    assert {f: getattr(shape, f) for f in fields} == {f: getattr(PRESETS["deepseek-v3"], f) for f in fields}
    assert report(shape, 1)["variants"] == report(PRESETS["deepseek-v3"], 1)["variants"]


def test_cli_reads_a_config_directory(tmp_path, capsys):
    write_config(
        tmp_path,
        model_type="mistral",
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert main([str(tmp_path), "--json", "--dtype", "fp32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variants"][0] == {
        "name": "GQA (n_kv=2, d_h=16)",
        "elements_per_token_per_layer": 64,  # 2 · 2 · 16
        "bytes_per_token": 512,  # 64 · 2 layers · 4 bytes
        "total_bytes": 512 * 4096,  # default context 4096, batch 1
    }


# ---- errors -------------------------------------------------------------------------------------------
def bad_configs(tmp_path: Path) -> list[tuple[str, str]]:
    """(argument, expected message) for every way a model argument can be wrong."""
    gqa = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    cases = {
        "unknown_type": (dict(gqa, model_type="gpt2"), "unknown model_type 'gpt2'; allowed: llama, qwen2, mistral"),
        "no_type": ({k: v for k, v in gqa.items() if k != "model_type"}, "unknown model_type None; allowed: llama"),
        "indivisible": (
            dict(gqa, hidden_size=100, num_attention_heads=7),
            r"hidden_size \(100\) is not divisible by num_attention_heads \(7\)",
        ),
        "missing_key": (
            {k: v for k, v in gqa.items() if k != "num_hidden_layers"},
            "missing 'num_hidden_layers', which model_type 'llama' needs",
        ),
        "missing_mla_key": (
            dict(gqa, model_type="deepseek_v2", qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
            "missing 'kv_lora_rank', which model_type 'deepseek_v2' needs",
        ),
        "bad_value": (dict(gqa, num_key_value_heads="8"), "num_key_value_heads in .* must be a positive integer"),
        "bad_gqa": (dict(gqa, num_key_value_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
    }
    result = [(str(write_config(tmp_path / name, **config)), message) for name, (config, message) in cases.items()]
    (tmp_path / "not_json.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "empty_dir").mkdir()
    return result + [
        ("llama-9b", "unknown model 'llama-9b': not a preset and no such file or directory; presets: llama-2-7b"),
        (str(tmp_path / "missing" / "config.json"), "not a preset and no such file or directory"),
        (str(tmp_path / "not_json.json"), "cannot read .* as a JSON config"),
        (str(tmp_path / "empty_dir"), "holds no config.json"),
    ]


def test_every_bad_model_argument_raises_a_clear_value_error(tmp_path):
    for argument, message in bad_configs(tmp_path):
        with pytest.raises(ValueError, match=message):
            load_model_shape(argument)


def test_every_bad_model_argument_exits_2_with_one_line(tmp_path, capsys):
    for argument, message in bad_configs(tmp_path):
        assert main([argument]) == 2, argument
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
        assert "Traceback" not in captured.err
        assert re.search(message, captured.err), (message, captured.err)  # the message the API raises


@pytest.mark.parametrize(
    "argv, message",
    [
        (["llama-2-7b", "--context", "0"], "error: context must be a positive integer, got 0"),
        (["llama-2-7b", "--context", "-5"], "error: context must be a positive integer, got -5"),
        (["llama-2-7b", "--batch", "0"], "error: batch must be a positive integer, got 0"),
        (["llama-2-7b", "--context", "many"], "error: argument --context: invalid int value: 'many'"),
        (["llama-2-7b", "--dtype", "int8"], "error: argument --dtype: invalid choice: 'int8'"),
        ([], "error: the following arguments are required: MODEL"),
        (["llama-2-7b", "--layers", "3"], "error: unrecognized arguments: --layers 3"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(context=0), "context must be a positive integer, got 0"),
        (dict(context=10, batch=-1), "batch must be a positive integer, got -1"),
        (dict(context=10, dtype="int8"), "dtype must be one of 'bf16', 'fp16', 'fp32'; got 'int8'"),
    ],
)
def test_report_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        report(PRESETS["llama-2-7b"], **kwargs)


def test_model_shape_rejects_mixed_or_missing_fields():
    with pytest.raises(ValueError, match="not a mix"):
        ModelShape("mixed", 2, 64, 4, n_kv_heads=4, head_dim=16, kv_lora_rank=32)
    with pytest.raises(ValueError, match="not a mix"):
        ModelShape("partial", 2, 64, 4, n_kv_heads=4)
    with pytest.raises(ValueError, match="layers must be a positive integer, got 0"):
        ModelShape("empty", 0, 64, 4, n_kv_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="must be a GroupedQueryAttention or a MultiHeadLatentAttention, got Linear"):
        ModelShape.from_module(torch.nn.Linear(2, 2))


# ---- the command line ------------------------------------------------------------------------------------
def test_dispatcher_runs_kv_cache(capsys):
    assert cli.main(["kv-cache", "smollm2-135m", "--context", "2048", "--batch", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variants"][0]["total_bytes"] == 23_040 * 2048 * 4
    assert cli.main(["kv-cache", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "python -m mla_ref kv-cache" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    run = subprocess.run(
        [sys.executable, "-m", "mla_ref", "kv-cache", "deepseek-v3", "--json"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["variants"][0]["bytes_per_token"] == HAND_COMPUTED_BF16_BYTES_PER_TOKEN["deepseek-v3"]
    bad = subprocess.run(
        [sys.executable, "-m", "mla_ref", "kv-cache", "llama-2-7b", "--batch", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error: batch must be")

"""The converter never writes a DeepSeek-V3 form worse than its own conversion, on a model with per-token
latent norms like a real one's; methods mean the same thing by name; the serving verdict."""

from pathlib import Path

import pytest
import torch

from mla_ref import checkpoint
from mla_ref.cli.convert import convert_command
from mla_ref.convert import METHODS, get_method
from mla_ref.convert.methods.base import engine_sizes
from mla_ref.hf import export_model
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.pipelines import ConvertOptions, convert_checkpoint
from mla_ref.pipelines.guard import GUARD_KL_EXCESS, WrittenFormError
from mla_ref.pipelines.serving import serving_verdict
from mla_ref.train import TEACHERS_DIR

SINK = ord("\n")  # a frequent byte, made the attention-sink-like outlier
SINK_SCALE = 50.0


@pytest.fixture(scope="module")
def sink_dir(tmp_path_factory) -> Path:
    """The GQA teacher in Llama layout, changed so the newline's latent is ~50× every other token's.

    A real model's first tokens (attention sinks) carry hidden states far larger than the rest in a few
    coordinates; here the newline's embedding is one such coordinate, and every layer's input norm gives that
    coordinate a gain of 50, so its latent c = RMSNorm(x) W_DKV is 50× the others'.
    """
    root = tmp_path_factory.mktemp("sink")
    model = checkpoint.load(TEACHERS_DIR / "gqa")
    with torch.no_grad():
        embed = model.embed_tokens.weight  # (vocab, D)
        embed[:, 0] = 0.0
        embed[SINK] = 0.0
        embed[SINK, 0] = 40.0 * embed.norm(dim=1).mean()  # dominates its residual stream through every layer
        for layer in model.layers:
            layer.input_layernorm.weight[0] = SINK_SCALE * layer.input_layernorm.weight.abs().mean()
    checkpoint.save(model, root / "ckpt", dtype=torch.float32)
    export_model(root / "ckpt", root / "llama", "llama")
    return root / "llama"


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)]
    for part in range(4):
        (folder / f"part{part}.py").write_text("".join(lines[part::4]))
    return folder


def _options(calib_dir, **kwargs) -> ConvertOptions:
    return ConvertOptions(calib_dir=str(calib_dir), calib_tokens=1024, eval_tokens=0, seq_len=128, **kwargs)


def test_the_sink_model_has_per_token_latent_norms_far_apart(sink_dir):
    from mla_ref.hf import load_model

    model = load_model(sink_dir)
    tokens = torch.tensor([list(b"x = 1\ny = 2\n")])
    hidden = model.embed_tokens(tokens)
    attention = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(hidden)
    latent_norms = torch.cat([attention.k_proj(x), attention.v_proj(x)], dim=-1).norm(dim=-1)[0]  # (s,)
    is_sink = tokens[0] == SINK
    ratio = latent_norms[is_sink].min() / latent_norms[~is_sink].max()
    assert ratio > 10, f"newline latents only {ratio:.1f}× the others"


def test_gain_breaks_the_written_form_so_nothing_is_written(sink_dir, calib_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WrittenFormError, match="materially worse.*--norm anchor.*--force") as refused:
        convert_checkpoint(sink_dir, out, _options(calib_dir, method="exact", norm="gain"))
    error = refused.value
    assert error.written_kl - error.reference_kl > GUARD_KL_EXCESS and error.n_tokens == 1024
    assert any("--norm anchor" in cause for cause in error.causes)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder left either


def test_the_command_line_refuses_it_with_one_error_line(sink_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(sink_dir), str(out), "--norm", "gain", "--calib-dir", str(calib_dir), "--calib-tokens", "1024"]
    assert convert_command([*argv, "--eval-tokens", "0", "--seq-len", "128", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the DeepSeek-V3 form as written is materially worse") and error.count("\n") == 1
    assert not out.exists()


def test_force_writes_it_and_the_record_says_so_at_the_top(sink_dir, calib_dir, tmp_path):
    report = convert_checkpoint(
        sink_dir, tmp_path / "out", _options(calib_dir, method="exact", norm="gain", force=True)
    )
    assert report.warning and "written anyway because of --force" in report.warning
    lines = (tmp_path / "out" / "CONVERSION.md").read_text().splitlines()
    assert lines[0] == "# Conversion record" and lines[2].startswith("> **Warning: the DeepSeek-V3 form as written")


@pytest.mark.parametrize("method", ["transmla", "recipe"])
def test_the_default_anchor_keeps_the_written_form_faithful(sink_dir, calib_dir, tmp_path, method):
    options = ConvertOptions(
        method=None if method == "recipe" else method,  # the recipe is the default once a size is given
        budget=0.5,
        calib_dir=str(calib_dir),
        calib_tokens=1024,
        eval_tokens=1024,
        seq_len=128,
    )
    assert options.method == method and options.norm == "anchor"
    report = convert_checkpoint(sink_dir, tmp_path / "out", options)
    reference, written = report.quality["converted (mla-ref form)"], report.quality["as written (DeepSeek-V3)"]
    assert report.warning is None and report.rope["exact"]
    assert abs(written.kl_to_source - reference.kl_to_source) < 0.1 * GUARD_KL_EXCESS, (reference, written)
    # the budget holds with the anchored coordinate counted in it
    assert report.cache["output_elements"] == report.cache["source_elements"] // 2


def test_a_rope_table_no_deepseek_config_can_hold_is_refused_with_its_reason(sink_dir, calib_dir, tmp_path):
    """The exact conversion turns each frequency once per KV head; one θ' cannot reproduce that."""
    with pytest.raises(WrittenFormError, match="one RoPE table of a DeepSeek-V3 config.*--format mla-ref"):
        convert_checkpoint(sink_dir, tmp_path / "out", _options(calib_dir, method="exact"))
    report = convert_checkpoint(sink_dir, tmp_path / "ref", _options(calib_dir, method="exact", format="mla-ref"))
    assert report.warning is None  # the conversion itself is what mla-ref stores


# ---- the method registry ------------------------------------------------------------------------------------
def test_the_default_method_follows_from_whether_a_size_is_given():
    assert ConvertOptions().method == "exact"
    assert ConvertOptions(kv_lora_rank=8, rope_dim=8).method == "recipe"
    assert ConvertOptions(budget=0.25).method == "recipe"
    with pytest.raises(ValueError, match="method 'exact' keeps the source's cache"):
        ConvertOptions(method="exact", budget=0.5)
    with pytest.raises(ValueError, match="method must be one of 'exact', 'transmla', 'mha2mla', 'recipe'; got 'svd'"):
        ConvertOptions(method="svd")
    with pytest.raises(ValueError, match="--freqfold is TransMLA's"):
        ConvertOptions(method="mha2mla", budget=0.5, freqfold=2)


def test_each_method_sizes_a_budget_by_its_own_rule():
    source = TinyLM(ModelConfig(attention="gqa", n_kv_heads=3, n_heads=9, head_dim=64, d_model=576)).layers[0].self_attn
    # SmolLM2's shape: 2 · 3 · 64 = 384 cache elements per token and layer
    assert get_method("transmla").sizes(source, budget=0.5) == {"kv_lora_rank": 160, "rope_dim": 32}
    assert get_method("transmla").sizes(source, budget=0.25) == {"kv_lora_rank": 64, "rope_dim": 32}
    assert get_method("recipe").sizes(source, budget=0.5, reserve=1) == {"kv_lora_rank": 127, "rope_dim": 64}
    # the reserved (anchor) element comes out of d_c, never out of d_R
    assert get_method("recipe").sizes(source, budget=0.25, reserve=1) == {"kv_lora_rank": 47, "rope_dim": 48}
    assert get_method("transmla").sizes(source, budget=0.25, reserve=1) == {"kv_lora_rank": 63, "rope_dim": 32}
    assert get_method("mha2mla").sizes(source, budget=0.5) == {"rope_pairs": 16, "kv_lora_rank": 96}
    assert get_method("exact").sizes(source) == {}
    # a budget with d_R: the budget split another way, d_c = B − reserve − d_R
    assert get_method("recipe").sizes(source, budget=0.25, rope_dim=32, reserve=1) == {
        "kv_lora_rank": 63,
        "rope_dim": 32,
    }
    with pytest.raises(ValueError, match="either a budget or"):
        get_method("recipe").sizes(source, budget=0.5, kv_lora_rank=10)
    with pytest.raises(ValueError, match=r"budget must be a fraction of the source's cache in \(0, 1\], got 2"):
        get_method("recipe").sizes(source, budget=2)
    with pytest.raises(ValueError, match="takes no option 'freqfold'"):
        get_method("mha2mla").sizes(source, budget=0.5, freqfold=2)
    assert set(METHODS) == {"exact", "transmla", "mha2mla", "recipe"}
    assert all(method.steps and method.title for method in METHODS.values())


def test_the_recipe_tries_half_and_a_third_of_a_budget_for_d_r():
    source = TinyLM(ModelConfig(attention="gqa", n_kv_heads=3, n_heads=9, head_dim=64, d_model=576)).layers[0].self_attn
    recipe = get_method("recipe")
    assert recipe.candidate_sizes(source, budget=0.25, reserve=1) == [
        {"kv_lora_rank": 47, "rope_dim": 48},  # the rule first
        {"kv_lora_rank": 63, "rope_dim": 32},
    ]
    # at half the cache both give d_R = d_h: one candidate
    assert recipe.candidate_sizes(source, budget=0.5, reserve=1) == [{"kv_lora_rank": 127, "rope_dim": 64}]
    # sizes given: nothing to choose
    assert recipe.candidate_sizes(source, budget=0.25, rope_dim=24) == [{"kv_lora_rank": 72, "rope_dim": 24}]
    assert recipe.candidate_sizes(source, kv_lora_rank=64, rope_dim=32) == [{"kv_lora_rank": 64, "rope_dim": 32}]
    # the published methods keep their one rule
    assert get_method("transmla").candidate_sizes(source, budget=0.25) == [{"kv_lora_rank": 64, "rope_dim": 32}]
    assert get_method("exact").candidate_sizes(source) == [{}]


# ---- serving engines --------------------------------------------------------------------------------------------
def test_serving_verdict_names_each_constraint_missed():
    mla = dict(attention="mla", kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    assert serving_verdict(ModelConfig(**mla, rope_layout="interleaved")) == (True, [])
    servable, reasons = serving_verdict(ModelConfig(**{**mla, "kv_lora_rank": 193}, attention_bias=True))
    assert not servable and len(reasons) == 3
    assert "latent 193 + 64 = 257" in reasons[0] and "biases" in reasons[1] and "interleaved" in reasons[2]


def test_engine_profile_picks_512_plus_64_only_where_it_saves():
    big = TinyLM(ModelConfig(attention="gqa", n_heads=32, n_kv_heads=8, head_dim=64, d_model=2048, n_layers=1))
    assert engine_sizes(big.layers[0].self_attn) == (512, 64)  # Llama-3.2-1B's 1024 elements -> 576
    small = TinyLM(ModelConfig(attention="gqa", n_heads=9, n_kv_heads=3, head_dim=64, d_model=576, n_layers=1))
    with pytest.raises(ValueError, match="caches only 384 elements per token and layer"):
        engine_sizes(small.layers[0].self_attn)
    with pytest.raises(ValueError, match="cannot use --norm anchor"):
        ConvertOptions(profile="engine", norm="anchor")
    assert ConvertOptions(profile="engine").norm == "gain"

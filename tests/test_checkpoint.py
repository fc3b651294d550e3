"""Checkpoints: bit-exact round trips, atomic writes, and clear refusals of anything damaged or mismatched."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mla_ref import checkpoint
from mla_ref.model import ModelConfig, TinyLM

SMALL = dict(d_model=32, n_layers=2, n_heads=4, head_dim=8, mlp_hidden=64)
MLA_SMALL = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def make_model(**overrides) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(ModelConfig(**{**SMALL, **overrides})).eval()


def same_weights(a: TinyLM, b: TinyLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention="mha"),
        dict(attention="gqa", n_kv_heads=2),
        dict(attention="mla", **MLA_SMALL, q_lora_rank=12),
        dict(attention="mla", **MLA_SMALL, tie_embeddings=True),
    ],
)
def test_fp32_round_trip_is_bit_exact(tmp_path, overrides):
    model = make_model(**overrides)
    checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert same_weights(loaded, model)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_bf16_storage_round_trip_is_bit_exact_in_bf16(tmp_path):
    model = make_model(attention="gqa", n_kv_heads=2)
    checkpoint.save(model, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert checkpoint.read_config(tmp_path / "ckpt")[1] == torch.bfloat16
    loaded = checkpoint.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert same_weights(loaded, model.to(torch.bfloat16))


def test_save_is_atomic_and_refuses_a_non_empty_directory(tmp_path):
    model = make_model()
    target = tmp_path / "ckpt"
    checkpoint.save(model, target, extra_files={"NOTES.md": "hello\n"})
    assert sorted(p.name for p in target.iterdir()) == ["NOTES.md", "config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        checkpoint.save(model, target)
    other = make_model(attention="mqa")
    checkpoint.save(other, target, overwrite=True)
    assert checkpoint.load(target).config.attention == "mqa"
    assert not (target / "NOTES.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folders left behind


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="extra file name"):
        checkpoint.save(make_model(), tmp_path / "ckpt", extra_files={"config.json": "{}"})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt"
    checkpoint.save(make_model(), path)
    return path


def rewrite_tensors(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_directory_or_files_are_refused(tmp_path, saved):
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no model.safetensors"):
        checkpoint.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        checkpoint.load(saved)


def test_unknown_attention_type_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"attention": "linear"}))
    with pytest.raises(ValueError, match="attention must be one of .* got 'linear'"):
        checkpoint.load(saved)


def test_unknown_config_key_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"sliding_window": 64}))
    with pytest.raises(ValueError, match="unknown model config keys"):
        checkpoint.load(saved)


def test_wrong_shape_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.update({"layers.0.self_attn.k_proj.weight": torch.zeros(16, 32)}))
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.k_proj.weight' has shape \(16, 32\), the config needs"):
        checkpoint.load(saved)


def test_config_that_does_not_match_the_weights_is_refused(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"attention": "gqa", "n_kv_heads": 2}))
    with pytest.raises(ValueError, match="k_proj.weight' has shape"):
        checkpoint.load(saved)


def test_nan_weights_are_refused(saved):
    def poison(tensors):
        tensors["layers.1.mlp.up_proj.weight"][3, 5] = float("nan")

    rewrite_tensors(saved, poison)
    with pytest.raises(ValueError, match="'layers.1.mlp.up_proj.weight' holds NaN or infinite values"):
        checkpoint.load(saved)


def test_missing_tensor_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.pop("norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['norm.weight'\]"):
        checkpoint.load(saved)


def test_extra_tensor_is_refused(saved):
    rewrite_tensors(saved, lambda t: t.update({"layers.0.self_attn.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"tensors the config does not describe: \['layers.0.self_attn.bias'\]"):
        checkpoint.load(saved)


def test_a_file_that_is_not_safetensors_is_refused(saved):
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        checkpoint.load(saved)


def test_bad_storage_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        checkpoint.save(make_model(), tmp_path / "ckpt", dtype=torch.float16)

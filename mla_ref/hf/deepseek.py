"""The DeepSeek-V3 layout (model_type ``deepseek_v3``): write an MLA TinyLM in it, and read such a directory back.

mla_ref's MLA already uses DeepSeek-V3's parameter names (``q_proj`` or ``q_a_proj``/``q_a_layernorm``/
``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), so the tensors are
renamed exactly as in the Llama layout (``model.`` in front of everything but ``lm_head``).  The config makes
stock ``DeepseekV3ForCausalLM`` build exactly this model:

- every layer dense: ``first_k_dense_replace = num_hidden_layers`` (the SwiGLU MLP copied as it is), with
  one routed expert, one group and no next-token-prediction layers declared so nothing else is sized;
- ``num_key_value_heads = num_attention_heads`` (the up-projected keys already have one head per query);
- RoPE ``default`` with the model's θ on the d_R shared dims, ``rope_interleave`` for the interleaved layout;
- ``attention_bias`` when the layers carry biases (``kv_a_proj_with_mqa``, ``o_proj``, ``q_a_proj``).

Only a model already in stock form qualifies (``stock_form_problem``): latent norm on, the standard RoPE table,
no ``q_proj`` bias.  ``mla_ref.convert.stock_form`` brings a converted model there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mla_ref.dtypes import dtype_name
from mla_ref.hf.build import tinylm_from_state, unallocated
from mla_ref.hf.files import WeightFiles, check_tensors, read_config
from mla_ref.hf.llama import hf_name
from mla_ref.model import ModelConfig, TinyLM

MLA_MODEL_TYPE = "deepseek_v3"
DEEPSEEK_NORM_EPS = 1e-6  # DeepseekV3Attention builds kv_a_layernorm / q_a_layernorm with this default


def stock_form_problem(model: TinyLM) -> str | None:
    """Why ``model`` cannot be written as stock DeepSeek-V3 as it is, or None when it can."""
    config = model.config
    if config.attention != "mla":
        return f"attention is {config.attention!r}, not 'mla'"
    if not config.latent_norm:
        return "the latent is not RMS-normalised (stock DeepSeek-V3 always normalises it)"
    if config.rope_frequencies is not None:
        return "the layers rotate with their own frequency tables (stock DeepSeek-V3 uses θ^(-2s/d_R))"
    for i, layer in enumerate(model.layers):
        q_proj = getattr(layer.self_attn, "q_proj", None)
        if q_proj is not None and q_proj.bias is not None and bool(q_proj.bias.any()):
            return f"layer {i} has a q_proj bias (stock DeepSeek-V3 has none without q_lora_rank)"
    return None


def deepseek_config(
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    attention_bias: bool,
    max_positions: int,
    token_ids: dict | None = None,
) -> dict:
    """The config.json that makes stock ``DeepseekV3ForCausalLM`` build ``config``'s model."""
    data = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": MLA_MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "moe_intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "kv_lora_rank": config.kv_lora_rank,
        "q_lora_rank": config.q_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "first_k_dense_replace": config.n_layers,  # every layer dense: no MoE is built
        "moe_layer_freq": 1,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_interleave": config.rope_layout == "interleaved",
        "attention_bias": attention_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": dtype_name(dtype),
    }
    data.update(token_ids or {})
    return data


def deepseek_tensors(model: TinyLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face DeepSeek-V3 name -> tensor at ``dtype`` (a zero ``q_proj`` bias, which stock lacks, is dropped)."""
    problem = stock_form_problem(model)
    if problem is not None:
        raise ValueError(f"the model is not in stock DeepSeek-V3 form: {problem}")
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")
    return {
        hf_name(name): tensor.detach().to(dtype).contiguous()
        for name, tensor in state.items()
        if not name.endswith("self_attn.q_proj.bias")
    }


def model_config_from_deepseek(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """The TinyLM config of a dense DeepSeek-V3 ``config.json``; refuses MoE layers and scaled RoPE."""
    if hf_config.get("model_type") != MLA_MODEL_TYPE:
        raise ValueError(f"{source}: model_type must be {MLA_MODEL_TYPE!r}, got {hf_config.get('model_type')!r}")
    n_layers, n_heads = hf_config["num_hidden_layers"], hf_config["num_attention_heads"]
    dense = hf_config.get("first_k_dense_replace", 3)
    if hf_config.get("n_routed_experts") and dense < n_layers:
        raise ValueError(f"{source}: layers {dense}… are mixture-of-experts, which mla_ref does not implement")
    if hf_config.get("num_key_value_heads", n_heads) != n_heads:
        raise ValueError(f"{source}: num_key_value_heads must equal num_attention_heads ({n_heads})")
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE rope_type {rope_type!r} is not supported here; allowed: 'default'")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported; allowed: 'silu'")
    return ModelConfig(
        vocab_size=hf_config["vocab_size"],
        d_model=hf_config["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        mlp_hidden=hf_config["intermediate_size"],
        attention="mla",
        rope_theta=float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
        rope_layout="interleaved" if hf_config.get("rope_interleave", True) else "rotate_half",
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=bool(hf_config.get("attention_bias", False)),
        kv_lora_rank=hf_config["kv_lora_rank"],
        qk_nope_head_dim=hf_config["qk_nope_head_dim"],
        qk_rope_head_dim=hf_config["qk_rope_head_dim"],
        v_head_dim=hf_config["v_head_dim"],
        q_lora_rank=hf_config.get("q_lora_rank"),
        latent_norm=True,
    )


def load_deepseek(directory: str | os.PathLike) -> TinyLM:
    """Read a dense DeepSeek-V3 directory (as ``convert`` writes) into an fp32 TinyLM that computes what
    transformers' ``DeepseekV3ForCausalLM`` does (latent and query norms with ε = 1e-6, as it builds them)."""
    root = Path(directory)
    hf_config = read_config(root)
    config = model_config_from_deepseek(hf_config, str(root / "config.json"))
    weights = WeightFiles(root)
    check_tensors(weights, _expected_shapes(config))
    state = {name.removeprefix("model."): weights.get(name).float() for name in weights.names}
    if config.attention_bias and config.q_lora_rank is None:
        for i in range(config.n_layers):  # stock has no q_proj bias: mla_ref's biased module holds a zero one
            q_rows = config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
            state[f"layers.{i}.self_attn.q_proj.bias"] = torch.zeros(q_rows)
    return tinylm_from_state(config, state, latent_norm_eps=DEEPSEEK_NORM_EPS)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a dense DeepSeek-V3 checkpoint of ``config`` holds."""
    with unallocated():
        state = TinyLM(config).state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    return {hf_name(name): tuple(t.shape) for name, t in state.items() if not name.endswith("self_attn.q_proj.bias")}

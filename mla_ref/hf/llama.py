"""The Llama layout (model_type ``llama``, ``qwen2``, ``mistral``): read it into a TinyLM, write a TinyLM in it.

TinyLM's weight names are Hugging Face Llama's without the ``model.`` prefix, so the layout is a renaming:

    model.embed_tokens.weight                      embed_tokens.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.*      layers.N.self_attn.{q,k,v,o}_proj.*   (q/k/v biases: Qwen2)
    model.layers.N.mlp.{gate,up,down}_proj.weight  layers.N.mlp.…
    model.layers.N.{input,post_attention}_layernorm.weight
    model.norm.weight, lm_head.weight              (no lm_head.weight when the embeddings are tied)

Both sides rotate head dimensions j and j + d_h/2 together (``rotate_half``).  RoPE frequencies: the default
θ^(-2j/d_h), or Llama 3's scaled table, computed as transformers does (``llama3_frequencies``) and carried
in ``ModelConfig.rope_frequencies``.  What a TinyLM cannot reproduce is refused with the setting's name:
QK-norm, a sliding window that can bind, other RoPE scalings, partial rotary, MLP biases, an ``o_proj``
bias, activations other than SiLU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from mla_ref.dtypes import dtype_name
from mla_ref.hf.build import block_from_state, tinylm_from_state, unallocated
from mla_ref.hf.files import WeightFiles, check_tensors, read_config
from mla_ref.model import Block, ModelConfig, TinyLM
from mla_ref.model_shapes import GQA_MODEL_TYPES
from mla_ref.rope import convert_layout, inverse_frequencies

SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "llama3")
QK_NORM_KEYS: tuple[str, ...] = ("qk_norm", "use_qk_norm", "qk_layernorm", "use_qk_layernorm")
QK_NORM_TENSORS: tuple[str, ...] = ("q_norm.weight", "k_norm.weight", "q_layernorm.weight", "k_layernorm.weight")
IGNORED_TENSORS: tuple[str, ...] = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints stored
DEFAULT_MAX_POSITIONS = 4096  # written for a TinyLM, which has no position limit


def hf_name(name: str) -> str:
    """TinyLM name -> Hugging Face Llama name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def rope_settings(hf_config: dict, source: str) -> tuple[float, str, dict]:
    """(θ, rope_type, parameters) from a config in either form: ``rope_parameters`` (transformers ≥ 5) or
    ``rope_theta`` + ``rope_scaling`` (earlier)."""
    params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type RoPE parameters are not supported, got {params!r}")
    theta = float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: RoPE scaling rope_type {rope_type!r} is not supported; allowed: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{source}: partial_rotary_factor {partial} is not supported (mla_ref rotates every head dim)")
    return theta, rope_type, params


def llama3_frequencies(theta: float, head_dim: int, params: dict, max_positions: int) -> list[float]:
    """Llama 3's scaled RoPE table, with transformers' own fp32 operations (``_compute_llama3_parameters``).

    ω_j = θ^(-2j/d); wavelength λ_j = 2π/ω_j.  With L = original_max_position_embeddings:
    λ > L / low_freq_factor: ω / factor;   λ < L / high_freq_factor: ω;   in between, with
    s = (L/λ − low_freq_factor) / (high_freq_factor − low_freq_factor):  (1 − s) ω / factor + s ω.
    """
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params.get("original_max_position_embeddings", max_positions)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled).tolist()


def _positive(hf_config: dict, key: str, source: str, default=None) -> int:
    value = hf_config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _refuse_unhonoured(hf_config: dict, model_type: str, source: str) -> None:
    """Settings a TinyLM cannot reproduce, each refused by name."""
    for key in QK_NORM_KEYS:
        if hf_config.get(key):
            raise ValueError(
                f"{source}: QK-norm ({key}={hf_config[key]!r}) is not supported: the GQA family here has none"
            )
    layer_types = hf_config.get("layer_types") or []
    max_positions = hf_config.get("max_position_embeddings") or 0
    if model_type == "mistral":
        window = hf_config.get("sliding_window")
        if window is not None and window < max_positions:
            raise ValueError(
                f"{source}: sliding_window={window} (< max_position_embeddings={max_positions}) restricts attention "
                "to a window, which the conversion cannot honour; set sliding_window to null if the model attends fully"
            )
    if model_type == "qwen2" and hf_config.get("use_sliding_window"):
        window = hf_config.get("sliding_window")
        n_layers = hf_config.get("num_hidden_layers", 0)
        binding = window is not None and window < max_positions
        sliding = "sliding_attention" in layer_types or hf_config.get("max_window_layers", n_layers) < n_layers
        if binding and sliding:
            raise ValueError(
                f"{source}: use_sliding_window=true with sliding_window={window} restricts attention in some layers "
                "to a window, which the conversion cannot honour"
            )
    elif "sliding_attention" in layer_types:
        raise ValueError(f"{source}: layer_types names 'sliding_attention' layers, which the conversion cannot honour")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported; allowed: 'silu'")
    if hf_config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported (TinyLM's SwiGLU has no biases)")
    if model_type in ("llama", "mistral") and hf_config.get("attention_bias"):
        raise ValueError(
            f"{source}: attention_bias=true puts a bias on o_proj as well, which TinyLM does not have; "
            "q/k/v biases alone are read from model_type 'qwen2'"
        )


def model_config_from_hf(hf_config: dict, source: str = "config.json") -> ModelConfig:
    """The TinyLM config of a llama / qwen2 / mistral ``config.json`` (already parsed); refuses what it cannot honour."""
    model_type = hf_config.get("model_type")
    if model_type not in GQA_MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {model_type!r}; allowed: {', '.join(GQA_MODEL_TYPES)}")
    _refuse_unhonoured(hf_config, model_type, source)
    d_model = _positive(hf_config, "hidden_size", source)
    n_heads = _positive(hf_config, "num_attention_heads", source)
    n_kv = _positive(hf_config, "num_key_value_heads", source, default=n_heads)
    n_layers = _positive(hf_config, "num_hidden_layers", source)
    if hf_config.get("head_dim") is not None:
        head_dim = _positive(hf_config, "head_dim", source)
    elif d_model % n_heads:
        raise ValueError(
            f"{source}: hidden_size {d_model} is not divisible by num_attention_heads {n_heads}; add head_dim"
        )
    else:
        head_dim = d_model // n_heads
    if n_heads % n_kv:
        raise ValueError(f"{source}: num_key_value_heads {n_kv} must divide num_attention_heads {n_heads}")
    theta, rope_type, params = rope_settings(hf_config, source)
    frequencies = None
    if rope_type == "llama3":
        table = llama3_frequencies(theta, head_dim, params, hf_config.get("max_position_embeddings", 2048))
        frequencies = [table] * n_layers
    return ModelConfig(
        vocab_size=_positive(hf_config, "vocab_size", source),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        head_dim=head_dim,
        mlp_hidden=_positive(hf_config, "intermediate_size", source),
        attention="mha" if n_kv == n_heads else "gqa",
        n_kv_heads=None if n_kv == n_heads else n_kv,
        rope_theta=theta,
        rope_layout="rotate_half",
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        rope_frequencies=frequencies,
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a checkpoint of ``config`` holds."""
    with unallocated():
        state = TinyLM(config).state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    return {hf_name(name): tuple(t.shape) for name, t in state.items()}


class LlamaCheckpoint:
    """A llama / qwen2 / mistral directory, checked against its config and read one layer at a time.

    ``config`` is the TinyLM config; ``hf_config`` the raw config.json; ``weights`` the lazy tensors.
    """

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self.hf_config = read_config(directory)
        self.config = model_config_from_hf(self.hf_config, str(self.root / "config.json"))
        self.weights = WeightFiles(directory)
        qk_norm = sorted(n for n in self.weights.names if n.endswith(QK_NORM_TENSORS))
        if qk_norm:
            raise ValueError(f"{str(self.root)!r} holds QK-norm tensors {qk_norm[:4]}, which are not supported")
        expected = expected_shapes(self.config)
        if self.config.tie_embeddings and "lm_head.weight" in self.weights.names:
            expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # stored although tied: must match
        check_tensors(self.weights, expected, ignored=IGNORED_TENSORS)
        if self.config.tie_embeddings and "lm_head.weight" in self.weights.names:
            if not torch.equal(self.weights.get("lm_head.weight"), self.weights.get("model.embed_tokens.weight")):
                raise ValueError(f"{str(self.root)!r}: tie_word_embeddings is true but lm_head.weight differs")

    @property
    def max_positions(self) -> int:
        return int(self.hf_config.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS)

    def storage_dtype(self) -> torch.dtype:
        return self.weights.dtype("model.embed_tokens.weight")

    def stored(self, name: str) -> torch.Tensor:
        """One tensor by its TinyLM name, in the dtype it is stored in."""
        if name == "lm_head.weight" and self.config.tie_embeddings:
            name = "embed_tokens.weight"
        return self.weights.get(hf_name(name))

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by its TinyLM name, as fp32."""
        return self.stored(name).float()

    def block(self, layer: int) -> Block:
        """Block ``layer`` as an fp32 module."""
        prefix = f"model.layers.{layer}."
        state = {
            name.removeprefix(prefix): self.weights.get(name).float()
            for name in self.weights.names
            if name.startswith(prefix) and not name.endswith(IGNORED_TENSORS)
        }
        return block_from_state(self.config, layer, state)

    def model(self) -> TinyLM:
        """The whole model as an fp32 TinyLM in eval mode."""
        state = {}
        for name in self.weights.names:
            if name.endswith(IGNORED_TENSORS) or (name == "lm_head.weight" and self.config.tie_embeddings):
                continue
            state[name.removeprefix("model.")] = self.weights.get(name).float()
        return tinylm_from_state(self.config, state)


def load_llama(directory: str | os.PathLike) -> TinyLM:
    """Read a llama / qwen2 / mistral checkpoint directory into an fp32 TinyLM (eval mode)."""
    return LlamaCheckpoint(directory).model()


# ---- writing ------------------------------------------------------------------------------------------------
def llama_config(config: ModelConfig, model_type: str, dtype: torch.dtype, max_positions: int) -> dict:
    """The config.json of ``config`` in Llama layout (``model_type`` "llama" or "qwen2")."""
    if config.attention == "mla":
        raise ValueError("an MLA model cannot be written in Llama layout; use --format deepseek-v3")
    if config.rope_frequencies is not None:
        default = inverse_frequencies(config.head_dim, config.rope_theta).tolist()
        if any(
            not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(t, default, strict=True))
            for t in config.rope_frequencies
        ):
            raise ValueError("a model with its own per-layer RoPE frequency tables cannot be written in Llama layout")
    if config.attention_bias and model_type != "qwen2":
        raise ValueError(
            "a model with q/k/v biases is written as model_type 'qwen2' (Llama's attention_bias adds o_proj's)"
        )
    data = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": dtype_name(dtype),
    }
    if model_type == "qwen2":
        data.update(use_sliding_window=False, sliding_window=None)
    else:
        data.update(attention_bias=False, mlp_bias=False)
    return data


def llama_tensors(model: TinyLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor at ``dtype``; an interleaved model's q/k rows are reordered to rotate-half."""
    config = model.config
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("lm_head.weight")
    tensors = {}
    for name, tensor in state.items():
        if config.rope_layout == "interleaved" and name.endswith(
            ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
        ):
            rows = tensor.unflatten(0, (-1, config.head_dim))  # (heads, d_h, …)
            tensor = convert_layout(rows.movedim(1, -1), "interleaved", "rotate_half").movedim(-1, 1).flatten(0, 1)
        tensors[hf_name(name)] = tensor.detach().to(dtype).contiguous()
    return tensors

"""The attention dimensions that decide a model's KV cache: ``ModelShape``, for the presets of real models and for any
Hugging Face ``config.json`` or mla_ref checkpoint (``load_model_shape``).

head_dim is read as an explicit integer (never a rounded hidden_size / n_h when a config states it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mla_ref._checks import require_non_negative_int, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.mla import MultiHeadLatentAttention

GQA_MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "mistral")
MLA_MODEL_TYPES: tuple[str, ...] = ("deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelShape:
    """The attention dimensions that decide a model's KV cache.

    A GQA-family model (MHA, GQA, MQA) sets ``n_kv_heads`` and ``head_dim``; an MLA model sets
    ``kv_lora_rank`` (d_c), ``qk_rope_head_dim`` (d_R), ``qk_nope_head_dim`` (d_N) and
    ``v_head_dim`` (d_v).  The other group stays None.
    """

    name: str
    layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None

    def __post_init__(self) -> None:
        for field in ("layers", "d_model", "n_heads"):
            require_positive_int(f"{self.name}: {field}", getattr(self, field))
        gqa = (self.n_kv_heads, self.head_dim)
        mla = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim)
        if all(v is not None for v in gqa) and all(v is None for v in mla):
            require_positive_int(f"{self.name}: n_kv_heads", self.n_kv_heads)
            require_positive_int(f"{self.name}: head_dim", self.head_dim)
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(
                    f"{self.name}: n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
                )
        elif all(v is not None for v in mla) and all(v is None for v in gqa):
            require_positive_int(f"{self.name}: kv_lora_rank", self.kv_lora_rank)
            require_non_negative_int(f"{self.name}: qk_rope_head_dim", self.qk_rope_head_dim)
            require_non_negative_int(f"{self.name}: qk_nope_head_dim", self.qk_nope_head_dim)
            require_positive_int(f"{self.name}: v_head_dim", self.v_head_dim)
        else:
            raise ValueError(
                f"{self.name}: set either n_kv_heads and head_dim (MHA/GQA/MQA) or kv_lora_rank, "
                "qk_rope_head_dim, qk_nope_head_dim and v_head_dim (MLA), not a mix"
            )

    @property
    def attention(self) -> str:
        """ "MHA", "GQA", "MQA" or "MLA"."""
        if self.kv_lora_rank is not None:
            return "MLA"
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"

    @classmethod
    def from_module(cls, module: nn.Module, layers: int = 1, name: str | None = None) -> ModelShape:
        """The shape of ``layers`` copies of one attention module (GQA family or MLA)."""
        name = name or type(module).__name__
        if isinstance(module, MultiHeadLatentAttention):
            return cls(
                name,
                layers,
                module.d_model,
                module.n_heads,
                kv_lora_rank=module.kv_lora_rank,
                qk_rope_head_dim=module.qk_rope_head_dim,
                qk_nope_head_dim=module.qk_nope_head_dim,
                v_head_dim=module.v_head_dim,
            )
        if isinstance(module, GroupedQueryAttention):
            return cls(
                name, layers, module.d_model, module.n_heads, n_kv_heads=module.n_kv_heads, head_dim=module.head_dim
            )
        raise ValueError(
            f"module must be a GroupedQueryAttention or a MultiHeadLatentAttention, got {type(module).__name__}"
        )


def _gqa(name: str, layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> ModelShape:
    return ModelShape(name, layers, d_model, n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim)


def _mla(name: str, layers: int, d_model: int, n_heads: int, d_c: int, d_r: int, d_n: int, d_v: int) -> ModelShape:
    return ModelShape(
        name, layers, d_model, n_heads, kv_lora_rank=d_c, qk_rope_head_dim=d_r, qk_nope_head_dim=d_n, v_head_dim=d_v
    )


# Published config.json values: num_hidden_layers, hidden_size, num_attention_heads, then
# num_key_value_heads and head_dim, or kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim.
PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        _gqa("llama-2-7b", 32, 4096, 32, 32, 128),
        _gqa("llama-3-8b", 32, 4096, 32, 8, 128),
        _gqa("llama-3.2-1b", 16, 2048, 32, 8, 64),
        _gqa("qwen2.5-0.5b", 24, 896, 14, 2, 64),
        _gqa("qwen2.5-7b", 28, 3584, 28, 4, 128),
        _gqa("mistral-7b", 32, 4096, 32, 8, 128),
        _gqa("smollm2-135m", 30, 576, 9, 3, 64),
        _mla("deepseek-v2", 60, 5120, 128, 512, 64, 128, 128),
        _mla("deepseek-v3", 61, 7168, 128, 512, 64, 128, 128),
    )
}


def _config_int(config: dict, key: str, source: str, *, allow_zero: bool = False) -> int:
    if config.get(key) is None:
        raise ValueError(f"{source}: missing {key!r}, which model_type {config['model_type']!r} needs")
    check = require_non_negative_int if allow_zero else require_positive_int
    return check(f"{key} in {source}", config[key])


def shape_from_config(config: dict, name: str) -> ModelShape:
    """Read the cache-relevant fields of a Hugging Face config (already parsed from JSON).

    model_type llama / qwen2 / mistral: num_hidden_layers, hidden_size, num_attention_heads,
    num_key_value_heads (default: num_attention_heads), head_dim (default: hidden_size /
    num_attention_heads, which must then divide exactly).  model_type deepseek_v2 / deepseek_v3:
    kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim as well.
    """
    allowed = GQA_MODEL_TYPES + MLA_MODEL_TYPES
    if not isinstance(config, dict):
        raise ValueError(f"{name}: a config must be a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in allowed:
        raise ValueError(f"{name}: unknown model_type {model_type!r}; allowed: {', '.join(allowed)}")
    layers = _config_int(config, "num_hidden_layers", name)
    d_model = _config_int(config, "hidden_size", name)
    n_heads = _config_int(config, "num_attention_heads", name)
    if model_type in MLA_MODEL_TYPES:
        return _mla(
            name,
            layers,
            d_model,
            n_heads,
            _config_int(config, "kv_lora_rank", name),
            _config_int(config, "qk_rope_head_dim", name, allow_zero=True),
            _config_int(config, "qk_nope_head_dim", name, allow_zero=True),
            _config_int(config, "v_head_dim", name),
        )
    n_kv_heads = (
        n_heads if config.get("num_key_value_heads") is None else _config_int(config, "num_key_value_heads", name)
    )
    if config.get("head_dim") is not None:
        head_dim = _config_int(config, "head_dim", name)
    elif d_model % n_heads != 0:
        raise ValueError(
            f"{name}: hidden_size ({d_model}) is not divisible by num_attention_heads ({n_heads}) "
            "and the config has no head_dim; add head_dim to the config"
        )
    else:
        head_dim = d_model // n_heads
    return _gqa(name, layers, d_model, n_heads, n_kv_heads, head_dim)


def load_model_shape(name_or_path: str | Path) -> ModelShape:
    """A preset by name, or the shape read from a ``config.json`` (or a directory holding one)."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"directory {str(name_or_path)!r} holds no config.json")
    elif not path.is_file():
        raise ValueError(
            f"unknown model {str(name_or_path)!r}: not a preset and no such file or directory; "
            f"presets: {', '.join(PRESETS)}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as a JSON config: {exc}") from exc
    if isinstance(config, dict) and "model_type" not in config and "attention" in config:  # an mla_ref checkpoint
        from mla_ref.model import ModelConfig

        c = ModelConfig.from_dict({k: v for k, v in config.items() if k != "storage_dtype"})
        if c.attention == "mla":
            sizes = (c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim)
            return _mla(str(path), c.n_layers, c.d_model, c.n_heads, *sizes)
        return _gqa(str(path), c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.head_dim)
    return shape_from_config(config, str(path))

"""A tiny Llama-style decoder whose attention is pluggable: MHA, GQA, MQA or MLA.

    tokens (b, s) bytes 0…255
    x = embed(tokens)                                      (b, s, d)
    for each of L blocks (pre-norm residual):
        x = x + attention(RMSNorm(x), cache)               GQA family or MLA
        x = x + W_down (silu(W_gate u) ⊙ W_up u),  u = RMSNorm(x)    (SwiGLU)
    logits = lm_head(RMSNorm(x))                           (b, s, 256)

Positions enter only through RoPE inside the attention modules, so there is no
position table and no hard length limit.  Weight names follow Hugging Face Llama
(``embed_tokens``, ``layers.N.self_attn``, ``input_layernorm``, ``mlp.gate_proj`` …).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mla_ref._checks import require_choice, require_positive_int
from mla_ref.attention import GroupedQueryAttention
from mla_ref.cache import KVCache, LatentCache
from mla_ref.mla import ATTENTION_PATHS, MultiHeadLatentAttention
from mla_ref.norm import RMSNorm
from mla_ref.rope import ROPE_LAYOUTS, frequency_table

ATTENTION_TYPES: tuple[str, ...] = ("mha", "gqa", "mqa", "mla")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; round-trips through JSON (to_dict / from_dict)."""

    vocab_size: int = 256  # byte-level: one token per byte
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks L
    n_heads: int = 8  # query heads n_h
    head_dim: int = 32  # d_h of the GQA family, explicit (never a rounded division)
    mlp_hidden: int = 672  # SwiGLU inner width (~2.67 · d_model, a multiple of 32)
    attention: str = "mha"  # "mha", "gqa", "mqa" or "mla"
    n_kv_heads: int | None = None  # KV heads n_kv: required for "gqa"; n_h for "mha", 1 for "mqa"
    rope_theta: float = 10000.0  # RoPE base θ
    rope_layout: str = "rotate_half"  # "rotate_half" (Llama) or "interleaved" (DeepSeek)
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    # biases on q/k/v (GQA family; Qwen2 has them), or on q_proj / q_a_proj, kv_a_proj_with_mqa and o_proj
    # (MLA: DeepSeek-V3's attention_bias, and what a conversion of a biased source needs)
    attention_bias: bool = False
    # Per layer, a table of the rotary frequencies (head_dim/2 of them for the GQA family, qk_rope_head_dim/2
    # for MLA) replacing θ^(-2j/d): scaled RoPE, or a converted layer whose key pairs keep their source
    # frequencies. None: the default table in every layer.
    rope_frequencies: list[list[float]] | None = None
    # MLA only (ignored by the GQA family):
    kv_lora_rank: int = 64  # d_c, the cached latent
    qk_nope_head_dim: int = 32  # d_N, position-free part of each query/key head
    qk_rope_head_dim: int = 16  # d_R, the shared roped key
    v_head_dim: int = 32  # d_v
    q_lora_rank: int | None = None  # low-rank query bottleneck, or None for a full q_proj
    latent_norm: bool = True  # RMS-normalise the latent c

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "mlp_hidden"):
            require_positive_int(name, getattr(self, name))
        require_choice("attention", self.attention, ATTENTION_TYPES)
        require_choice("rope_layout", self.rope_layout, ROPE_LAYOUTS)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        expected_kv = {"mha": self.n_heads, "mqa": 1}.get(self.attention)
        if self.attention == "gqa":
            require_positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        elif self.attention == "mla":
            if self.n_kv_heads is not None:
                raise ValueError(f"n_kv_heads must be None for attention 'mla', got {self.n_kv_heads!r}")
        elif self.n_kv_heads not in (None, expected_kv):
            raise ValueError(
                f"n_kv_heads for attention {self.attention!r} must be None or {expected_kv}, got {self.n_kv_heads!r}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_frequencies is not None:
            if len(self.rope_frequencies) != self.n_layers:
                raise ValueError(
                    f"rope_frequencies must hold one table per layer ({self.n_layers}), got {len(self.rope_frequencies)}"
                )
            rotary_dim = self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
            for layer, table in enumerate(self.rope_frequencies):
                frequency_table(table, rotary_dim, name=f"rope_frequencies[{layer}]")

    @property
    def kv_heads(self) -> int | None:
        """n_kv for the GQA family (None for MLA, which has a latent instead)."""
        return {"mha": self.n_heads, "mqa": 1, "gqa": self.n_kv_heads}.get(self.attention)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from ``to_dict()`` output; unknown keys or bad values raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"a model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def build_attention(config: ModelConfig, layer: int = 0) -> nn.Module:
    """The attention module of the configured type for layer ``layer``."""
    c = config
    frequencies = None if c.rope_frequencies is None else c.rope_frequencies[layer]
    if c.attention == "mla":
        return MultiHeadLatentAttention(
            c.d_model,
            c.n_heads,
            c.kv_lora_rank,
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
            q_lora_rank=c.q_lora_rank,
            latent_norm=c.latent_norm,
            bias=c.attention_bias,
            rope_theta=c.rope_theta,
            rope_layout=c.rope_layout,
            rope_frequencies=frequencies,
            norm_eps=c.norm_eps,
        )
    return GroupedQueryAttention(
        c.d_model,
        c.n_heads,
        c.kv_heads,
        c.head_dim,
        rope_theta=c.rope_theta,
        rope_layout=c.rope_layout,
        rope_frequencies=frequencies,
        qkv_bias=c.attention_bias,
    )


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)).  Shapes: (b, s, d) -> (b, s, d)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (b, s, d)


class Block(nn.Module):
    """Pre-norm residual block: attention then SwiGLU.  Shapes: (b, s, d) -> (b, s, d)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.self_attn = build_attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(self, x: torch.Tensor, cache=None, path: str = "naive") -> torch.Tensor:
        h = self.input_layernorm(x)  # (b, s, d)
        if isinstance(self.self_attn, MultiHeadLatentAttention):  # decided per call: layers can be swapped
            h = self.self_attn(h, cache, path=path)  # (b, s, d)
        else:
            h = self.self_attn(h, cache)  # (b, s, d)
        x = x + h  # (b, s, d)
        return x + self.mlp(self.post_attention_layernorm(x))  # (b, s, d)


class TinyLM(nn.Module):
    """The decoder.  forward: tokens (b, s) int64 -> logits (b, s, vocab_size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: the projections that write into the residual stream shrink with depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameters counted once (a tied head is not counted twice)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        tokens: torch.Tensor,
        caches: list | None = None,
        *,
        path: str = "naive",
        hidden_states: list | None = None,
    ) -> torch.Tensor:
        """Logits for every position.  tokens (b, s) -> (b, s, vocab_size).

        With ``caches`` (one per layer, from ``new_caches()``), the tokens continue the cached
        sequence; ``path`` ("naive" / "absorbed") is forwarded to MLA layers only.  A list passed as
        ``hidden_states`` receives each block's output, (b, s, d) per block (what distillation can match).
        """
        require_choice("path", path, ATTENTION_PATHS)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (b, s), got {tuple(tokens.shape)}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches must hold one cache per layer ({len(self.layers)}), got {len(caches)}")
        x = self.embed_tokens(tokens)  # (b, s, d)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i], path=path)  # (b, s, d)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.lm_head(self.norm(x))  # (b, s, vocab)

    @torch.no_grad()
    def attention_inputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The hidden states entering each layer's attention (after its input RMSNorm): what a
        conversion calibrates on.  tokens (b, s) -> one (b, s, d) tensor per layer."""
        inputs = []
        x = self.embed_tokens(tokens)  # (b, s, d)
        for layer in self.layers:
            inputs.append(layer.input_layernorm(x))
            x = layer(x)  # (b, s, d)
        return inputs

    def new_caches(self, capacity: int | None = None) -> list[KVCache | LatentCache]:
        """One empty cache per layer, from each attention module's ``new_cache()``."""
        return [layer.self_attn.new_cache(capacity=capacity) for layer in self.layers]

    def kv_cache_elements_per_token(self) -> int:
        """Σ over layers of each attention module's cached elements per token."""
        return sum(layer.self_attn.cache_elements_per_token() for layer in self.layers)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Cache bytes one token costs across all layers, at ``dtype``."""
        return self.kv_cache_elements_per_token() * dtype.itemsize

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        path: str = "naive",
    ) -> torch.Tensor:
        """Prefill the prompt through the caches, then decode one token at a time.

        Shapes: prompt (b, s) -> (b, s + max_new_tokens).  temperature 0 is greedy;
        otherwise sample from softmax(logits / temperature), restricted to the top_k if given.
        """
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError(f"prompt must have shape (b, s) with s ≥ 1, got {tuple(prompt.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0 (0 = greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be None or in [1, {self.config.vocab_size}], got {top_k}")
        caches = self.new_caches(capacity=prompt.shape[1] + max_new_tokens)
        tokens = prompt
        logits = self(prompt, caches, path=path)[:, -1]  # (b, vocab): prefill
        for step in range(max_new_tokens):
            next_token = self._pick(logits, temperature, top_k, generator)  # (b, 1)
            tokens = torch.cat([tokens, next_token], dim=1)  # (b, s + step + 1)
            if step + 1 < max_new_tokens:
                logits = self(next_token, caches, path=path)[:, -1]  # (b, vocab): decode
        return tokens

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        """(b, vocab) -> (b, 1) next tokens."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (b, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (b, vocab)
        return torch.multinomial(probs, 1, generator=generator)  # (b, 1)

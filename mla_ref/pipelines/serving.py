"""Whether a DeepSeek-V3 checkpoint fits the MLA kernels of the serving engines (vLLM, SGLang).

Those kernels accept only some shapes: a latent of kv_lora_rank + qk_rope_head_dim = 512 + 64 = 576 elements
(some builds also 320), no attention biases, the latent RMSNorm (stock DeepSeek-V3 always has it) and
interleaved RoPE.  A checkpoint outside them is still a correct DeepSeek-V3 checkpoint for ``transformers``;
``serving_verdict`` says which constraint it misses.  ``--profile engine`` asks ``convert`` for the 512 + 64
latent (``mla_ref.convert.methods.base.engine_sizes``), which only makes sense for a source whose cache is larger than 576
elements per token and layer.
"""

from __future__ import annotations

from mla_ref.convert.methods.base import ENGINE_LATENT, ENGINE_ROPE
from mla_ref.model import ModelConfig

ENGINE_SMALL_LATENT = 320  # accepted by some engine builds only


def serving_verdict(config: ModelConfig) -> tuple[bool, list[str]]:
    """(servable, reasons): whether the engines' MLA kernels take a DeepSeek-V3 model of ``config``, and why not."""
    reasons = []
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    if (config.kv_lora_rank, config.qk_rope_head_dim) != (ENGINE_LATENT, ENGINE_ROPE):
        also = " (some builds accept 320)" if latent == ENGINE_SMALL_LATENT else ""
        reasons.append(
            f"latent {config.kv_lora_rank} + {config.qk_rope_head_dim} = {latent}; the kernels take "
            f"{ENGINE_LATENT} + {ENGINE_ROPE}{also}"
        )
    if config.attention_bias:
        reasons.append("attention biases (the anchored latent norm or q/k/v biases); the kernels take none")
    if config.rope_layout != "interleaved":
        reasons.append(f"RoPE layout {config.rope_layout!r}; the kernels take interleaved")
    return not reasons, reasons

"""Real checkpoints in and out: Llama / Qwen2 / Mistral in, stock DeepSeek-V3 MLA out.

- ``files``: config.json, safetensors shards read one tensor at a time, tokenizer files, atomic writes.
- ``build``: a TinyLM or one block assembled from tensors without initialising (or copying) weights.
- ``llama``: the Llama layout (llama / qwen2 / mistral) <-> TinyLM, with Llama 3's scaled RoPE table.
- ``deepseek``: the DeepSeek-V3 layout <-> an MLA TinyLM, all layers dense.
- ``sources``: what a conversion reads (a Llama-layout directory or an mla_ref checkpoint).
- ``layers``: one GQA-family layer to MLA by any conversion method, q/k/v biases included.
- ``stock``: carrying a converted MLA layer into what stock DeepSeek-V3 computes (RoPE θ', latent RMSNorm).
- ``report``: the converted models' logits against the source's, and CONVERSION.md.
- ``convert``: a whole directory, layer by layer, with that report.
- ``serving``: whether a DeepSeek-V3 output fits the serving engines' MLA kernels; ``--profile engine``.
- ``models``: ``load_model`` for any directory mla_ref reads, ``export_model`` to a Hugging Face layout.
- ``recover``: a converted directory trained back towards its source (``recover_checkpoint``), written as it came;
  ``recovery_record``: its RECOVERY.md.

Reading and writing need only ``safetensors`` (and ``tokenizers`` for a ``tokenizer.json``); transformers is
needed only to check the results.
"""

from mla_ref.hf.convert import ConversionReport, ConvertOptions, convert_checkpoint
from mla_ref.hf.deepseek import load_deepseek
from mla_ref.hf.files import CalibrationText, text_tokens
from mla_ref.hf.llama import LlamaCheckpoint, llama3_frequencies, load_llama, model_config_from_hf
from mla_ref.hf.models import export_model, load_model
from mla_ref.hf.recover import RecoverOptions, recover_checkpoint
from mla_ref.hf.stock import fit_norm, fit_rope_theta, stock_mla

__all__ = [
    "CalibrationText",
    "ConversionReport",
    "ConvertOptions",
    "LlamaCheckpoint",
    "RecoverOptions",
    "convert_checkpoint",
    "export_model",
    "fit_norm",
    "fit_rope_theta",
    "llama3_frequencies",
    "load_deepseek",
    "load_llama",
    "load_model",
    "model_config_from_hf",
    "recover_checkpoint",
    "stock_mla",
    "text_tokens",
]

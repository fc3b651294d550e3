"""File formats only: Llama / Qwen2 / Mistral / GGUF in, DeepSeek-V3 and Llama out, read and written as safetensors.

- ``files``: config.json, safetensors shards read one tensor at a time (refusing NaN, infinite and integer
  weights), text to tokens by a directory's tokenizer, the tokenizer files a conversion carries along.
- ``build``: a TinyLM or one block assembled from tensors without initialising (or copying) weights.
- ``llama``: the Llama layout (llama / qwen2 / mistral) <-> TinyLM, with Llama 3's scaled RoPE table.
- ``deepseek``: the DeepSeek-V3 layout <-> an MLA TinyLM, all layers dense.
- ``gguf``: a GGUF file dequantized into a Llama directory.
- ``sources``: what a conversion reads (a Llama-layout directory or an mla_ref checkpoint).
- ``models``: ``load_model`` for any directory mla_ref reads, ``export_model`` to a Hugging Face layout.

This package sits below training and conversion and imports neither: the whole-checkpoint jobs that use it live in
``mla_ref.pipelines``.  Reading and writing need only ``safetensors`` (and ``tokenizers`` for a ``tokenizer.json``);
transformers is needed only to check the results.
"""

from mla_ref.hf.deepseek import load_deepseek
from mla_ref.hf.files import text_tokens
from mla_ref.hf.llama import LlamaCheckpoint, llama3_frequencies, load_llama, model_config_from_hf
from mla_ref.hf.models import export_model, load_model

__all__ = [
    "LlamaCheckpoint",
    "export_model",
    "llama3_frequencies",
    "load_deepseek",
    "load_llama",
    "load_model",
    "model_config_from_hf",
    "text_tokens",
]

"""How much calibration text the recipe needs on a real model, and whether spreading it over the corpus helps.

    python -m mla_ref fetch smollm2-135m     # once
    python benchmarks/calibration_amount.py  # about 20 CPU-minutes on two threads

SmolLM2-135M converted at 25% of its cache by the registry's recipe with d_R = 32, d_c = 64 (mla-ref form, every
layer converted on the source's own hidden states by ``mla_ref.convert.model.convert_model``), calibrated on:

- the first 4,096 tokens of the standard library's train split (the converter's default before it spread them),
- the first 16,384 tokens,
- 16,384 and 32,768 tokens, one window of 256 from each of as many evenly spaced stretches (the converter's default
  is 16,384 of them),
- 16,384 spread tokens without the output refit (BKV-PCA with the score metric alone), to see what the tokens buy.

The train split here leaves out ``pydoc_data/topics.py``, the prose text (``held_out.py``).  Measured: perplexity as
a ratio to the source's on the first 4,096 tokens of the validation split (code) and of ``pydoc_data.topics``
(prose).  Prints one JSON line per calibration.
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SEQ_LEN = 256


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    logits = model(windows[:, :-1])
    return math.exp(F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten()).item())


def main() -> int:
    from held_out import prose_text, train_without_prose

    from mla_ref.convert import get_method
    from mla_ref.convert.methods.transmla import transmla_convert
    from mla_ref.convert.model import convert_model
    from mla_ref.data import load_corpus, validation_windows
    from mla_ref.hf import load_model, text_tokens
    from mla_ref.pipelines.calibration import calibration_windows, first_windows
    from mla_ref.pipelines.fetch import fetched_model_dir

    torch.set_num_threads(2)
    try:
        source_dir = fetched_model_dir("smollm2-135m", None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    source = load_model(source_dir).eval()
    vocab = source.config.vocab_size
    corpus = load_corpus()
    try:
        train = train_without_prose(corpus)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    texts = {
        "code": first_windows(source_dir, corpus.val, vocab, 4096, SEQ_LEN),
        "prose": validation_windows(text_tokens(source_dir, prose_text().encode(), vocab), SEQ_LEN, 4096),
    }
    source_ppl = {name: perplexity(source, w) for name, w in texts.items()}
    recipe = get_method("recipe")
    sizes = {"kv_lora_rank": 64, "rope_dim": 32}
    spread, _ = calibration_windows(source_dir, train, vocab, 16384, SEQ_LEN)
    runs = [
        ("first 4,096", first_windows(source_dir, train, vocab, 4096, SEQ_LEN), True),
        ("first 16,384", first_windows(source_dir, train, vocab, 16384, SEQ_LEN), True),
        ("16,384 spread", spread, True),  # the converter's own windows
        ("32,768 spread", calibration_windows(source_dir, train, vocab, 32768, SEQ_LEN)[0], True),
        ("16,384 spread, no refit", spread, False),
    ]
    for name, windows, refit in runs:
        begin = time.perf_counter()

        def convert_layer(attention, inputs, refit=refit):
            if refit:
                return recipe.convert(attention, inputs, sizes)
            return transmla_convert(attention, inputs, **sizes, rope_budget="uniform", metric="score")

        model = convert_model(source, convert_layer, windows[:, :-1]).eval()
        row = {"calibration": name, "tokens": windows[:, :-1].numel()}
        row |= {name: round(perplexity(model, w) / source_ppl[name], 3) for name, w in texts.items()}
        row["seconds"] = round(time.perf_counter() - begin)
        print(json.dumps(row), flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

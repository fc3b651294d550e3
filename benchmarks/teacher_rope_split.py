"""How the tiny teachers split a cache budget between d_R and d_c: the recipe's rule against a third of the budget.

    python benchmarks/teacher_rope_split.py        # about 2 CPU-minutes

SmolLM2-135M converts best at 25% of its cache with d_R = B/3 = 32, not the recipe's rule d_R = min(B/2, d_h) = 48
(``rope_split.py``).  This asks the same of the shipped teachers: each is converted by the registry's recipe
(``mla_ref.convert.model.convert_model``, mla-ref form) at 50% and 25% of its cache with both splits, calibrated on
16 random windows of 256 bytes of the train split (seed 0), and its perplexity is measured on the first 16,384 bytes
of the validation split, as a ratio to the teacher's own; beside it what the converter chooses the split by
(``mla_ref.convert.split_choice``): the whole model's KL to the teacher on the calibration windows, and the mean over
layers of each converted layer's relative output error E_l there.  Prints one line per conversion.
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from mla_ref import checkpoint
    from mla_ref.convert import get_method
    from mla_ref.convert.model import convert_model
    from mla_ref.convert.refit import output_error
    from mla_ref.convert.split_choice import kl_to_source
    from mla_ref.data import load_corpus, random_batch, validation_windows
    from mla_ref.train import TEACHERS_DIR, evaluate

    torch.set_num_threads(1)
    corpus = load_corpus()
    recipe = get_method("recipe")
    windows = validation_windows(corpus.val, 256, 16384)
    calibration, _ = random_batch(corpus.train, 16, 256, torch.Generator().manual_seed(0))
    for name in ("gqa", "mha"):
        teacher = checkpoint.load(TEACHERS_DIR / name).float().eval()
        teacher_ppl = evaluate(teacher, windows).perplexity
        cache = 2 * teacher.config.kv_heads * teacher.config.head_dim
        for budget in (0.5, 0.25):
            elements = round(budget * cache)
            rule = recipe.sizes(teacher.layers[0].self_attn, budget=budget)["rope_dim"]
            third = min(elements // 3 // 2 * 2, teacher.config.head_dim)
            for label, rope_dim in (("rule", rule), ("B/3", third)):
                errors = []

                def convert_layer(attention, inputs, rope_dim=rope_dim, budget=budget, errors=errors):
                    layer = recipe.convert(attention, inputs, recipe.sizes(attention, budget=budget, rope_dim=rope_dim))
                    errors.append(output_error(layer, inputs, attention(inputs)))
                    return layer

                model = convert_model(teacher, convert_layer, calibration)
                ratio = evaluate(model, windows).perplexity / teacher_ppl
                with torch.no_grad():
                    kl = kl_to_source(teacher(calibration), model(calibration))
                print(
                    f"{name} teacher, {budget:.0%} ({elements} elements): d_R {rope_dim:3d} ({label:4s}) {ratio:.3f}×"
                    f"   calibration KL {kl:.4f}   mean E_l {sum(errors) / len(errors):.4f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

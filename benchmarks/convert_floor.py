"""What the recipe's own choices cost at the least: the floor under ``convert``'s wall time on SmolLM2-135M.

    python benchmarks/convert_floor.py                      # 25% of the cache, layers 0, 15 and 29
    python benchmarks/convert_floor.py --budget 0.5 --layers 0,10,20,29

The default method measures its choices rather than guessing them.  In every layer it converts the attention at
each candidate split (two at 25% and 12.5%, one at 50%) and, at each split, with each of the key weights
(``RECIPE_KEY_WEIGHTS``: three), and it keeps the key weight whose refit output is closest to the source layer's.
Each of those candidates needs, over every calibration token (16,384 by default):

    z = the converted layer's heads' outputs        one forward of the MLA layer up to o_proj
    ZᵀZ, ZᵀY in float64                             the refit's normal equations (``convert.refit``)

and the layer needs the source block's forward over the calibration and evaluation tokens, to hand the next layer
its inputs.  None of it can be skipped without changing what is chosen: the refit error that picks the key weight is
a sum over every calibration token (computed on every fourth window only, the choice of key weight changed in 5 of
the 60 layer-and-split choices of SmolLM2 at 25%).  This script times exactly those steps — the recipe's own
``refit_in_place`` on its own candidates, and the source block — on a few real layers, and multiplies them out to
the whole model: a floor, since the rest of a conversion (the principal components, the split's whole-model KL, the
written form's check, the quality report, reading and writing) comes on top.

It prints, per layer measured, the seconds per candidate (forward and normal equations apart) and per source block,
then the floor for all layers beside ``convert``'s measured wall time when one is given (``--measured``).
Threads: torch's default (this machine's cores), as ``convert`` uses them for these steps.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from mla_ref.convert import get_method
from mla_ref.convert.methods.recipe import RECIPE_KEY_WEIGHTS, key_weight_candidates, recipe_shared
from mla_ref.convert.refit import refit_in_place
from mla_ref.convert.rorope import rorope_parts
from mla_ref.data import load_corpus
from mla_ref.hf import load_model
from mla_ref.pipelines.calibration import calibration_windows, first_windows
from mla_ref.pipelines.fetch import default_fetch_problem, default_model_dir
from mla_ref.profile import time_call


@torch.no_grad()
def candidates(layer, inputs: torch.Tensor, budget: float) -> list[tuple[dict, float, nn.Module, torch.Tensor]]:
    """Every (split, key weight) candidate the recipe builds for ``layer`` before its refit, with the target."""
    moment, basis, target = recipe_shared(layer, inputs)
    built = []
    for sizes in get_method("recipe").candidate_sizes(layer, budget=budget, reserve=1):
        rope_dim, kv_lora_rank = sizes["rope_dim"], sizes["kv_lora_rank"]
        rotated = rorope_parts(layer, inputs, rope_dim=rope_dim, rope_budget="uniform", basis=basis)
        for key_weight, module in key_weight_candidates(
            layer, rotated, inputs, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim, key_weights=RECIPE_KEY_WEIGHTS,
            x_moment=moment,
        ):  # fmt: skip
            built.append((sizes, key_weight, module, target))
    return built


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.25, help="cache fraction (default 0.25)")
    parser.add_argument("--layers", default="0,15,29", help="layers to time, comma-separated (default 0,15,29)")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="convert's default: 16384")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="convert's default: 4096")
    parser.add_argument("--seq-len", type=int, default=256, help="convert's default: 256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measured", type=float, default=None, help="convert's wall seconds, to print beside")
    args = parser.parse_args()

    problem = default_fetch_problem("smollm2-135m")
    if problem is not None:
        raise SystemExit(f"{problem}: run `make models` (or `python -m mla_ref fetch smollm2-135m`) first")
    model_dir = default_model_dir("smollm2-135m")
    source = load_model(model_dir).requires_grad_(False)
    config = source.config
    layers = [int(i) for i in args.layers.split(",")]
    if not all(0 <= i < config.n_layers for i in layers):
        raise SystemExit(f"--layers must name layers 0 … {config.n_layers - 1}, got {args.layers}")

    corpus = load_corpus()  # the texts convert reads by default: its calibration windows, its evaluation windows
    windows, _spread = calibration_windows(model_dir, corpus.train, config.vocab_size, args.calib_tokens, args.seq_len)
    evaluation = first_windows(model_dir, corpus.val, config.vocab_size, args.eval_tokens, args.seq_len)
    calibration = windows[:, :-1]  # (n, s) token ids
    every_token = torch.cat([calibration, evaluation[:, :-1]])  # (n + n_eval, s): what each source block runs on
    print(
        f"SmolLM2-135M, budget {args.budget:.1%}: {len(calibration)} windows of {args.seq_len} calibration tokens "
        f"({calibration.numel():,}), {every_token.numel():,} through each block; torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats}"
    )
    timing = dict(warmup=1, repeats=args.repeats)  # median seconds after one untimed run
    hidden = source.embed_tokens(every_token)  # (n + n_eval, s, d)
    per_layer = []
    for i, layer in enumerate(source.layers):
        if i > max(layers):
            break
        if i in layers:
            inputs = layer.input_layernorm(hidden[: len(calibration)])  # (n, s, d): what the attention reads
            built = candidates(layer.self_attn, inputs, args.budget)
            forward = refit = 0.0
            for _sizes, _key_weight, module, target in built:
                o_proj, module.o_proj = module.o_proj, nn.Identity()
                forward += time_call(lambda m=module, x=inputs: m(x), **timing)  # z, o_proj's input
                module.o_proj = o_proj
                refit += time_call(lambda m=module, x=inputs, t=target: refit_in_place(m, x, t, 1e-4), **timing)
            block = time_call(lambda la=layer, h=hidden: la(h), **timing)
            per_layer.append((len(built), forward, refit, block))
            print(
                f"layer {i:2d}: {len(built)} candidates, forward {forward / len(built):.3f} s and forward + normal "
                f"equations + solve {refit / len(built):.3f} s each; source block {block:.3f} s; "
                f"floor for the layer {refit + block:.2f} s"
            )
        hidden = layer(hidden)
    floor = config.n_layers * statistics.mean(refit + block for _n, _f, refit, block in per_layer)
    line = f"floor for {config.n_layers} layers: {floor:.0f} s"
    if args.measured:
        line += f"; convert measured {args.measured:.0f} s ({floor / args.measured:.0%} of it is the floor)"
    print(line)


if __name__ == "__main__":
    main()

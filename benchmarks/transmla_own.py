"""TransMLA's own converter on SmolLM2-135M, measured on the texts ``benchmarks/real_model.py`` measures mla_ref on.

    python -m mla_ref fetch smollm2-135m                                  # once
    python benchmarks/transmla_own.py --transmla PATH/TO/TransMLA/transmla

TransMLA (github.com/fxmeng/TransMLA) is no dependency of mla_ref and none of its code is here: ``--transmla`` names
the folder of its converter in a checkout of your own (the folder holding ``partial_rope.py``, ``lora_qkv.py`` and
``utils.py``).  This script is only the harness around it, doing what TransMLA's ``converter.py`` does
(``partial_rope`` then ``low_rank_qkv`` on the loaded model, in fp32 on the CPU) with mla_ref's data in place of
its hub datasets:

- calibration: the windows ``python -m mla_ref convert`` calibrates on by default (``--calib-tokens`` tokens of the
  standard library's train split less the prose file, one window of 256 per evenly spaced stretch;
  ``held_out.calibration_folder``), in batches of 8, as TransMLA's loader gives them;
- its freqfold search (``--freqfold auto``): TransMLA doubles freqfold from ``collapse`` while the partial-RoPE
  model's perplexity on its test text falls; here that text is the first 16 calibration windows, so no held-out
  text steers it (the search is run by this harness, calling TransMLA's ``partial_rope`` once per freqfold and its
  ``evaluate_ppl``, since the published snapshot's search reports a perplexity of 1 for every freqfold);
- the rotary width: TransMLA takes ``--qk-mqa-dim`` (d_R, default 64) and ``--kv-lora-rank`` (d_c) from its user;
  for each budget B (cache elements per token and layer) this tries each d_R of ``--rope-dims`` (64, 32, 16, 8)
  below B, with d_c = B - d_R, and reports every one;
- measured: TransMLA's converted model as its own modules compute it (no latent norm unless ``--use-qkv-norm``,
  which sets TransMLA's constant RMSNorm gain; a stock DeepSeek-V3 checkpoint always normalizes its latent), by
  ``real_model.py``'s functions on the same held-out code and prose, against the source loaded by stock
  ``transformers``.

Two adapters keep TransMLA's code as it is: its attention modules' ``forward`` is wrapped to drop the keyword
arguments that newer ``transformers`` passes and it does not take (``cache``, ...), and where the ``datasets``
package is absent an empty stand-in is registered under that name (its ``utils.py`` imports it to load hub data
sets, which this harness does not call).  Greedy samples are decoded without a cache (TransMLA's modules keep none
in this ``transformers``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import resource
import sys
import tempfile
import time
import types
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "def fibonacci(n):"
SOURCE_ELEMENTS = 384  # SmolLM2-135M: 2 · 3 KV heads · 64
SEARCH_WINDOWS = 16  # calibration windows the freqfold search measures on


@dataclass
class Row:
    budget: float
    rope_dim: int  # TransMLA's qk_mqa_dim: d_R
    kv_lora_rank: int  # d_c
    collapse: int
    freqfold: int
    search: dict[int, float] = field(default_factory=dict)  # freqfold -> partial-RoPE perplexity on the search text
    perplexity: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    sample: str = ""


def import_transmla(folder: Path) -> dict[str, types.ModuleType]:
    """TransMLA's ``partial_rope``, ``lora_qkv`` and ``utils`` modules from ``folder``; ValueError if it lacks them."""
    missing = [name for name in ("partial_rope.py", "lora_qkv.py", "utils.py") if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"--transmla {str(folder)!r} lacks {', '.join(missing)}: give the folder of TransMLA's converter"
        )
    if importlib.util.find_spec("datasets") is None:  # imported by its utils.py for hub data sets, used only in types
        stand_in = types.ModuleType("datasets")
        stand_in.Dataset = stand_in.DatasetDict = object
        sys.modules["datasets"] = stand_in
    sys.path.insert(0, str(folder))  # its modules import each other by bare name (``from utils import ...``)
    modules = {name: importlib.import_module(name) for name in ("utils", "partial_rope", "lora_qkv")}
    for module, attention in ((modules["partial_rope"], "PartialRope"), (modules["lora_qkv"], "LoraQKV")):
        cls = getattr(module, attention)
        cls.forward = taking_only_its_arguments(cls.forward)
    return modules


def taking_only_its_arguments(forward):
    """``forward`` called with only the keyword arguments its signature names: newer ``transformers`` decoder layers
    pass ones that TransMLA's attention modules do not take."""
    names = set(inspect.signature(forward).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values()):
        return forward

    @functools.wraps(forward)
    def adapted(self, *args, **kwargs):
        return forward(self, *args, **{k: v for k, v in kwargs.items() if k in names})

    return adapted


def batches(windows: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    """TransMLA's loader's batches: input ids and an all-ones attention mask, ``size`` windows each."""
    return [
        {"input_ids": windows[i : i + size], "attention_mask": torch.ones_like(windows[i : i + size])}
        for i in range(0, len(windows), size)
    ]


@torch.no_grad()
def greedy_without_cache(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    n_prompt = ids.shape[1]
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)


def convert(transmla, source, tokenizer, train, search, rope_dim, kv_lora_rank, args) -> tuple:
    """TransMLA's two steps on a copy of ``source``: (model, freqfold, {freqfold: perplexity searched})."""
    collapse = source.config.head_dim // rope_dim
    options = {
        "collapse": collapse,
        "qk_mqa_dim": rope_dim,
        "kv_lora_rank": kv_lora_rank,
        "q_lora_rank": None,
        "balance_kv_ratio": 1.0,  # TransMLA's default
        "use_qkv_norm": args.use_qkv_norm,
    }
    searched = {}
    if args.freqfold == "auto":  # TransMLA's search: double while the partial-RoPE model's perplexity falls
        freqfold = collapse
        while freqfold <= source.config.head_dim // 2:
            partial = transmla["partial_rope"].partial_rope(
                deepcopy(source), tokenizer, train, None, freqfold=freqfold, **options
            )
            searched[freqfold] = transmla["utils"].evaluate_ppl(partial, tokenizer.pad_token_id, search)
            print(f"  d_R {rope_dim}: freqfold {freqfold} → perplexity {searched[freqfold]:.3f}", flush=True)
            if len(searched) > 1 and searched[freqfold] >= searched[freqfold // 2]:
                break
            freqfold *= 2
        freqfold = min(searched, key=searched.get)
    else:
        freqfold = int(args.freqfold)
    model = transmla["partial_rope"].partial_rope(
        deepcopy(source), tokenizer, train, None, freqfold=freqfold, **options
    )
    model = transmla["lora_qkv"].low_rank_qkv(model, tokenizer, train, None, **options)
    return model.eval(), freqfold, searched


def markdown(rows: list[Row], source: dict, texts: dict[str, str], args) -> str:
    command = (
        f"python benchmarks/transmla_own.py --transmla TRANSMLA --budgets {args.budgets} --rope-dims {args.rope_dims}"
    )
    command += f" --calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens}"
    command += (" --use-qkv-norm" if args.use_qkv_norm else "") + (
        "" if args.freqfold == "auto" else f" --freqfold {args.freqfold}"
    )
    command += "" if Path(args.out) == RESULTS / "transmla_own.md" else f" --out {args.out}"
    lines = [
        "# TransMLA's own converter on SmolLM2-135M",
        "",
        f"Reproduce: `{command}` ({args.threads} CPU thread{'' if args.threads == 1 else 's'}, torch "
        f"{torch.__version__}); TRANSMLA = the `transmla` folder of a checkout of github.com/fxmeng/TransMLA"
        + (f" (here: {args.transmla_version})" if args.transmla_version else "")
        + ".",
        "",
        f"Calibration: the {args.calib_tokens:,} tokens `python -m mla_ref convert` calibrates on by default (one window "
        "of 256 from each of as many evenly spaced stretches of the standard library's train split less "
        "`pydoc_data/topics.py`), in batches of 8. freqfold: "
        + (
            f"TransMLA's search (doubling from `collapse` while the partial-RoPE model's perplexity on the first "
            f"{SEARCH_WINDOWS} calibration windows falls)."
            if args.freqfold == "auto"
            else f"{args.freqfold}, given."
        ),
        "",
        "Texts (the ones `benchmarks/real_model.py` measures on; none of them calibration text):",
        "",
    ]
    lines += [f"- {name}: {description}" for name, description in texts.items()]
    lines += [
        "",
        "Measured: TransMLA's converted model as its own modules compute it"
        + (
            ", with its constant latent RMSNorm gain (`--use-qkv-norm`)."
            if args.use_qkv_norm
            else " (no latent norm: not the stock DeepSeek-V3 form, which always normalizes the latent)."
        )
        + " Convert s: its two steps and the freqfold search, wall time in this process.",
        "",
        "| cache | d_R + d_c | collapse | freqfold (searched: perplexity) | code ppl | × source | KL code "
        "| prose ppl | × source | KL prose | convert s |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| 100% | source | | | {source['code']:.3f} | 1.00× | 0 | {source['prose']:.3f} | 1.00× | 0 | |",
    ]
    for row in rows:
        searched = ", ".join(f"{f}: {p:.2f}" for f, p in row.search.items())
        cells = [f"{row.budget:.1%}", f"{row.rope_dim} + {row.kv_lora_rank}", str(row.collapse)]
        cells.append(f"**{row.freqfold}**" + (f" ({searched})" if searched else ""))
        for text in ("code", "prose"):
            ppl = row.perplexity[text]
            cells += [f"{ppl:.3f}", f"{ppl / source[text]:.2f}×", f"{row.kl[text]:.3f}"]
        cells.append(f"{row.seconds:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Peak resident memory of the whole run: {args.peak_mib:,.0f} MiB.", ""]
    lines += ["## Greedy samples", "", f"Prompt `{PROMPT}`:", "", "| model | continuation |", "|---|---|"]
    lines.append(f"| source | `{source['sample']!r}` |")
    lines += [f"| {r.budget:.1%}, d_R {r.rope_dim} + d_c {r.kv_lora_rank} | `{r.sample!r}` |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mla_ref.data import load_corpus
    from mla_ref.pipelines import ConvertOptions
    from mla_ref.pipelines.calibration import calibration_windows
    from mla_ref.pipelines.fetch import fetched_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transmla", required=True, help="the folder of TransMLA's converter (partial_rope.py, ...)")
    parser.add_argument("--transmla-version", default="", help="which commit of TransMLA, for the results file")
    parser.add_argument("--model", default=None, help="SmolLM2 directory (default: where `fetch` puts it)")
    parser.add_argument("--budgets", default="0.5,0.25,0.125")
    parser.add_argument("--rope-dims", default="64,32,16,8", help="TransMLA's qk_mqa_dim values to try at each budget")
    parser.add_argument("--freqfold", default="auto", help="auto (TransMLA's search) or a number")
    parser.add_argument("--use-qkv-norm", action="store_true", help="TransMLA's constant latent RMSNorm gain")
    parser.add_argument("--calib-tokens", type=int, default=None, help="default: the converter's own")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "transmla_own.md"))
    args = parser.parse_args(argv)
    args.calib_tokens = args.calib_tokens or ConvertOptions.calib_tokens
    torch.set_num_threads(args.threads)
    try:
        source_dir = fetched_model_dir("smollm2-135m", args.model)
        transmla = import_transmla(Path(args.transmla).resolve())
        budgets = [float(b) for b in args.budgets.split(",")]
        rope_dims = [int(d) for d in args.rope_dims.split(",")]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import transformers
    from held_out import calibration_folder
    from real_model import SEQ_LEN, compare, held_out_texts, log_probs

    corpus = load_corpus()
    texts, windows = held_out_texts(source_dir, corpus, args.eval_tokens)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as TransMLA's loader sets it
    # eager attention, as TransMLA's loader asks for
    source = transformers.AutoModelForCausalLM.from_pretrained(
        source_dir, dtype=torch.float32, attn_implementation="eager"
    )
    source.eval()
    reference = {text: log_probs(source, w) for text, w in windows.items()}
    measured_source = {text: compare(reference[text], reference[text], w)[0] for text, w in windows.items()}
    measured_source["sample"] = greedy_without_cache(source, tokenizer, PROMPT)
    print(f"source: code ppl {measured_source['code']:.3f}, prose ppl {measured_source['prose']:.3f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="transmla_own_") as work:
        calibration_dir = calibration_folder(corpus, Path(work) / "calibration")
        calibration, _ = calibration_windows(
            source_dir, load_corpus(calibration_dir).train, source.config.vocab_size, args.calib_tokens, SEQ_LEN
        )
    calibration = calibration[:, :-1]  # (n, 256): inputs
    train, search = batches(calibration, 8), batches(calibration[:SEARCH_WINDOWS], 4)

    rows = []
    for budget in budgets:
        elements = round(budget * SOURCE_ELEMENTS)
        for rope_dim in rope_dims:
            if rope_dim >= elements or source.config.head_dim % rope_dim:
                continue
            row = Row(budget, rope_dim, elements - rope_dim, source.config.head_dim // rope_dim, 0)
            start = time.perf_counter()
            with torch.no_grad():
                model, row.freqfold, row.search = convert(
                    transmla, source, tokenizer, train, search, rope_dim, row.kv_lora_rank, args
                )
            row.seconds = time.perf_counter() - start
            for text, w in windows.items():
                row.perplexity[text], row.kl[text] = compare(reference[text], log_probs(model, w), w)
            row.sample = greedy_without_cache(model, tokenizer, PROMPT)
            del model
            rows.append(row)
            print(json.dumps(row.__dict__), flush=True)
    args.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    out.write_text(markdown(rows, measured_source, texts, args), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

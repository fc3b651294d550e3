"""The conversion-quality table: what converting the teachers to MLA costs, and what a short fine-tune wins back.

For each teacher (``mla_ref/teachers/mha`` and ``mla_ref/teachers/gqa``) and each conversion method, every attention
layer is converted (``mla_ref.convert.model.convert_model``) and the whole model's validation perplexity is measured
with no training and after the same short fine-tune (``mla_ref.recovery``: distillation from the teacher's
logits and from every block's output, all parameters, batch 4, AdamW, warm-up then cosine).

Rows — the methods:

- exact: ``gqa_to_mla_exact``, MLA at the teacher's own cache with the outputs unchanged (100% only);
- MHA2MLA: partial RoPE with S_high, S_low, S_uniform or S_2-norm, then SVD low rank, split or joint; sized by
  ``mha2mla_ranks`` (half of each layer's budget on the kept rotary pairs, the rest on the latent);
- TransMLA as in the paper: RoRoPE + BKV-PCA (balanced, norm metric, uniform RoPE budget) with d_R = d_h/2 (DeepSeek's
  64 of 128, scaled to these heads; halved when the budget leaves no room for a latent), without FreqFold (F = 1)
  and with it (F ∈ {2, 4});
- mla_ref's recipe (this project's own choice, not a paper's): TransMLA with half the budget on d_R,
  rope_budget="rotation", metric="score", F ∈ {1, 2, 4}, then each layer's o_proj re-solved by least squares
  against the teacher layer's output on the calibration inputs (``recipe_convert``).

Where a row lists several F, the one with the lowest perplexity on a selection slice of the *training* split is
used (never the validation slice the table reports).  Columns: the KV cache per token as a fraction of the
teacher's (every method here sizes to the exact fraction; a cell that cannot shows the fraction it has).

After the tables the script checks the papers' claims on these numbers (S_2-norm is the best partial-RoPE rule;
SVD_joint beats SVD_split; TransMLA's training-free conversion beats MHA2MLA's at equal cache by a wide margin) and
the project's targets (training-free: ≤ 1.35× the teacher's perplexity at 50% of the cache, ≤ 2× at 25%; after a
fine-tune of ≤ 2% of the teacher's pre-training tokens: ≤ 1.03× at 25%, best method).  The converted models are
measured in mla_ref's MLA form (DeepSeek-V3's attention and parameter names; each layer keeps its exact RoPE
frequency table, and the latent is not RMS-normalised).

The project's table (both teachers in parallel, one thread each; the fine-tune spends the 2% ceiling of each
teacher's pre-training tokens; see the README for the time it took):

    .venv/bin/python benchmarks/conversion_quality.py --jobs 2 --threads 1

``--finetune-budget 0.01`` spends half of that (about half the fine-tuning time).  A smoke test in a few
minutes: ``--quick`` (small slices, a 2-step fine-tune).  Output: the Markdown tables on stdout and in ``--out``
(default benchmarks/results/conversion_quality.md), and a plot of perplexity against cache fraction beside it
(the same name with ``.png``).
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mla_ref import checkpoint
from mla_ref.convert import get_method, gqa_to_mla_exact, mha2mla_convert, mha2mla_ranks
from mla_ref.convert.model import convert_model, convert_model_by_method
from mla_ref.data import Corpus, load_corpus, random_batch, validation_windows
from mla_ref.model import TinyLM
from mla_ref.recovery import budget_steps, pretraining_tokens, recover, recovery_config
from mla_ref.train import TEACHERS_DIR, TrainConfig, evaluate

TEACHERS: tuple[str, ...] = ("mha", "gqa")
FRACTIONS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)
STRATEGIES: tuple[str, ...] = ("2-norm", "high", "low", "uniform")  # MHA2MLA's four partial-RoPE rules
FINETUNE_GRIDS: tuple[str, ...] = ("policy", "all", "none")
FAMILIES: tuple[str, ...] = ("exact", "MHA2MLA", "TransMLA", "mla_ref")
SEQ_LEN = 128  # bytes per window, as in the teachers' pre-training
MAX_FINETUNE_FRACTION = 0.02  # of the teacher's pre-training tokens
TIE_MARGIN = 0.02  # relative perplexity difference called a tie in the claim checks
LOSSLESS = 1e-3  # a conversion within 0.1% of the teacher's perplexity counts as lossless
WIDE_MARGIN = 1.25  # "by a wide margin": the other method's perplexity at least this many times larger
TARGETS = ((0.5, 1.35, "training-free"), (0.25, 2.0, "training-free"), (0.25, 1.03, "fine-tuned"))


@dataclass
class Lab:
    """What every conversion of one teacher shares."""

    name: str
    teacher: TinyLM
    corpus: Corpus
    calibration: torch.Tensor  # (b, s) training bytes the conversions calibrate on
    selection: torch.Tensor  # (n, s + 1) training windows that choose F where a row lists several
    cache: int  # elements per token per layer of the teacher: 2 n_kv d_h

    @property
    def source(self):
        return self.teacher.layers[0].self_attn  # every layer has the same shape

    def layer_budget(self, fraction: float) -> int:
        return round(fraction * self.cache)


@dataclass
class Method:
    key: str
    family: str
    label: str
    # (lab, fraction) -> (converted model, its settings as text), or None when the method has no such cache size
    build: Callable[[Lab, float], tuple[TinyLM, str] | None]


@dataclass
class Cell:
    method: str
    fraction: float  # the column: the nominal fraction
    actual: float  # the converted model's cache / the teacher's
    settings: str
    before: float  # validation perplexity with no training
    after: float | None = None  # after the fine-tune, where it was run


@dataclass
class TeacherResult:
    name: str
    parameters: int
    pretraining_tokens: int
    teacher_perplexity: float
    finetune_tokens: int
    finetune_steps: int
    cells: list[Cell] = field(default_factory=list)
    wall_seconds: float = 0.0


# ---- the methods -------------------------------------------------------------------------------------------


def _exact(lab: Lab, fraction: float):
    if fraction != 1.0:
        return None
    return convert_model(lab.teacher, lambda attention, _inputs: gqa_to_mla_exact(attention)), "d_c = d_R = n_kv·d_h"


def _mha2mla(strategy: str, svd: str):
    def build(lab: Lab, fraction: float):
        rope_pairs, kv_lora_rank = mha2mla_ranks(lab.source, fraction)

        def convert_layer(attention, inputs):
            return mha2mla_convert(
                attention,
                rope_pairs=rope_pairs,
                strategy=strategy,
                kv_lora_rank=kv_lora_rank,
                svd=svd,
                calibration_inputs=inputs,
            )

        model = convert_model(lab.teacher, convert_layer, lab.calibration)
        return model, f"r={rope_pairs} d_c={kv_lora_rank}"

    return build


def _best_on_selection(lab: Lab, candidates: dict[int, TinyLM]) -> tuple[int, TinyLM]:
    """The FreqFold F whose model has the lowest loss on the selection slice (training text)."""
    losses = {f: evaluate(model, lab.selection).loss for f, model in candidates.items()}
    best = min(losses, key=losses.get)
    return best, candidates[best]


def registered(name: str, freqfolds: tuple[int, ...] = (1,)):
    """The registry's method ``name`` at a cache fraction, as ``convert`` runs it (``convert_model_by_method``: the
    method's rule, or for the recipe the split with the lower calibration error); with several FreqFold values, the
    one with the lowest loss on the selection slice."""
    method = get_method(name)

    def build(lab: Lab, fraction: float):
        try:
            method.sizes(lab.source, budget=fraction)
        except ValueError:  # no latent fits beside d_R at this budget
            return None
        half = lab.source.head_dim // 2
        candidates = {}
        for freqfold in (f for f in freqfolds if half % f == 0):
            options = {"freqfold": freqfold} if "freqfold" in method.options else {}
            candidates[freqfold] = convert_model_by_method(
                lab.teacher, name, lab.calibration, budget=fraction, **options
            )
        freqfold, model = _best_on_selection(lab, candidates)
        c = model.config
        settings = f"kv_lora_rank={c.kv_lora_rank} rope_dim={c.qk_rope_head_dim}"
        return model, settings + (f" F={freqfold}" if "freqfold" in method.options else "")

    return build


def methods() -> list[Method]:
    rows = [Method("exact", "exact", "exact (gqa_to_mla_exact)", _exact)]
    for svd in ("joint", "split"):
        for strategy in STRATEGIES:
            label = f"MHA2MLA S_{strategy}, SVD_{svd}"
            rows.append(Method(f"mha2mla-{strategy}-{svd}", "MHA2MLA", label, _mha2mla(strategy, svd)))
    rows.append(Method("transmla", "TransMLA", "TransMLA (paper), RoRoPE + BKV-PCA", registered("transmla")))
    rows.append(Method("transmla-ff", "TransMLA", "TransMLA (paper) + FreqFold", registered("transmla", (2, 4))))
    rows.append(
        Method(
            "mla_ref",
            "mla_ref",
            "**mla_ref's recipe** (`recipe`): one roped component per frequency, score metric, output refit",
            registered("recipe"),
        )
    )
    return rows


# ---- one teacher ---------------------------------------------------------------------------------------------


def _windows(data: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Random windows of ``data`` with their next bytes, ⌈tokens / SEQ_LEN⌉ of them: (n, SEQ_LEN + 1)."""
    count = max(1, math.ceil(tokens / SEQ_LEN))
    inputs, targets = random_batch(data, count, SEQ_LEN, torch.Generator().manual_seed(seed))
    return torch.cat([inputs, targets[:, -1:]], dim=1)


def _finetune_these(
    cells: list[Cell], grid: str, rows: list[Method], fractions: tuple[float, ...], teacher_perplexity: float
) -> set[int]:
    """Indices of the cells to fine-tune: all, none, or the policy (see the table caption)."""
    if grid == "none":
        return set()
    if grid == "all":
        return set(range(len(cells)))
    family = {m.key: m.family for m in rows}
    column = min(fractions, key=lambda f: abs(f - 0.25))  # the 25% column, or the nearest one asked for
    chosen = {i for i, c in enumerate(cells) if c.fraction == column or family[c.method] == "exact"}
    for fraction in fractions:
        for name in FAMILIES:
            here = [i for i, c in enumerate(cells) if c.fraction == fraction and family[c.method] == name]
            if not here:
                continue
            best = min(here, key=lambda i: cells[i].before)
            # a lossless cell behaves as the exact conversion, whose fine-tune is the control already
            if not math.isclose(cells[best].before, teacher_perplexity, rel_tol=LOSSLESS):
                chosen.add(best)
    return chosen


def run_teacher(name: str, args: argparse.Namespace) -> dict:
    """Every cell of one teacher's table; returns a TeacherResult as a dict (it crosses a process boundary)."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    say = (lambda text: None) if args.quiet else (lambda text: print(f"[{name}] {text}", file=sys.stderr, flush=True))
    directory = TEACHERS_DIR / name
    teacher = checkpoint.load(directory)
    corpus = load_corpus()
    calibration = _windows(corpus.train, args.calib_tokens, seed=args.seed)[:, :-1]  # (b, s)
    lab = Lab(
        name=name,
        teacher=teacher,
        corpus=corpus,
        calibration=calibration,
        selection=_windows(corpus.train, args.select_tokens, seed=args.seed + 1),
        cache=teacher.layers[0].self_attn.cache_elements_per_token(),
    )
    validation = validation_windows(corpus.val, SEQ_LEN, args.eval_tokens)
    base = evaluate(teacher, validation).perplexity
    pretraining = pretraining_tokens(directory)
    steps = args.finetune_steps or budget_steps(
        args.finetune_budget, pretraining, batch_size=args.finetune_batch, seq_len=SEQ_LEN
    )
    config = finetune_config(args, steps)
    result = TeacherResult(
        name=name,
        parameters=teacher.num_parameters(),
        pretraining_tokens=pretraining,
        teacher_perplexity=base,
        finetune_tokens=steps * args.finetune_batch * SEQ_LEN,
        finetune_steps=steps,
    )
    if result.finetune_tokens > MAX_FINETUNE_FRACTION * pretraining:
        raise ValueError(
            f"{name}: --finetune-steps {steps} uses {result.finetune_tokens:,} tokens, more than "
            f"{MAX_FINETUNE_FRACTION:.0%} of the teacher's {pretraining:,}"
        )
    say(f"teacher perplexity {base:.3f}; pre-training {pretraining:,} tokens; fine-tune {steps} steps")
    rows = methods()
    students = {}
    full = teacher.kv_cache_elements_per_token()
    for fraction in args.fractions:
        for method in rows:
            built = method.build(lab, fraction)
            if built is None:
                continue
            model, settings = built
            actual = model.kv_cache_elements_per_token() / full
            cell = Cell(method.key, fraction, actual, settings, evaluate(model, validation).perplexity)
            students[len(result.cells)] = model
            result.cells.append(cell)
            say(f"{fraction:6.1%} {method.key:22s} {settings:24s} perplexity {cell.before:8.3f}")
    chosen = _finetune_these(result.cells, args.finetune_grid, rows, tuple(args.fractions), base)
    for index in sorted(chosen):
        cell = result.cells[index]
        student = copy.deepcopy(students[index])
        recovery = recover(
            student,
            corpus,
            config,
            teacher=teacher,
            pretraining_tokens=pretraining,
            max_fraction=MAX_FINETUNE_FRACTION,
            trainable=args.trainable,
        )
        cell.after = recovery.after.perplexity
        say(
            f"{cell.fraction:6.1%} {cell.method:22s} fine-tuned: {cell.before:8.3f} -> {cell.after:8.3f} "
            f"({recovery.wall_seconds:.0f} s)"
        )
    result.wall_seconds = time.perf_counter() - start
    return asdict(result)


# ---- the report ----------------------------------------------------------------------------------------------


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def _cell_text(cell: Cell | None, base: float) -> str:
    if cell is None:
        return "—"
    text = f"{cell.before:.3f} ({cell.before / base:.2f}×)"
    if cell.after is not None:
        text += f" → **{cell.after:.3f} ({cell.after / base:.3f}×)**"
    if not math.isclose(cell.actual, cell.fraction, rel_tol=1e-9):
        text += f" @ {_percent(cell.actual)}"
    return text


def teacher_table(result: TeacherResult, args: argparse.Namespace) -> list[str]:
    base = result.teacher_perplexity
    rows = methods()
    fractions = list(args.fractions)
    at = {(c.method, c.fraction): c for c in result.cells}
    tuned = sum(c.after is not None for c in result.cells)
    grid = {
        "all": "every cell",
        "none": "no cell",
        "policy": f"every cell of the {_percent(min(fractions, key=lambda f: abs(f - 0.25)))} column, the exact "
        "conversion (the teacher itself, fine-tuned alike: the control) and, in the other columns, the best method "
        "of each family before training unless it is lossless (within 0.1% of the teacher: the control shows what "
        "the fine-tune does there); fine-tuning the whole grid would take too long on a 2-core CPU",
    }[args.finetune_grid]
    lines = [
        f"### {result.name.upper()} teacher: validation perplexity {base:.3f}",
        "",
        f"{result.parameters:,} parameters, pre-trained on {result.pretraining_tokens:,} tokens.  Each cell: "
        "perplexity with no training (× the teacher's) → **after the fine-tune (× the teacher's)**.  Fine-tune: "
        f"{result.finetune_steps} steps × {args.finetune_batch} × {SEQ_LEN} = {result.finetune_tokens:,} tokens = "
        f"{result.finetune_tokens / result.pretraining_tokens:.2%} of the teacher's pre-training tokens; distillation "
        f"from the teacher (α = {args.distill_alpha:g}, τ = 2, hidden-state term β = {args.distill_hidden:g}), AdamW lr "
        f"{args.lr:g}, warm-up then cosine, "
        f"{args.trainable} parameters trainable.  Fine-tuned: {grid} ({tuned} cells).  Validation: the first "
        f"{args.eval_tokens:,} bytes of the validation split.  Calibration: {args.calib_tokens:,} tokens of the "
        f"training split; F chosen on {args.select_tokens:,} other training tokens.  MHA2MLA is sized by "
        "mla_ref's `mha2mla_ranks` (half of each layer's budget on the kept rotary pairs), not the paper's proportion.",
        "",
        "| method | " + " | ".join(f"{_percent(f)} cache" for f in fractions) + " |",
        "|---|" + "---:|" * len(fractions),
    ]
    for method in rows:
        if not any((method.key, f) in at for f in fractions):
            continue
        lines.append(f"| {method.label} | " + " | ".join(_cell_text(at.get((method.key, f)), base) for f in fractions))
        lines[-1] += " |"
    lines += ["", "Settings per cell (per layer: r rotary pairs per KV head, d_R shared roped dims, d_c latent):", ""]
    lines += ["| method | " + " | ".join(_percent(f) for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for method in rows:
        if any((method.key, f) in at for f in fractions):
            settings = [at[method.key, f].settings if (method.key, f) in at else "—" for f in fractions]
            lines.append(f"| {method.label} | " + " | ".join(settings) + " |")
    return lines + [""]


def _compare(name_a: str, a: float, name_b: str, b: float) -> str:
    """Which of two perplexities is lower; within TIE_MARGIN (relative) a tie."""
    if abs(a - b) <= TIE_MARGIN * min(a, b):
        return f"{name_a} ≈ {name_b} ({a:.3f} vs {b:.3f})"
    better, worse = (name_a, name_b) if a < b else (name_b, name_a)
    return f"{better} better ({min(a, b):.3f} vs {max(a, b):.3f})"


def claims(results: list[TeacherResult], fractions: list[float]) -> list[str]:
    """The papers' claims, checked on the measured numbers."""
    lines = ["## The papers' claims, on these numbers", ""]
    for stage in ("before", "after"):
        tally_best, tally_svd = [0, 0], [0, 0, 0]  # [agree, disagree]; [joint, tie, split]
        details = []
        for result in results:
            at = {(c.method, c.fraction): getattr(c, stage) for c in result.cells}
            for fraction in fractions:
                for svd in ("joint", "split"):
                    scores = {s: at.get((f"mha2mla-{s}-{svd}", fraction)) for s in STRATEGIES}
                    if any(v is None for v in scores.values()):
                        continue
                    best = min(scores, key=scores.get)
                    others = min(v for s, v in scores.items() if s != "2-norm")
                    agree = scores["2-norm"] <= others * (1 + TIE_MARGIN)
                    tally_best[0 if agree else 1] += 1
                    details.append(f"{result.name} {_percent(fraction)} SVD_{svd}: best S_{best}")
                for strategy in STRATEGIES:
                    joint, split = (
                        at.get((f"mha2mla-{strategy}-joint", fraction)),
                        at.get((f"mha2mla-{strategy}-split", fraction)),
                    )
                    if joint is None or split is None:
                        continue
                    if abs(joint - split) <= TIE_MARGIN * min(joint, split):
                        tally_svd[1] += 1
                    else:
                        tally_svd[0 if joint < split else 2] += 1
        label = "no training" if stage == "before" else "after the fine-tune"
        if sum(tally_best) == 0:
            continue
        verdict = (
            "agrees" if tally_best[1] == 0 else ("mostly agrees" if tally_best[0] > tally_best[1] else "disagrees")
        )
        lines.append(
            f"- (a) S_2-norm is the best partial-RoPE rule ({label}): best or within {TIE_MARGIN:.0%} of the best in "
            f"{tally_best[0]} of {sum(tally_best)} (teacher, cache, SVD) comparisons — {verdict}.  "
            + "; ".join(details)
        )
        verdict = "agrees" if tally_svd[0] > tally_svd[2] else ("disagrees" if tally_svd[2] > tally_svd[0] else "a tie")
        lines.append(
            f"- (a) SVD_joint beats SVD_split ({label}): joint better in {tally_svd[0]}, tie (within "
            f"{TIE_MARGIN:.0%}) in {tally_svd[1]}, split better in {tally_svd[2]} (strategy, cache) pairs — {verdict}."
        )
    for result in results:
        at = {(c.method, c.fraction): c.before for c in result.cells}
        for fraction in fractions:
            if fraction == 1.0:
                continue
            mha2mla = {k: v for (k, f), v in at.items() if f == fraction and k.startswith("mha2mla")}
            transmla = {k: v for (k, f), v in at.items() if f == fraction and k.startswith("transmla")}
            if not mha2mla or not transmla:
                continue
            best_m, best_t = min(mha2mla, key=mha2mla.get), min(transmla, key=transmla.get)
            factor = mha2mla[best_m] / transmla[best_t]
            if factor >= WIDE_MARGIN:
                verdict = f"agrees: TransMLA better by {factor:.2f}× (a wide margin: ≥ {WIDE_MARGIN}×)"
            elif factor > 1 + TIE_MARGIN:
                verdict = f"partly: TransMLA better, but only by {factor:.2f}× (< {WIDE_MARGIN}×)"
            elif factor >= 1 - TIE_MARGIN:
                verdict = f"disagrees: a tie ({factor:.2f}×)"
            else:
                verdict = f"disagrees: MHA2MLA better by {1 / factor:.2f}×"
            lines.append(
                f"- (b) {result.name} at {_percent(fraction)}, no training: best TransMLA ({best_t}) "
                f"{transmla[best_t]:.3f} vs best MHA2MLA ({best_m}) {mha2mla[best_m]:.3f} — {verdict}."
            )
    return lines + [""]


def targets(results: list[TeacherResult], fractions: list[float]) -> list[str]:
    """The project's targets as PASS/FAIL lines (best converted method of each cache fraction)."""
    lines = ["## Targets", ""]
    for result in results:
        base = result.teacher_perplexity
        for fraction, limit, stage in TARGETS:
            if fraction not in fractions:
                continue
            key = "before" if stage == "training-free" else "after"
            found = [
                (getattr(c, key), c.method)
                for c in result.cells
                if c.fraction == fraction and c.method != "exact" and getattr(c, key) is not None
            ]
            if not found:
                lines.append(f"- {result.name} {stage} at {_percent(fraction)}: not measured")
                continue
            perplexity, method = min(found)
            budget = (
                f" (fine-tune {result.finetune_tokens / result.pretraining_tokens:.2%} of pre-training)"
                if key == "after"
                else ""
            )
            verdict = "PASS" if perplexity / base <= limit else "FAIL"
            lines.append(
                f"- {verdict}: {result.name} {stage}{budget} at {_percent(fraction)} cache: best {method} "
                f"{perplexity:.3f} = {perplexity / base:.3f}× the teacher's (target ≤ {limit}×)"
            )
    return lines + [""]


def plot(results: list[TeacherResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = methods()
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        base = result.teacher_perplexity
        for index, method in enumerate(rows):
            cells = sorted((c for c in result.cells if c.method == method.key), key=lambda c: c.actual)
            if not cells:
                continue
            colour = colours(index % 20)
            label = method.label.replace("**", "")
            ax.plot([c.actual for c in cells], [c.before for c in cells], "o-", color=colour, label=label, ms=4)
            tuned = [c for c in cells if c.after is not None]
            ax.plot([c.actual for c in tuned], [c.after for c in tuned], "*", color=colour, ms=11, mec="black")
        ax.axhline(base, color="black", ls="--", lw=1, label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        shown = sorted({c.actual for c in result.cells}, reverse=True)
        ax.set_xticks(shown, [_percent(f) for f in shown])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.invert_xaxis()
        ax.set_xlabel("KV cache, fraction of the teacher's")
        ax.set_ylabel("validation perplexity (● no training, ★ fine-tuned)")
        ax.set_title(f"{result.name.upper()} teacher")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line --------------------------------------------------------------------------------------------


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """The fine-tune's settings (and the validation slice it reports on); finetune_budget.py shares them."""
    p.add_argument("--finetune-batch", type=int, default=4, help="windows of 128 bytes per fine-tune step")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tune peak learning rate")
    p.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    p.add_argument("--distill-hidden", type=float, default=3.0, help="β of the hidden-state term (0 = off)")
    p.add_argument("--trainable", choices=("attention", "all"), default="all", help="what the fine-tune moves")
    p.add_argument("--eval-tokens", type=int, default=16384, help="validation slice, in predicted bytes")
    p.add_argument("--seed", type=int, default=0)


def finetune_config(args: argparse.Namespace, steps: int) -> TrainConfig:
    """The fine-tune of ``steps`` optimiser steps that ``add_finetune_arguments``' settings describe."""
    return recovery_config(
        steps,
        batch_size=args.finetune_batch,
        seq_len=SEQ_LEN,
        lr=args.lr,
        seed=args.seed,
        eval_tokens=args.eval_tokens,
        distill_alpha=args.distill_alpha,
        distill_hidden_weight=args.distill_hidden,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", default=",".join(TEACHERS), help="comma-separated: mha, gqa (default: both)")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="KV cache fractions (columns)")
    p.add_argument("--finetune-steps", type=int, default=None, help="optimiser steps (default: the budget's)")
    p.add_argument(
        "--finetune-budget",
        type=float,
        default=0.02,
        help="fine-tune tokens as a fraction of the teacher's pre-training, when --finetune-steps is not given",
    )
    p.add_argument("--finetune-grid", choices=FINETUNE_GRIDS, default="policy", help="which cells to fine-tune")
    add_finetune_arguments(p)
    p.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens (training split)")
    p.add_argument("--select-tokens", type=int, default=4096, help="training tokens that choose FreqFold's F")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (one is fastest here)")
    p.add_argument("--jobs", type=int, default=1, help="teachers converted in parallel, one process each")
    p.add_argument("--out", default="benchmarks/results/conversion_quality.md")
    p.add_argument("--quick", action="store_true", help="smoke test: small slices, 2 fine-tune steps")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    args.teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    for name in args.teachers:
        if name not in TEACHERS:
            raise ValueError(f"--teachers: unknown teacher {name!r}; allowed: {', '.join(TEACHERS)}")
    try:
        args.fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--fractions must be comma-separated numbers in (0, 1], got {args.fractions!r}") from None
    if not args.fractions or any(not 0 < f <= 1 for f in args.fractions):
        raise ValueError(f"--fractions must be numbers in (0, 1], got {args.fractions}")
    args.fractions = sorted(set(args.fractions), reverse=True)
    for name in ("calib_tokens", "select_tokens", "eval_tokens", "threads", "jobs", "finetune_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        raise ValueError(f"--finetune-steps must be a positive integer, got {args.finetune_steps}")
    if not 0 < args.finetune_budget <= MAX_FINETUNE_FRACTION:
        raise ValueError(f"--finetune-budget must lie in (0, {MAX_FINETUNE_FRACTION}], got {args.finetune_budget}")
    if args.quick:
        args.calib_tokens, args.select_tokens, args.eval_tokens = 1024, 1024, 2048
        args.finetune_steps = args.finetune_steps or 2
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.jobs > 1 and len(args.teachers) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(args.teachers)), mp_context=context) as pool:
            raw = list(pool.map(run_teacher, args.teachers, [args] * len(args.teachers)))
    else:
        raw = [run_teacher(name, args) for name in args.teachers]
    results = []
    for r in raw:
        cells = [Cell(**c) for c in r.pop("cells")]
        results.append(TeacherResult(**r, cells=cells))
    wall = time.perf_counter() - start
    times = ", ".join(f"{r.name} {r.wall_seconds / 60:.1f} min" for r in results)
    lines = ["# Conversion quality: perplexity against KV-cache size", ""]
    if args.quick:
        lines += ["*Smoke test (--quick): small slices and a 2-step fine-tune; not the project's numbers.*", ""]
    for result in results:
        lines += teacher_table(result, args)
    lines += claims(results, args.fractions) + targets(results, args.fractions)
    lines += [
        f"Command: `python benchmarks/conversion_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{args.threads} thread(s) per teacher, {min(args.jobs, len(args.teachers))} process(es); wall time "
        f"{wall / 60:.1f} min ({times}); torch {torch.__version__}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

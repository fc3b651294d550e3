"""Choose how a cache budget is split between the roped key and the latent, by measuring the conversion.

A DeepSeek-V3 config has one d_R and one d_c for every layer, so the split of a budget B = d_R + d_c is one choice
for the whole model.  No rule of thumb makes it well for every model: at a quarter of the cache, SmolLM2-135M loses
least with d_R = B/3 and the GQA teacher with d_R = B/2 (``Method.candidate_sizes`` lists what a method tries).  So
every layer is converted at each candidate split and scored by its relative output error against its source layer
on the calibration inputs,

    E_l = Σ‖MLA_l(x_l) − y_l‖² / Σ‖y_l‖²          (x_l, y_l: the source layer's input and output)

and the split with the lowest mean E_l over the layers is kept.  On SmolLM2 the mean E_l ranked every split tried at
25% and 12.5% of the cache exactly as the written checkpoint's perplexity on held-out text did
(``benchmarks/rope_split.py``), and it needs no text beyond the calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mla_ref.convert.refit import output_error


@dataclass
class SplitSearch:
    """Layer by layer, the conversions at every candidate split and their calibration errors.

    candidates: the sizes tried (``Method.candidate_sizes``), the method's rule first.
    kept[k]:    what the caller keeps of each layer converted with candidates[k] (the module, or more).
    errors[k]:  E_l of each of those layers.
    """

    candidates: list[dict]
    kept: list[list] = field(default_factory=list)
    errors: list[list[float]] = field(default_factory=list)

    def __post_init__(self):
        if not self.candidates:
            raise ValueError("a split search needs at least one candidate split")
        self.kept = [[] for _ in self.candidates]
        self.errors = [[] for _ in self.candidates]

    @torch.no_grad()
    def add_layer(
        self,
        source: nn.Module,
        calibration_inputs: torch.Tensor,
        convert: Callable[[dict], nn.Module],
        keep: Callable[[nn.Module], object] = lambda module: module,
    ) -> None:
        """Convert one layer at every candidate split (``convert(sizes)``), score it, and keep ``keep(module)``.

        Shapes: calibration_inputs (b, s, d_model), what ``source`` and the converted layers read.  With one
        candidate there is nothing to choose and no error is measured.
        """
        target = source(calibration_inputs) if len(self.candidates) > 1 else None  # (b, s, d_model): y_l
        for k, sizes in enumerate(self.candidates):
            module = convert(sizes)
            if target is not None:
                self.errors[k].append(output_error(module, calibration_inputs, target))
            self.kept[k].append(keep(module))

    def mean_errors(self) -> list[float]:
        """Mean E_l over the layers for each candidate (empty with one candidate)."""
        if len(self.candidates) == 1:
            return []
        return [sum(errors) / len(errors) for errors in self.errors]

    def best(self) -> int:
        """The index of the candidate with the lowest mean E_l (the only one, with one)."""
        means = self.mean_errors()
        return min(range(len(means)), key=means.__getitem__) if means else 0

    def chosen(self) -> list:
        """What was kept of every layer at the best split."""
        return self.kept[self.best()]

    def describe(self) -> str:
        """One line for a report: each split tried, its mean E_l, the chosen one marked."""
        means = self.mean_errors()
        if not means:
            return ""
        best = self.best()
        parts = [
            f"d_R {sizes['rope_dim']} + d_c {sizes['kv_lora_rank']}: {mean:.4f}" + (" (chosen)" if k == best else "")
            for k, (sizes, mean) in enumerate(zip(self.candidates, means, strict=True))
        ]
        return "mean layer output error on the calibration tokens: " + ", ".join(parts)

"""Choose how a cache budget is split between the roped key and the latent, by measuring the conversion.

A DeepSeek-V3 config has one d_R and one d_c for every layer, so the split of a budget B = d_R + d_c is one choice
for the whole model.  No rule of thumb makes it well for every model: at a quarter of the cache, SmolLM2-135M loses
least with d_R = B/3 and the GQA teacher with d_R = B/2 (``Method.candidate_sizes`` lists what a method tries).  So
every layer is converted at each candidate split, and each candidate is measured twice on the calibration tokens:

    E_l = Σ‖MLA_l(x_l) − y_l‖² / Σ‖y_l‖²          each layer against its source layer (x_l, y_l: its input, output)
    KL  = mean over tokens of KL(p_source ‖ p_converted)    the whole converted model against the source

The KL decides; the mean E_l is reported beside it (and decides where no KL was measured).  The KL sees what the
layer errors do downstream: on SmolLM2 at 12.5% of the cache the mean E_l preferred d_R 16 (0.2654 against 0.2680
for d_R 24) while the KL on 2,048 calibration tokens preferred d_R 24 (1.28 against 1.41 nats/token), and so did
perplexity on held-out code (5.41× the source's against 6.89×).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mla_ref.convert.refit import output_error
from mla_ref.measures import kl_per_position
from mla_ref.threads import all_threads


@dataclass
class SplitSearch:
    """Layer by layer, the conversions at every candidate split and their calibration errors.

    candidates: the sizes tried (``Method.candidate_sizes``), the method's rule first.
    kept[k]:    what the caller keeps of each layer converted with candidates[k] (the module, or more).
    errors[k]:  E_l of each of those layers.
    model_kl[k]: the whole model's KL to the source on calibration tokens with candidates[k], once the caller has
                measured it (empty before).
    """

    candidates: list[dict]
    kept: list[list] = field(default_factory=list)
    errors: list[list[float]] = field(default_factory=list)
    model_kl: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.candidates:
            raise ValueError("a split search needs at least one candidate split")
        self.kept = [[] for _ in self.candidates]
        self.errors = [[] for _ in self.candidates]

    @torch.no_grad()
    def target(self, source: nn.Module, calibration_inputs: torch.Tensor) -> torch.Tensor | None:
        """y_l, the source layer's output on the calibration inputs (b, s, d_model), which each converted layer is
        scored against — None with one candidate, where there is nothing to choose.  A converter may read it too."""
        if not self.choosing():
            return None
        with all_threads():  # a layer's forward: the same result on any number of threads
            return source(calibration_inputs)  # (b, s, d_model): y_l

    @torch.no_grad()
    def add_layer(
        self,
        modules: list[nn.Module],
        calibration_inputs: torch.Tensor,
        target: torch.Tensor | None,
        keep: Callable[[nn.Module], object] = lambda module: module,
    ) -> None:
        """Record one layer converted at every candidate split (``modules``, in the order of ``candidates``): score
        each against ``target`` (from ``target``; None: no error measured) and keep ``keep(module)``.
        Shapes: calibration_inputs (b, s, d_model), what the converted layers read."""
        if len(modules) != len(self.candidates):
            raise ValueError(f"convert gave {len(modules)} modules for {len(self.candidates)} candidate splits")
        for k, module in enumerate(modules):
            if target is not None:
                # E_l, or the converter's own measure of it against this same target (the recipe's refit solves
                # its o_proj from ‖y − W_O z‖² and keeps that error, which spares a forward over every token)
                error = getattr(module, "calibration_error", None)
                self.errors[k].append(output_error(module, calibration_inputs, target) if error is None else error)
            self.kept[k].append(keep(module))

    def mean_errors(self) -> list[float]:
        """Mean E_l over the layers for each candidate (empty with one candidate)."""
        if len(self.candidates) == 1:
            return []
        return [sum(errors) / len(errors) for errors in self.errors]

    def choosing(self) -> bool:
        """Whether there is a choice to make (more than one candidate)."""
        return len(self.candidates) > 1

    def choose(self, model_kl: Callable[[int, list], float]) -> int:
        """Measure ``model_kl(k, kept[k])`` — the whole converted model's KL to the source with candidate k's layers —
        for every candidate when there is a choice, and return the best candidate's index."""
        if self.choosing():
            self.model_kl = [model_kl(k, kept) for k, kept in enumerate(self.kept)]
        return self.best()

    def best(self) -> int:
        """The index of the candidate with the lowest model KL, or without it the lowest mean E_l (0 with one)."""
        scores = self.model_kl or self.mean_errors()
        return min(range(len(scores)), key=scores.__getitem__) if scores else 0

    def chosen(self) -> list:
        """What was kept of every layer at the best split."""
        return self.kept[self.best()]

    def describe(self) -> str:
        """One line for a report: each split tried, its KL and mean E_l, the chosen one marked ("" with one)."""
        means = self.mean_errors()
        if not means:
            return ""
        best = self.best()
        parts = []
        for k, (sizes, mean) in enumerate(zip(self.candidates, means, strict=True)):
            kl = f"KL {self.model_kl[k]:.4f}, " if self.model_kl else ""
            chosen = " (chosen)" if k == best else ""
            parts.append(f"d_R {sizes['rope_dim']} + d_c {sizes['kv_lora_rank']}: {kl}mean E_l {mean:.4f}{chosen}")
        if self.model_kl:
            return "KL to the source on the calibration tokens (nats/token), beside the mean layer output error: " + (
                ", ".join(parts)
            )
        return "mean layer output error E_l on the calibration tokens: " + ", ".join(parts)


def kl_to_source(source_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_source ‖ p) in nats: logits (..., vocab), computed in fp32."""
    return kl_per_position(source_logits, logits).mean().clamp_min(0).item()

"""Training a converted model back towards its source.

- ``finetune``: a short fine-tune of the whole model (``recover``), by cross-entropy or by distillation from the
  source, with the budget it spent (``recovery_config``, ``budget_steps``); ``teacher_divergence`` measures
  KL(source ‖ model) per predicted token.
- ``layerwise``: each attention layer trained on its own to reproduce its source layer on the source's inputs;
  ``activations`` carries the hidden states it trains on from layer to layer.
- ``distill``: the whole source distilled into the attention layers, with a device, a time limit and parameters
  held fixed.
- ``steps``: what they share: argument checks, moving models to a device, the latent's balance, the parameters a
  run trains and one clipped optimiser step.  The learning-rate schedule is ``mla_ref.train.learning_rate``.

``mla_ref.pipelines.recover`` runs them on a checkpoint directory.
"""

from mla_ref.recovery.finetune import (
    RecoveryResult,
    budget_steps,
    pretraining_tokens,
    recover,
    recovery_config,
    teacher_divergence,
)

__all__ = ["RecoveryResult", "budget_steps", "pretraining_tokens", "recover", "recovery_config", "teacher_divergence"]

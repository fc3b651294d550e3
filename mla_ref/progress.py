"""The progress bar every long loop of the package shows: ``tqdm`` from ``tqdm.auto``, imported here once.

``tqdm.auto`` draws a notebook widget when ipywidgets is installed and a text bar otherwise; without ipywidgets it
warns once, on import, that it fell back to the text bar.  That is fine here, so the warning is silenced for the
import alone.  Use it as ``tqdm(iterable, desc=..., disable=quiet, leave=False)``.
"""

from __future__ import annotations

import warnings

from tqdm import TqdmExperimentalWarning, TqdmWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", (TqdmWarning, TqdmExperimentalWarning))
    from tqdm.auto import tqdm

__all__ = ["tqdm"]

"""Following ``--budget`` from the command line to ``mla.py`` is a walk down one list of modules, each once.

Every call stack that carries the budget or the sizes planned from it — the stack at ``budget_elements`` (where the
budget becomes cache elements) and the stack at each ``MultiHeadLatentAttention`` a method's converter builds — is
recorded during ``python -m mla_ref convert SRC OUT --budget 0.25``.  Each stack, read from the command down, must
visit the modules of ``BUDGET_PATH`` in that order, none of them twice and none outside it (the command layer
``cli/`` counts as one stop).  ARCHITECTURE.md tells the same path in words.
"""

from __future__ import annotations

import sys

import pytest

from mla_ref.__main__ import main
from mla_ref.train import TEACHERS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread (conftest)

BUDGET_PATH = (
    "cli/",  # cli/convert.py parses --budget into ConvertOptions (cli/common.py runs it with one-line errors)
    "mla_ref.pipelines.convert",  # convert_checkpoint: plan, pass 1 over the layers, pass 2, write
    "mla_ref.pipelines.convert_options",  # plan_conversion: every check, and the sizes planned once
    "mla_ref.convert.methods.base",  # plan_sizes: B elements, the method's splits; Method.convert_layer
    "mla_ref.convert.methods.recipe",  # the recipe's split rule and its converter, top to bottom
    "mla_ref.convert.parts",  # assemble_mla: the module built at the planned sizes
    "mla_ref.mla",  # MultiHeadLatentAttention
)


def _stops(frame) -> list[str]:
    """The modules of a call stack, from the outermost mla_ref frame down, consecutive repeats merged."""
    names = []
    while frame is not None:
        names.append(frame.f_globals.get("__name__", ""))
        frame = frame.f_back
    stops = []
    for name in reversed(names):
        if not name.startswith("mla_ref"):
            continue
        stop = "cli/" if name.startswith(("mla_ref.cli", "mla_ref.__main__")) else name
        if not stops or stops[-1] != stop:
            stops.append(stop)
    return stops


def _follows_the_path(stops: list[str]) -> bool:
    """Whether ``stops`` is a subsequence of BUDGET_PATH that starts at the command: in order, each once."""
    positions = [BUDGET_PATH.index(stop) if stop in BUDGET_PATH else -1 for stop in stops]
    return bool(positions) and positions[0] == 0 and -1 not in positions and positions == sorted(set(positions))


@pytest.fixture(scope="module")
def recorded_stacks(tmp_path_factory) -> list[list[str]]:
    source = tmp_path_factory.mktemp("path") / "teacher-llama"
    assert main(["export", str(TEACHERS_DIR / "gqa"), str(source), "--format", "llama"]) == 0
    stacks = []

    def record(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        if code.co_name == "budget_elements" or (
            code.co_name == "__init__" and frame.f_globals.get("__name__") == "mla_ref.mla"
        ):
            stops = _stops(frame)
            # an MLA built by a method's converter (not the candidate models or the stock form of pass 2)
            if code.co_name == "budget_elements" or any(s.startswith("mla_ref.convert.methods") for s in stops):
                stacks.append(stops)

    argv = ["convert", str(source), str(source.parent / "out"), "--budget", "0.25", "--quiet"]
    argv += ["--calib-tokens", "512", "--eval-tokens", "0", "--seq-len", "64"]
    sys.setprofile(record)
    try:
        assert main(argv) == 0
    finally:
        sys.setprofile(None)
    return stacks


def test_budget_reaches_mla_through_seven_modules_each_once_top_to_bottom(recorded_stacks):
    assert len(BUDGET_PATH) <= 7
    kinds = {stack[-1] for stack in recorded_stacks}
    assert kinds == {"mla_ref.convert.methods.base", "mla_ref.mla"}, kinds  # both ends were seen
    strays = [stack for stack in recorded_stacks if not _follows_the_path(stack)]
    assert not strays, f"stacks off the path: {strays[:3]}"
    assert max(recorded_stacks, key=len) == list(BUDGET_PATH[:2]) + list(BUDGET_PATH[3:])  # the converter's walk


def test_the_path_check_sees_a_detour_and_a_return():
    assert _follows_the_path(["cli/", "mla_ref.pipelines.convert", "mla_ref.convert.methods.base"])
    assert not _follows_the_path(["cli/", "mla_ref.convert.split_choice", "mla_ref.mla"])  # a module off the path
    assert not _follows_the_path(  # back up into the pipeline: a callback
        ["cli/", "mla_ref.pipelines.convert", "mla_ref.convert.methods.base", "mla_ref.pipelines.convert"]
    )
    assert not _follows_the_path(["mla_ref.pipelines.convert", "mla_ref.mla"])  # not from the command

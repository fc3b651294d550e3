"""The package's imports flow one way: a walk over every import (those inside functions too) finds no cycle and
no import from a lower layer to a higher one.  The layer order is written once, here (ARCHITECTURE.md draws it)."""

import ast
from pathlib import Path

import mla_ref

PACKAGE_ROOT = Path(mla_ref.__file__).parent

# Bottom up.  A module may import from its own layer or any layer below, never from one above.  A name ending in
# "." is a package: the entry covers it and all its submodules.
LAYERS: list[tuple[str, ...]] = [
    (  # utilities every layer may use
        "mla_ref._checks",
        "mla_ref.records",
        "mla_ref.tensor_files",
        "mla_ref.testing",
        "mla_ref.outputs",
        "mla_ref.provenance",
        "mla_ref.measures",
        "mla_ref.progress",
    ),
    ("mla_ref.rope", "mla_ref.cache", "mla_ref.norm", "mla_ref.kernels."),  # the core
    ("mla_ref.attention",),
    ("mla_ref.mla", "mla_ref"),  # the package's __init__ exports the core, up to MLA
    ("mla_ref.model", "mla_ref.data", "mla_ref.checkpoint", "mla_ref.calculator", "mla_ref.profile"),  # the lab
    ("mla_ref.hf.",),  # file formats
    ("mla_ref.convert.",),  # the conversion math
    ("mla_ref.train", "mla_ref.recovery."),  # training
    ("mla_ref.pipelines.",),  # whole-checkpoint jobs
    ("mla_ref.cli.", "mla_ref.__main__"),
]


def module_name(path: Path) -> str:
    parts = ("mla_ref", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def layer_of(module: str) -> int:
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry.rstrip(".") or (entry.endswith(".") and module.startswith(entry)):
                return index
    raise AssertionError(f"{module} has no layer: add it to LAYERS in {__file__}")


def imports_of(module: str) -> set[str]:
    """Every mla_ref module that ``module`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mla_ref")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mla_ref":
            for alias in node.names:  # `from package import submodule` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found - {module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer_and_every_import_resolves():
    for module, imported in GRAPH.items():
        layer_of(module)
        unknown = imported - MODULES.keys()
        assert not unknown, f"{module} imports {sorted(unknown)}, which do not exist"


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, imported in GRAPH.items()
        for target in imported
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_there_is_no_import_cycle():
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_conversion_imports_no_training_code():
    training = {"mla_ref.train", "mla_ref.recovery"}
    for module, imported in GRAPH.items():
        if module.startswith("mla_ref.convert"):
            assert not imported & training, f"{module} imports {sorted(imported & training)}"


def test_the_check_itself_sees_an_upward_import_and_a_cycle():
    """The walk is not vacuous: a made-up upward import and a made-up cycle are both caught."""
    assert layer_of("mla_ref.pipelines.convert") > layer_of("mla_ref.convert.methods")
    assert "mla_ref.convert.methods" in GRAPH["mla_ref.pipelines.convert"]  # a real downward import is seen
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["mla_ref.rope"].add("mla_ref.attention")
        GRAPH["mla_ref.attention"].add("mla_ref.rope")
        try:
            test_there_is_no_import_cycle()
        except AssertionError as error:
            assert "import cycle" in str(error)
        else:
            raise AssertionError("a cycle went unnoticed")
        try:
            test_no_module_imports_from_a_higher_layer()
        except AssertionError as error:
            assert "mla_ref.rope (layer 1) imports mla_ref.attention (layer 2)" in str(error)
        else:
            raise AssertionError("an upward import went unnoticed")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)

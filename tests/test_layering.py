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
        "mla_ref.dtypes",
        "mla_ref.progress",
        "mla_ref.diagrams",
        "mla_ref.results",
        "mla_ref.threads",
    ),
    ("mla_ref.rope", "mla_ref.cache", "mla_ref.norm", "mla_ref.kernels."),  # the core
    ("mla_ref.attention",),
    ("mla_ref.mla", "mla_ref"),  # the package's __init__ exports the core, up to MLA
    (  # the lab
        "mla_ref.model",
        "mla_ref.data",
        "mla_ref.checkpoint",
        "mla_ref.model_shapes",
        "mla_ref.calculator",
        "mla_ref.profile",
        "mla_ref.roofline",
    ),
    ("mla_ref.hf.",),  # file formats
    ("mla_ref.convert.",),  # the conversion math
    ("mla_ref.train", "mla_ref.recovery."),  # training
    ("mla_ref.pipelines.",),  # whole-checkpoint jobs
    ("mla_ref.cli.", "mla_ref.__main__", "mla_ref.exercises."),  # commands; the lessons' exercise checks
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
            assert not {t for t in imported if t.split(".")[:2] == ["mla_ref", "recovery"] or t in training}, module


# Inside a package, the order that matters: the algorithms of convert/ know nothing of the methods that compose
# them, nor of the size planning or the split search; a pipeline's helpers (calibration, report, guard, serving)
# never import the pipelines that use them.
INNER_ORDER: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (
        (
            "mla_ref.convert.activations",
            "mla_ref.convert.biased",
            "mla_ref.convert.bkv_pca",
            "mla_ref.convert.exact",
            "mla_ref.convert.mean_pool",
            "mla_ref.convert.partial_rope",
            "mla_ref.convert.parts",
            "mla_ref.convert.refit",
            "mla_ref.convert.rope_table",
            "mla_ref.convert.rorope",
            "mla_ref.convert.stock_form",
            "mla_ref.convert.svd_low_rank",
        ),
        ("mla_ref.convert.methods", "mla_ref.convert.split_choice", "mla_ref.convert.model"),
    ),
    (
        (
            "mla_ref.pipelines.calibration",
            "mla_ref.pipelines.report",
            "mla_ref.pipelines.guard",
            "mla_ref.pipelines.serving",
        ),
        ("mla_ref.pipelines.convert", "mla_ref.pipelines.recover", "mla_ref.pipelines.fetch"),
    ),
]


def test_inside_a_package_the_lower_modules_never_import_the_higher():
    for lower, higher in INNER_ORDER:
        for module in lower:
            upward = {t for t in GRAPH[module] if any(t == h or t.startswith(h + ".") for h in higher)}
            assert not upward, f"{module} imports {sorted(upward)}, which build on it"


# ---- sizes a reader can hold in mind ----------------------------------------------------------------------------
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
# a parser's option list and a Triton kernel (one GPU program, split only at a cost) are read as tables, not logic
LONG_BY_NATURE = ("_parser", "parser", "_mla_decode_split_kernel")


def test_no_file_is_longer_than_a_reader_holds_in_mind():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screen_or_two():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.endswith(LONG_BY_NATURE):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_check_itself_sees_an_upward_import_and_a_cycle():
    """The walk is not vacuous: a made-up upward import and a made-up cycle are both caught."""
    assert layer_of("mla_ref.pipelines.convert_options") > layer_of("mla_ref.convert.methods.base")
    assert (
        "mla_ref.convert.methods.base" in GRAPH["mla_ref.pipelines.convert_options"]
    )  # a real downward import is seen
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

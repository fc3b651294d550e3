"""Checks of lesson 06's exercises (notebooks/06_decoupled_rope.ipynb): RoPE against absorption, and RoPE layouts.

Each check builds its own vectors and weights and computes the truth with ``mla_ref.rope.apply_rope``; nothing is
compared against a number typed in here.
"""

from __future__ import annotations

import torch

from mla_ref.exercises import exercise
from mla_ref.measures import relative_error
from mla_ref.rope import apply_rope

# fp32 scores of size ~1-10 from angles formed in fp32 at positions ≤ 40: a right answer is within ~1e-5
_SCORE_TOLERANCE = 1e-4


@exercise("06.1")
def absorbed_matrix_at_a_gap(answer) -> str:
    """``answer(w_uk, gap)`` -> A (d_h, d_c) with (q A) · c = RoPE_m(q) · RoPE_n(c W_UK) whenever m − n = gap."""
    assert callable(answer), f"the answer is a function (w_uk, gap) -> A_gap, got {type(answer).__name__}"
    generator = torch.Generator().manual_seed(5)
    d_latent, d_head = 6, 16
    w_uk = torch.randn(d_latent, d_head, generator=generator) / d_latent**0.5  # W_UK: (d_c, d_h)
    query = torch.randn(d_head, generator=generator)  # (d_h,)
    latents = torch.randn(10, d_latent, generator=generator)  # (t, d_c)
    for gap in (0, 1, 3, 16):
        matrix = answer(w_uk.clone(), gap)
        assert isinstance(matrix, torch.Tensor), f"at gap {gap} the function returned {type(matrix).__name__}"
        assert tuple(matrix.shape) == (d_head, d_latent), (
            f"A must have shape (d_h, d_c) = {(d_head, d_latent)}, got {tuple(matrix.shape)} at gap {gap}"
        )
        absorbed = latents @ (query @ matrix.float())  # (q A) · c_n for every latent: (t,)
        for m in (gap, gap + 5, 40):
            n = m - gap
            q_rotated = apply_rope(query[None], torch.tensor([m]))[0]  # RoPE_m(q)
            keys = apply_rope(latents @ w_uk, torch.full((len(latents),), n))  # RoPE_n(c W_UK): (t, d_h)
            truth = keys @ q_rotated
            error = relative_error(absorbed, truth)
            if error > _SCORE_TOLERANCE:
                hint = " — right at gap 0, so the matrix must depend on the gap: what is R_m R_nᵀ?" if gap > 0 else ""
                raise AssertionError(
                    f"with a query at position {m} and keys at {n} (gap {gap}) the scores (q A)·c are off by a "
                    f"relative error {error:.2g}{hint}"
                )
    return "(q A_gap) · c equals RoPE_m(q) · RoPE_n(c W_UK) at gaps 0, 1, 3 and 16, wherever the pair sits"


@exercise("06.2")
def rows_a_layout_mix_leaves_right(answer) -> str:
    """The query positions (of a 6-token prompt) whose score rows survive rotating q^R in the other layout."""
    try:
        claimed = {int(position) for position in answer}
    except TypeError:
        raise AssertionError(f"the answer is a list of positions, got {type(answer).__name__}") from None
    positions = range(6)
    assert claimed <= set(positions), f"the prompt holds positions 0 … 5, got {sorted(claimed)}"
    generator = torch.Generator().manual_seed(5)
    q_rope = torch.randn(64, 6, 8, generator=generator)  # many q^R rows (d_R = 8) at positions 0 … 5
    at = torch.arange(6)
    interleaved = apply_rope(q_rope, at, layout="interleaved")  # how the module rotates
    rotate_half = apply_rope(q_rope, at, layout="rotate_half")  # the mix-up
    # a row of scores against the same stored keys is unchanged exactly when the rotated query row is
    right = {p for p in positions if torch.allclose(rotate_half[:, p], interleaved[:, p], rtol=1e-6, atol=1e-6)}
    wrong_rows = sorted(claimed - right)
    missed = sorted(right - claimed)
    assert not wrong_rows, f"row {wrong_rows[0]} changes: there the two layouts rotate different coordinates together"
    assert not missed, f"row {missed[0]} stays right, but is not in your answer"
    return f"only the rows at positions {sorted(right)} stay right: a rotation by angle 0 is the same in any layout"

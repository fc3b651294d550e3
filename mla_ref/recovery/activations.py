"""The hidden states a layerwise recovery carries through the model, one layer at a time.

``recover_layerwise`` trains layer l on what enters it.  Rather than run the whole model for every layer, it keeps
the hidden states h_l of its windows, (n, s, D), and moves them on by one block after each layer:

    x_l = RMSNorm_l(h_l)               what attention l reads
    y_l = Attention_l(x_l)             the teacher layer's output: the target
    h_{l+1} = h_l + y_l + MLP_l(RMSNorm'_l(h_l + y_l))

Only one layer's activations are held at a time.  Every forward runs ``chunk`` windows at a time, so a long
calibration set needs no batch-sized peak of memory; ``layer_error`` measures a layer's relative error on them so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mla_ref.model import TinyLM


@torch.no_grad()
def in_chunks(function, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """function applied to ``x`` (n, s, D) ``chunk`` windows at a time: (n, s, D') without a batch-sized peak."""
    return torch.cat([function(part) for part in x.split(chunk)])


@torch.no_grad()
def embedded(model: TinyLM, tokens: torch.Tensor, device: torch.device, chunk: int) -> torch.Tensor:
    """The embedding rows of ``tokens`` (n, s) on ``device``: (n, s, D) fp32.  Looked up where the table is and
    moved in chunks, so a large vocabulary's table never has to move."""
    embed = model.embed_tokens.weight
    return torch.cat([F.embedding(part.to(embed.device), embed).float().to(device) for part in tokens.split(chunk)])


@torch.no_grad()
def after_attention(block: torch.nn.Module, hidden: torch.Tensor, attended: torch.Tensor, chunk: int) -> torch.Tensor:
    """The rest of ``block`` after its attention: h + y, then the residual MLP.  (n, s, D) -> (n, s, D).

    ``attended`` is the block's attention output y on ``hidden``, already computed, so it is not run again.
    """

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return h + block.mlp(block.post_attention_layernorm(h))

    return in_chunks(mlp, hidden + attended, chunk)


class Streams:
    """The hidden states of some windows entering the current layer: the teacher's, and the student's when the
    student trains on its own inputs.  Shapes: (n, s, D) each."""

    def __init__(self, teacher: torch.Tensor, student: torch.Tensor | None):
        self.teacher, self.student = teacher, student

    @classmethod
    def embedded(
        cls, tokens: torch.Tensor, teacher: TinyLM, student: TinyLM | None, device: torch.device, chunk: int
    ) -> Streams:
        """The streams entering the first layer: the embeddings of ``tokens`` (n, s); the student's only if given."""
        return cls(
            embedded(teacher, tokens, device, chunk),
            None if student is None else embedded(student, tokens, device, chunk),
        )

    def layer(
        self, block: torch.nn.Module, own_block: torch.nn.Module, chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): what the student's layer reads (the teacher's or its own normalised stream) and the teacher
        layer's attention output on the teacher's stream, the target."""
        x = in_chunks(block.input_layernorm, self.teacher, chunk)
        y = in_chunks(block.self_attn, x, chunk)
        if self.student is not None:
            x = in_chunks(own_block.input_layernorm, self.student, chunk)
        return x, y

    def advance(self, block, own_block, x: torch.Tensor, y: torch.Tensor, chunk: int) -> None:
        """Carry the streams through the layer: the teacher's with y, the student's with its trained attention."""
        self.teacher = after_attention(block, self.teacher, y, chunk)
        if self.student is not None:
            self.student = after_attention(own_block, self.student, in_chunks(own_block.self_attn, x, chunk), chunk)


@torch.no_grad()
def layer_error(
    attention: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, first_weight: float = 0.0
) -> float:
    """E + w · E_0 over all of ``x``, ``y`` (n, s, D), ``chunk`` windows at a time, in fp64 sums:

        E   = Σ_{n,t} ‖attention(x)_{n,t} − y_{n,t}‖² / Σ_{n,t} ‖y_{n,t}‖²   (every position)
        E_0 = Σ_n ‖attention(x)_{n,0} − y_{n,0}‖² / Σ_n ‖y_{n,0}‖²           (each window's first position)

    w = 0 gives E.  ``recover_layerwise`` trains each layer on the same loss, over a batch.
    """
    error, norm, first_error, first_norm = 0.0, 0.0, 0.0, 0.0
    for xs, ys in zip(x.split(chunk), y.split(chunk), strict=True):
        difference = (attention(xs) - ys).double()  # (c, s, D)
        error += difference.pow(2).sum().item()
        norm += ys.double().pow(2).sum().item()
        first_error += difference[:, 0].pow(2).sum().item()
        first_norm += ys[:, 0].double().pow(2).sum().item()
    return error / norm + (first_weight * first_error / first_norm if first_weight else 0.0)

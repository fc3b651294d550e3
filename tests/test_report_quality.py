"""The quality report's figures (perplexity, KL to the source, largest logit change) equal the textbook computation,
whatever the head's dtype and however many tokens a chunk holds."""

import math

import pytest
import torch
import torch.nn.functional as F

from mla_ref.pipelines.report import Streams


def _textbook(hidden: dict, targets, norm_weight, head, eps):
    """Every stream's logits at once, then perplexity, mean KL(p_source ‖ p) and max |Δlogit|."""
    logits = {}
    for name, h in hidden.items():
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight  # final RMSNorm
        logits[name] = (normed @ head.float().T).flatten(0, 1).double()  # (n · s, vocab)
    reference = logits["source"].log_softmax(-1)
    result = {}
    for name, current in logits.items():
        log_probs = current.log_softmax(-1)
        nll = F.nll_loss(log_probs, targets.flatten(), reduction="mean").item()
        kl = (reference.exp() * (reference - log_probs)).sum(-1).mean().item()
        result[name] = (math.exp(nll), kl, (current - logits["source"]).abs().max().item())
    return result


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_quality_equals_the_textbook(head_dtype):
    torch.manual_seed(0)
    # a vocabulary of 100,000 over three streams: chunks of 27 tokens (2²³ logits), so the 30 tokens take two; and
    # a bf16 head of width 64 is converted in blocks of 65,536 rows, so it takes two
    vocab, d_model, n, s = 100_000, 64, 3, 10
    targets = torch.randint(0, vocab, (n, s))
    streams = Streams(torch.zeros_like(targets), targets)
    base = torch.randn(n, s, d_model)
    for name in ("source", "converted", "written"):
        streams.hidden[name] = base if name == "source" else base + 0.3 * torch.randn(n, s, d_model)
    norm_weight, head = 1 + 0.1 * torch.randn(d_model), (0.5 * torch.randn(vocab, d_model)).to(head_dtype)
    quality = streams.quality(norm_weight, head, 1e-6)
    expected = _textbook(streams.hidden, targets, norm_weight, head, 1e-6)
    assert list(quality) == ["source", "converted", "written"]
    assert quality["source"].kl_to_source == 0 and quality["source"].max_logit_error == 0
    for name, (perplexity, kl, max_error) in expected.items():
        torch.testing.assert_close(quality[name].perplexity, perplexity, rtol=1e-5, atol=0)
        torch.testing.assert_close(quality[name].kl_to_source, kl, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(quality[name].max_logit_error, max_error, rtol=1e-5, atol=1e-6)

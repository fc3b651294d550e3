"""Perplexity of any model directory mla_ref reads, on the validation split of a folder of text (``eval``)."""

from __future__ import annotations

import os

from mla_ref.data import Corpus, load_corpus, validation_windows
from mla_ref.hf.files import text_tokens
from mla_ref.hf.models import load_model
from mla_ref.model import TinyLM
from mla_ref.train import Evaluation, TrainConfig, evaluate


def evaluate_directory(
    directory: str | os.PathLike,
    *,
    corpus: str | os.PathLike | None = None,
    seq_len: int = TrainConfig.seq_len,
    eval_tokens: int = TrainConfig.eval_tokens,
    path: str = "naive",
) -> tuple[Evaluation, TinyLM, Corpus]:
    """The validation loss and perplexity of the model in ``directory`` (what ``python -m mla_ref eval`` prints).

    The validation split of ``corpus`` (default: the Python standard library), tokenized by the directory's
    tokenizer (bytes without one), the first ``eval_tokens`` tokens in windows of ``seq_len``.  Returns the
    evaluation, the model and the corpus.
    """
    model = load_model(directory)
    if path != "naive" and model.config.attention != "mla":
        raise ValueError(
            f"path {path!r} is an MLA execution path, and {str(directory)!r} holds {model.config.attention!r} "
            "attention; leave the path out (naive) for this model"
        )
    data = load_corpus(corpus)
    tokens = text_tokens(directory, data.val, model.config.vocab_size)
    return evaluate(model, validation_windows(tokens, seq_len, eval_tokens), path=path), model, data

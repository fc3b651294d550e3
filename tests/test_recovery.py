"""Recovery fine-tuning of converted models: it lowers the loss, distillation pulls towards the teacher, the token
accounting adds up, and bad arguments are refused."""

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mla_ref.convert import gqa_to_mla_exact, transmla_convert
from mla_ref.convert.model import convert_model
from mla_ref.data import load_corpus, validation_windows
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.recovery import (
    budget_steps,
    pretraining_tokens,
    recover,
    recovery_config,
    teacher_divergence,
)
from mla_ref.train import TEACHERS_DIR, TrainConfig, evaluate, read_record, train

SEQ = 32  # bytes per window in these tests
EVAL_TOKENS = 512


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small, very regular corpus that a tiny model learns quickly."""
    folder = tmp_path_factory.mktemp("recovery") / "corpus"
    folder.mkdir()
    lines = [f"def function_{i}(x):\n    return x + {i}\n" for i in range(40)]
    for j in range(8):
        (folder / f"module{j}.py").write_text("".join(lines[j::8]) * 4)
    return load_corpus(folder, val_fraction=0.25)


@pytest.fixture(scope="module")
def teacher(corpus):
    """A tiny GQA model trained in about a second to a low loss on the regular corpus: the source of the conversions."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_hidden=64, attention="gqa")
    )
    config = TrainConfig(steps=100, batch_size=8, seq_len=SEQ, lr=1e-2, warmup_steps=5, eval_every=0, eval_tokens=256)
    train(model, corpus, config, quiet=True)
    return model.eval()


@pytest.fixture
def damaged(teacher):
    """The teacher converted exactly to MLA, then deliberately damaged: noise on every latent down-projection."""
    model = convert_model(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.layers:
            weight = layer.self_attn.kv_a_proj_with_mqa.weight
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std())
    return model


def short_config(steps=20, **overrides):
    options = dict(batch_size=8, seq_len=SEQ, lr=3e-3, eval_tokens=EVAL_TOKENS)
    return recovery_config(steps, **{**options, **overrides})


def test_the_damage_is_real(teacher, damaged, corpus):
    windows = validation_windows(corpus.val, SEQ, EVAL_TOKENS)
    assert evaluate(damaged, windows).loss > evaluate(teacher, windows).loss + 0.3  # the noise costs > 0.3 nats


def test_finetune_lowers_the_loss_of_a_damaged_converted_model(teacher, damaged, corpus):
    windows = validation_windows(corpus.val, SEQ, EVAL_TOKENS)
    as_it_came = evaluate(damaged, windows).loss
    result = recover(damaged, corpus, short_config())  # next-byte cross entropy only, no teacher
    # "before" is the model as it came and "after" the model as it is now, on the same fixed slice
    # (fp32 sums of the same terms in the same order: 1e-6 relative)
    assert result.after.tokens == result.before.tokens == windows.shape[0] * SEQ
    torch.testing.assert_close(result.before.loss, as_it_came, rtol=1e-6, atol=0)
    torch.testing.assert_close(result.after.loss, evaluate(damaged, windows).loss, rtol=1e-6, atol=0)
    # 20 steps win back at least half of what the damage cost
    damage = result.before.loss - evaluate(teacher, windows).loss
    assert result.after.loss < result.before.loss - damage / 2
    assert not damaged.training  # left in eval mode


def test_finetune_of_a_compressed_conversion_lowers_its_loss(teacher, corpus):
    calibration = corpus.train[: 8 * SEQ].long().reshape(8, SEQ)  # (b, s) training bytes
    student = convert_model(
        teacher, lambda attention, x: transmla_convert(attention, x, kv_lora_rank=4, rope_dim=4), calibration
    )
    assert student.kv_cache_elements_per_token() * 4 == teacher.kv_cache_elements_per_token()  # a quarter
    result = recover(student, corpus, short_config(), teacher=teacher)
    windows = validation_windows(corpus.val, SEQ, EVAL_TOKENS)
    damage = result.before.loss - evaluate(teacher, windows).loss
    assert damage > 0.2  # a quarter of the cache costs something
    assert result.after.loss < result.before.loss - damage / 2  # and distillation wins at least half of it back


def test_distillation_pulls_the_students_predictions_towards_the_teachers(teacher, damaged, corpus):
    windows = validation_windows(corpus.val, SEQ, EVAL_TOKENS)
    before = teacher_divergence(damaged, teacher, windows)
    recover(damaged, corpus, short_config(distill_alpha=1.0), teacher=teacher)  # α = 1: the KL term alone
    after = teacher_divergence(damaged, teacher, windows)
    assert before > 0.1  # the damage shows in the predictions
    assert after < 0.25 * before  # at least divided by four
    assert teacher_divergence(teacher, teacher, windows) == pytest.approx(0.0, abs=1e-6)  # 0 for identical models


def test_attention_only_leaves_everything_else_as_it_was(damaged, corpus):
    frozen = {n: p.detach().clone() for n, p in damaged.named_parameters() if ".self_attn." not in n}
    attention = {n: p.detach().clone() for n, p in damaged.named_parameters() if ".self_attn." in n}
    recover(damaged, corpus, short_config(steps=3), trainable="attention")
    for name, p in damaged.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)  # bit for bit
        assert p.requires_grad, name  # gradients switched back on afterwards
    assert any(not torch.equal(p, attention[n]) for n, p in damaged.named_parameters() if n in attention)


def test_recovery_is_deterministic(damaged, corpus, teacher):
    a, b = copy.deepcopy(damaged), copy.deepcopy(damaged)
    recover(a, corpus, short_config(steps=4), teacher=teacher)
    recover(b, corpus, short_config(steps=4), teacher=teacher)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_token_accounting(damaged, corpus, tmp_path):
    record = {"tokens_seen": 160_000, "steps": 625}
    (tmp_path / "TRAINING.md").write_text("# Teacher\n\n## Record\n\n```json\n" + json.dumps(record) + "\n```\n")
    pretraining = pretraining_tokens(tmp_path)
    assert pretraining == 160_000
    config = short_config(steps=5)
    result = recover(damaged, corpus, config, pretraining_tokens=pretraining, max_fraction=0.01)
    assert result.tokens == 5 * 8 * SEQ == 1280
    torch.testing.assert_close(result.fraction_of_pretraining, 1280 / 160_000, rtol=1e-12, atol=0)
    assert recover(copy.deepcopy(damaged), corpus, short_config(steps=1)).fraction_of_pretraining is None


def test_the_shipped_teachers_record_their_pretraining_tokens():
    for name in ("mha", "gqa"):
        record = read_record(TEACHERS_DIR / name)
        tokens = pretraining_tokens(TEACHERS_DIR / name)
        assert tokens == record["steps"] * record["batch_size"] * record["seq_len"]


@given(
    fraction=st.floats(min_value=1e-3, max_value=1.0),
    pretraining=st.integers(min_value=10_000, max_value=10**9),
    batch_size=st.integers(min_value=1, max_value=64),
    seq_len=st.integers(min_value=1, max_value=512),
)
def test_budget_steps_is_the_most_that_fit(fraction, pretraining, batch_size, seq_len):
    per_step = batch_size * seq_len
    if fraction * pretraining < per_step:
        with pytest.raises(ValueError, match="less than one step"):
            budget_steps(fraction, pretraining, batch_size=batch_size, seq_len=seq_len)
        return
    steps = budget_steps(fraction, pretraining, batch_size=batch_size, seq_len=seq_len)
    assert steps * per_step <= fraction * pretraining < (steps + 1) * per_step


def test_bad_arguments_raise(damaged, teacher, corpus, tmp_path):
    config = short_config(steps=2)
    with pytest.raises(ValueError, match="student must be a TinyLM"):
        recover(gqa_to_mla_exact(teacher.layers[0].self_attn), corpus, config)
    with pytest.raises(ValueError, match="teacher must be a TinyLM"):
        recover(damaged, corpus, config, teacher="gqa")
    with pytest.raises(ValueError, match="teacher must be a different model"):
        recover(damaged, corpus, config, teacher=damaged)
    with pytest.raises(ValueError, match="config must be a TrainConfig"):
        recover(damaged, corpus, {"steps": 2})
    with pytest.raises(ValueError, match="trainable must be one of 'all', 'attention'"):
        recover(damaged, corpus, config, trainable="mlp")
    with pytest.raises(ValueError, match="pretraining_tokens must be a positive integer"):
        recover(damaged, corpus, config, pretraining_tokens=0)
    with pytest.raises(ValueError, match="max_fraction needs pretraining_tokens"):
        recover(damaged, corpus, config, max_fraction=0.02)
    with pytest.raises(ValueError, match=r"max_fraction must lie in \(0, 1\]"):
        recover(damaged, corpus, config, pretraining_tokens=10**6, max_fraction=2.0)
    # 2 steps · 8 · 32 = 512 tokens > 2% of 10,000 = 200: refused before any training, naming the allowed steps
    with pytest.raises(ValueError, match="more than max_fraction"):
        recover(damaged, corpus, config, pretraining_tokens=10_000, max_fraction=0.02)
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        budget_steps(0.0, 10**6, batch_size=8, seq_len=32)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        recovery_config(0)
    with pytest.raises(ValueError, match="has no TRAINING.md"):
        pretraining_tokens(tmp_path)
    (tmp_path / "TRAINING.md").write_text('## Record\n\n```json\n{"tokens_seen": -5}\n```\n')
    with pytest.raises(ValueError, match="positive integer tokens_seen"):
        pretraining_tokens(tmp_path)
    windows = validation_windows(corpus.val, SEQ, EVAL_TOKENS)
    with pytest.raises(ValueError, match=r"windows must be a non-empty \(n, s\) tensor"):
        teacher_divergence(damaged, teacher, windows[0])
    with pytest.raises(ValueError, match="temperature must be positive"):
        teacher_divergence(damaged, teacher, windows, temperature=0.0)

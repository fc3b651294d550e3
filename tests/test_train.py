"""Training, distillation and evaluation on tiny models; the train-teacher command; the shipped teachers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mla_ref import checkpoint
from mla_ref.cli.lab import evaluate_command, train_teacher_command
from mla_ref.data import load_corpus, validation_windows
from mla_ref.model import ModelConfig, TinyLM
from mla_ref.train import (
    TEACHERS_DIR,
    TrainConfig,
    distillation_loss,
    evaluate,
    hidden_state_loss,
    learning_rate,
    read_record,
    train,
)

TINY = dict(d_model=32, n_layers=1, n_heads=4, head_dim=8, mlp_hidden=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture
def text_corpus(tmp_path):
    """A small, very regular corpus that a tiny model learns quickly."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = [f"def function_{i}(x):\n    return x + {i}\n" for i in range(40)]
    for j in range(8):
        (folder / f"module{j}.py").write_text("".join(lines[j::8]) * 4)
    return load_corpus(folder, val_fraction=0.25)


def tiny_model(**overrides) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(ModelConfig(**{**TINY, **overrides}))


def test_learning_rate_warms_up_then_decays_along_a_cosine():
    schedule = dict(steps=100, lr=1e-3, warmup=10, min_ratio=0.1)
    lrs = [learning_rate(step, **schedule) for step in range(101)]
    torch.testing.assert_close(lrs[0], 1e-4, rtol=1e-12, atol=0)  # 1/10 of the way up
    torch.testing.assert_close(lrs[9], 1e-3, rtol=1e-12, atol=0)  # peak at the end of warm-up
    torch.testing.assert_close(lrs[55], 0.55e-3, rtol=1e-12, atol=0)  # cosine midpoint: halfway to the floor
    torch.testing.assert_close(lrs[100], 1e-4, rtol=1e-12, atol=0)  # ends at min_lr_ratio · lr
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    # with a time limit, progress is the larger of the steps done and the time spent: half the time is the midpoint
    torch.testing.assert_close(learning_rate(10, **schedule, time_used=0.5), 0.55e-3, rtol=1e-12, atol=0)
    assert learning_rate(55, **schedule, time_used=0.2) == lrs[55]  # the steps are further along
    assert learning_rate(20, **schedule, time_used=1.5) == lrs[100]  # past the limit: the floor


def test_a_few_steps_reduce_the_validation_loss(text_corpus):
    model = tiny_model()
    config = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=5, eval_every=20, eval_tokens=256)
    result = train(model, text_corpus, config, quiet=True)
    assert [h["step"] for h in result.history] == [0, 20, 40]
    first, last = result.history[0]["val_loss"], result.history[-1]["val_loss"]
    assert first > math.log(256) - 0.5  # an untrained byte model is close to uniform: ln 256 ≈ 5.55
    assert last < first - 1.0  # 40 steps on this regular text take off well over a nat
    assert result.tokens_seen == 40 * 8 * 32


def test_training_is_deterministic(text_corpus):
    config = TrainConfig(steps=5, batch_size=4, seq_len=16, eval_every=0, eval_tokens=64)
    a, b = tiny_model(), tiny_model()
    train(a, text_corpus, config, quiet=True)
    train(b, text_corpus, config, quiet=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_evaluation_numbers_are_consistent(text_corpus):
    model = tiny_model().eval()
    windows = validation_windows(text_corpus.val, seq_len=16, max_tokens=160)
    result = evaluate(model, windows, batch_size=3)
    assert result.tokens == windows.shape[0] * 16
    # float64 arithmetic on one float: exact up to rounding
    torch.testing.assert_close(result.perplexity, math.exp(result.loss), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.bits_per_byte, result.loss / math.log(2), rtol=1e-12, atol=0)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    direct = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    # fp32 sums in a different batching: ~1e-7 relative
    torch.testing.assert_close(result.loss, direct, rtol=1e-5, atol=0)
    assert evaluate(model, windows, batch_size=3) == result  # deterministic


def test_distillation_loss_parts():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 256), torch.randn(2, 5, 256)
    targets = torch.randint(0, 256, (2, 5))
    ce = F.cross_entropy(student.flatten(0, 1), targets.flatten())
    # α = 0 is the plain LM loss; a student equal to its teacher has zero KL.
    torch.testing.assert_close(distillation_loss(student, teacher, targets, alpha=0.0, temperature=2.0), ce)
    torch.testing.assert_close(distillation_loss(student, student, targets, alpha=0.3, temperature=2.0), 0.7 * ce)
    tau = 2.0
    p_t = F.softmax(teacher / tau, dim=-1)
    kl = (p_t * (p_t.log() - F.log_softmax(student / tau, dim=-1))).sum(-1).mean()
    mixed = distillation_loss(student, teacher, targets, alpha=0.5, temperature=tau)
    torch.testing.assert_close(mixed, 0.5 * ce + 0.5 * tau**2 * kl, rtol=1e-5, atol=1e-6)


def test_distillation_pulls_the_student_towards_the_teacher(text_corpus):
    teacher = tiny_model()
    train(teacher, text_corpus, TrainConfig(steps=30, batch_size=8, seq_len=32, eval_every=0), quiet=True)
    student = tiny_model(attention="mqa")
    windows = validation_windows(text_corpus.val, seq_len=32, max_tokens=256)

    def kl_to_teacher() -> float:
        with torch.no_grad():
            s, t = student(windows[:, :-1]), teacher(windows[:, :-1])
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean").item()

    before = kl_to_teacher()
    config = TrainConfig(steps=20, batch_size=8, seq_len=32, eval_every=0, distill_alpha=1.0, distill_temperature=1.0)
    train(student, text_corpus, config, teacher=teacher, quiet=True)
    assert kl_to_teacher() < 0.5 * before


def test_forward_hands_out_each_blocks_output():
    model = tiny_model(n_layers=3)
    tokens = torch.randint(0, 256, (2, 7))
    hidden: list[torch.Tensor] = []
    logits = model(tokens, hidden_states=hidden)
    assert [tuple(h.shape) for h in hidden] == [(2, 7, 32)] * 3
    # the last block's output is what the final norm and head read
    torch.testing.assert_close(model.lm_head(model.norm(hidden[-1])), logits, rtol=0, atol=0)
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)


def test_hidden_state_loss_is_the_summed_relative_error():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 5, 8), 3 * torch.randn(2, 5, 8)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    expected = sum(((s - t) ** 2).sum() / (t**2).sum() for s, t in zip(student, teacher, strict=True))
    torch.testing.assert_close(hidden_state_loss(student, teacher), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hidden_state_loss(teacher, teacher), torch.tensor(0.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one hidden state per block"):
        hidden_state_loss(student[:1], teacher)


def test_hidden_state_term_pulls_the_residual_stream_towards_the_teacher(text_corpus):
    teacher = tiny_model(n_layers=2)
    train(teacher, text_corpus, TrainConfig(steps=30, batch_size=8, seq_len=32, eval_every=0), quiet=True)
    windows = validation_windows(text_corpus.val, seq_len=32, max_tokens=256)[:, :-1]

    def hidden_error(student) -> float:
        with torch.no_grad():
            s_hidden, t_hidden = [], []
            student(windows, hidden_states=s_hidden)
            teacher(windows, hidden_states=t_hidden)
        return hidden_state_loss(s_hidden, t_hidden).item()

    errors = {}
    for beta in (0.0, 1.0):
        student = tiny_model(n_layers=2, attention="mqa")
        config = TrainConfig(steps=20, batch_size=8, seq_len=32, eval_every=0, distill_hidden_weight=beta)
        train(student, text_corpus, config, teacher=teacher, quiet=True)
        errors[beta] = hidden_error(student)
    # logits alone leave the residual stream free; the term ties it to the teacher's
    assert errors[1.0] < 0.5 * errors[0.0]


def test_bad_train_config_is_refused():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="distill_alpha must lie in"):
        TrainConfig(distill_alpha=1.5)
    with pytest.raises(ValueError, match="distill_hidden_weight must be ≥ 0"):
        TrainConfig(distill_hidden_weight=-1.0)


def test_train_teacher_command_writes_a_checkpoint_and_its_record(tmp_path, text_corpus, capsys):
    out = tmp_path / "teacher"
    argv = ["--attention", "gqa", "--out", str(out), "--steps", "3", "--seed", "7", "--corpus", text_corpus.root]
    argv += ["--d-model", "32", "--n-layers", "1", "--n-heads", "4", "--head-dim", "8", "--mlp-hidden", "64"]
    argv += ["--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64", "--eval-every", "2", "--quiet"]
    assert train_teacher_command(argv) == 0
    model = checkpoint.load(out)
    record = read_record(out)
    assert record["model_config"] == model.config.to_dict()
    assert model.config.attention == "gqa" and model.config.kv_heads == 1
    assert record["command"] == "python -m mla_ref train-teacher " + " ".join(argv)
    assert record["tokens_seen"] == 3 * 2 * 16
    assert [p["step"] for p in record["val_loss_curve"]] == [0, 2, 3]
    command_corpus = load_corpus(text_corpus.root)  # the command's default split: 5 % of files, seed 0
    assert record["corpus"]["val_sha256"] == command_corpus.val_sha256
    windows = validation_windows(command_corpus.val, 16, 64)
    # the record's numbers are those of the stored (bf16) weights, evaluated in fp32
    torch.testing.assert_close(evaluate(model, windows).loss, record["val_loss"], rtol=0, atol=1e-5)
    capsys.readouterr()
    assert train_teacher_command(argv) == 2  # refuses the now non-empty --out
    assert "pass --overwrite" in capsys.readouterr().err
    assert train_teacher_command([*argv, "--overwrite"]) == 0


def test_train_teacher_command_trains_an_mla_teacher_at_the_sizes_given(tmp_path, text_corpus, capsys):
    out = tmp_path / "mla"
    argv = ["--attention", "mla", "--kv-lora-rank", "6", "--rope-dim", "4", "--out", str(out), "--steps", "2"]
    argv += ["--corpus", text_corpus.root, "--d-model", "32", "--n-layers", "1", "--n-heads", "4", "--head-dim", "8"]
    argv += ["--mlp-hidden", "64", "--batch-size", "2", "--seq-len", "16", "--eval-tokens", "64", "--quiet"]
    assert train_teacher_command(argv) == 0
    config = checkpoint.load(out).config
    assert (config.attention, config.kv_lora_rank, config.qk_rope_head_dim) == ("mla", 6, 4)
    assert (config.qk_nope_head_dim, config.v_head_dim) == (8, 8)  # d_N = d_v = the head size
    assert read_record(out)["model_config"]["kv_lora_rank"] == 6
    capsys.readouterr()
    rest = ["--out", str(tmp_path / "other"), *argv[8:]]
    assert train_teacher_command(["--attention", "mla", *rest]) == 2  # no sizes
    assert "needs --kv-lora-rank (d_c) and --rope-dim (d_R)" in capsys.readouterr().err
    gqa = ["--attention", "gqa", "--kv-lora-rank", "6", *rest]
    assert train_teacher_command(gqa) == 2
    assert "size an MLA teacher; got --attention gqa" in capsys.readouterr().err


def test_eval_command_reports_the_evaluation(tmp_path, text_corpus, capsys):
    model = tiny_model(attention="mla", kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    checkpoint.save(model, tmp_path / "ckpt")
    argv = [str(tmp_path / "ckpt"), "--corpus", text_corpus.root, "--seq-len", "16", "--eval-tokens", "64"]
    assert evaluate_command([*argv, "--path", "absorbed"]) == 0
    expected = evaluate(model, validation_windows(load_corpus(text_corpus.root).val, 16, 64))
    assert f"loss {expected.loss:.4f} nats/byte, perplexity {expected.perplexity:.3f}" in capsys.readouterr().out
    assert evaluate_command([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_shipped_teacher_loads_and_matches_its_record(name):
    directory = TEACHERS_DIR / name
    model = checkpoint.load(directory)
    record = read_record(directory)
    # Fields added to the config since the record was written take their defaults.
    assert ModelConfig.from_dict(record["model_config"]) == model.config
    assert json.loads((directory / "config.json").read_text())["storage_dtype"] == record["storage_dtype"]
    assert record["parameters"] == model.num_parameters()
    assert record["tokens_seen"] == record["steps"] * record["batch_size"] * record["seq_len"]
    assert sum(p.stat().st_size for p in directory.iterdir()) <= 8 * 10**6
    # the record's own numbers agree with each other (rounded to 5 decimals when written)
    torch.testing.assert_close(record["val_perplexity"], math.exp(record["val_loss"]), rtol=1e-4, atol=0)
    torch.testing.assert_close(record["val_bits_per_byte"], record["val_loss"] / math.log(2), rtol=1e-4, atol=0)
    c = model.config
    assert (c.attention, c.n_heads, c.kv_heads) == {"mha": ("mha", 8, 8), "gqa": ("gqa", 8, 2)}[name]
    assert c.rope_layout == "rotate_half" and c.head_dim in (32, 64)


def test_shipped_teachers_share_width_and_depth():
    mha, gqa, mla = (checkpoint.read_config(TEACHERS_DIR / name)[0] for name in ("mha", "gqa", "mla"))
    keep = ("d_model", "n_layers", "n_heads", "head_dim", "mlp_hidden", "rope_theta", "rope_layout")
    assert (
        {k: getattr(mha, k) for k in keep} == {k: getattr(gqa, k) for k in keep} == {k: getattr(mla, k) for k in keep}
    )


def test_the_mla_teacher_caches_a_quarter_of_the_gqa_teachers_and_was_trained_alike():
    gqa, mla = (read_record(TEACHERS_DIR / name) for name in ("gqa", "mla"))
    config = checkpoint.read_config(TEACHERS_DIR / "mla")[0]
    gqa_config = checkpoint.read_config(TEACHERS_DIR / "gqa")[0]
    mla_elements = config.kv_lora_rank + config.qk_rope_head_dim  # d_c + d_R
    assert mla_elements * 4 == 2 * gqa_config.kv_heads * gqa_config.head_dim  # 25% of GQA's 2 n_kv d_h
    # the same recipe (the MLA record also holds a setting added since the GQA teacher was trained)
    assert {k: mla["train_config"][k] for k in gqa["train_config"]} == gqa["train_config"]
    assert mla["tokens_seen"] == gqa["tokens_seen"]
    assert mla["corpus"]["train_sha256"] == gqa["corpus"]["train_sha256"]
    # the record's numbers are those of the stored (bf16) weights, on the first eval_tokens validation bytes
    corpus = load_corpus()
    windows = validation_windows(corpus.val, 128, mla["train_config"]["eval_tokens"])
    torch.testing.assert_close(
        evaluate(checkpoint.load(TEACHERS_DIR / "mla"), windows).loss, mla["val_loss"], rtol=0, atol=1e-4
    )

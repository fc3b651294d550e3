"""Layer-by-layer recovery of a converted model, its global distillation with a time limit, and the ``recover``
command: every layer's error goes down, nothing else moves, the teacher stays as it was, the time limit holds, and
the command writes a complete OUT (or nothing, with one error line)."""

import copy
import dataclasses
import time

import pytest
import torch

from mla_ref import checkpoint
from mla_ref.attention import GroupedQueryAttention
from mla_ref.convert import convert_model_by_method
from mla_ref.data import load_corpus, validation_windows
from mla_ref.mla import MultiHeadLatentAttention
from mla_ref.model import TinyLM
from mla_ref.recovery import teacher_divergence
from mla_ref.recovery.distill import compare_with_teacher, recover_distill
from mla_ref.recovery.layerwise import recover_layerwise
from mla_ref.recovery.steps import balance_latent
from mla_ref.train import TEACHERS_DIR, evaluate

SEQ = 64  # tokens (bytes) per window in these tests
TRAINED = 28  # of the 32 calibration windows, those trained on (the last eighth checks each layer's training)
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread (conftest)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def teacher():
    """The shipped GQA teacher (4 layers, 8 query heads over 2 KV heads of 32): a source with a real loss."""
    return checkpoint.load(TEACHERS_DIR / "gqa").eval()


@pytest.fixture(scope="module")
def calibration(corpus):
    """32 windows of the train split: (32, SEQ) bytes as token ids."""
    return corpus.train[: 32 * SEQ].long().reshape(32, SEQ)


@pytest.fixture(scope="module")
def held_out(corpus):
    """8 windows of the validation split with their next bytes: (8, SEQ + 1)."""
    return validation_windows(corpus.val, SEQ, 8 * SEQ)


@pytest.fixture(scope="module")
def converted(teacher, calibration):
    """The teacher at a quarter of its cache by mla_ref's recipe (32 of 128 elements), as `convert` makes it."""
    torch.set_num_threads(1)
    model = convert_model_by_method(teacher, "recipe", calibration, budget=0.25)
    assert model.kv_cache_elements_per_token() * 4 == teacher.kv_cache_elements_per_token()
    return model.eval()


@pytest.fixture
def student(converted):
    return copy.deepcopy(converted)


def layerwise(student, teacher, calibration, **overrides):
    # E_l alone (first_weight 0) unless a test asks: the figures below are E_l's
    options = dict(steps=25, lr=1e-3, batch_tokens=8 * SEQ, seed=0, first_weight=0.0)
    return recover_layerwise(student, teacher, calibration, **{**options, **overrides})


def test_layerwise_lowers_every_layers_error(student, teacher, calibration, held_out):
    result = layerwise(student, teacher, calibration, held_out=held_out[:, :-1])
    assert [layer.layer for layer in result.layers] == [0, 1, 2, 3]
    for layer in result.layers:
        # measured: the recipe, fit on these very windows, starts at E_l 0.13–0.22 on them (0.20–0.36 held out);
        # 25 steps bring each layer to 0.50–0.71 of that, and to 0.63–0.79 on held-out text
        assert layer.error_before > 0.1, layer
        assert layer.error_after < 0.75 * layer.error_before, layer
        assert layer.held_out_after < 0.85 * layer.held_out_before, layer
        assert layer.steps == 25
    assert result.trained_tokens == 4 * 25 * 8 * SEQ
    assert result.measured_tokens == TRAINED * SEQ
    assert not any(layer.reverted for layer in result.layers)
    assert result.calibration_tokens == calibration.numel()
    assert not result.time_limited
    assert not student.training


def test_the_reported_error_is_the_layers_error_on_the_teachers_inputs(student, teacher, calibration):
    """E_l recomputed independently: the teacher's attention inputs (after its input norm) and outputs, on the
    windows trained on (all but the last eighth, the check windows)."""
    result = layerwise(student, teacher, calibration, steps=3)
    inputs = teacher.attention_inputs(calibration[:TRAINED])  # one (n, s, D) per layer
    with torch.no_grad():
        for layer, x in zip(result.layers, inputs, strict=True):
            target = teacher.layers[layer.layer].self_attn(x)
            output = student.layers[layer.layer].self_attn(x)
            expected = ((output - target).pow(2).sum() / target.pow(2).sum()).item()
            # fp32 forwards in chunks of different sizes against one fp64 sum: 1e-4 relative
            assert layer.error_after == pytest.approx(expected, rel=1e-4)


def test_layerwise_on_the_students_own_inputs(student, teacher, calibration):
    """inputs="student": layer l reads the student's stream (its earlier layers as trained), against the same target."""
    result = layerwise(student, teacher, calibration, inputs="student")
    assert result.inputs == "student"
    student_inputs = student.attention_inputs(calibration[:TRAINED])  # the stream through the layers as they ended
    teacher_inputs = teacher.attention_inputs(calibration[:TRAINED])
    with torch.no_grad():
        for layer, x, x_teacher in zip(result.layers, student_inputs, teacher_inputs, strict=True):
            target = teacher.layers[layer.layer].self_attn(x_teacher)
            output = student.layers[layer.layer].self_attn(x)
            expected = ((output - target).pow(2).sum() / target.pow(2).sum()).item()
            assert layer.error_after == pytest.approx(expected, rel=1e-4)  # as in the teacher-input test
            assert layer.error_after < 0.75 * layer.error_before, layer


def first_position_error(student, teacher, tokens) -> list[float]:
    """E_l,0 of every layer: the relative error at each window's first position, on the teacher's inputs."""
    with torch.no_grad():
        inputs = teacher.attention_inputs(tokens)
        errors = []
        for own, layer, x in zip(student.layers, teacher.layers, inputs, strict=True):
            y = layer.self_attn(x)[:, 0]
            errors.append(((own.self_attn(x)[:, 0] - y).pow(2).sum() / y.pow(2).sum()).item())
    return errors


def test_weighting_the_first_position_lowers_its_error(converted, teacher, calibration):
    """The first position (a real model's attention sink) weighs 1/s of a window's error unless weighted up."""
    plain, weighted = copy.deepcopy(converted), copy.deepcopy(converted)
    layerwise(plain, teacher, calibration, first_weight=0.0)
    result = layerwise(weighted, teacher, calibration, first_weight=1.0)
    # a layer whose E + E_0 rose on the 4 check windows is put back as it was (measured: layer 0 here)
    trained = [layer.layer for layer in result.layers if not layer.reverted]
    assert len(trained) >= 3, result.layers
    without = first_position_error(plain, teacher, calibration[:TRAINED])
    with_weight = first_position_error(weighted, teacher, calibration[:TRAINED])
    for index in trained:
        # measured: 0.35–0.53 of the error without the weight after 25 steps
        assert with_weight[index] < 0.65 * without[index], (index, with_weight, without)
    with pytest.raises(ValueError, match="first_weight must be a non-negative number"):
        layerwise(plain, teacher, calibration, first_weight=-1.0)


def test_a_layer_that_training_makes_worse_keeps_its_weights(student, teacher, calibration):
    """A learning rate far too large wrecks every layer on the check windows: each is put back as it was."""
    reference = copy.deepcopy(student)
    result = layerwise(student, teacher, calibration, steps=3, lr=0.5)
    assert all(layer.reverted for layer in result.layers)
    for layer in result.layers:
        assert layer.error_after == pytest.approx(layer.error_before, rel=1e-5)
    with torch.no_grad():  # balanced, then put back: the same function to fp32 rounding
        torch.testing.assert_close(student(calibration[:2]), reference(calibration[:2]), rtol=1e-4, atol=1e-4)


def test_only_the_attention_layers_move_and_the_teacher_stays(student, teacher, calibration):
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    kept = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("kv_a_proj_with_mqa.weight")}
    moved = {n: p.detach().clone() for n, p in student.named_parameters() if n.endswith("self_attn.q_proj.weight")}
    teacher_state = {n: t.clone() for n, t in teacher.state_dict().items()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    result = layerwise(student, teacher, calibration, steps=10, keep=("kv_a_proj_with_mqa.weight",))
    for name, p in student.named_parameters():
        if name in frozen or name in kept:
            assert torch.equal(p, {**frozen, **kept}[name]), name  # bit for bit
        assert p.requires_grad == flags[name], name  # gradient switches as they were
        assert p.grad is None, name
    trained = [f"layers.{layer.layer}.self_attn.q_proj.weight" for layer in result.layers if not layer.reverted]
    assert trained and all(not torch.equal(dict(student.named_parameters())[n], moved[n]) for n in trained)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, teacher_state[name]), name


@pytest.mark.parametrize("latent_norm", [False, True])
def test_balancing_the_latent_keeps_the_function_and_gives_unit_scale(latent_norm):
    torch.manual_seed(0)
    attention = MultiHeadLatentAttention(
        32, 4, 12, 8, 4, 8, latent_norm=latent_norm, bias=True, rope_layout="rotate_half"
    )
    with torch.no_grad():  # latent coordinates at scales from 0.1 to 100, as a conversion leaves them
        scale = torch.logspace(-1, 2, 12)
        attention.kv_a_proj_with_mqa.weight[:12].mul_(scale[:, None])
        attention.kv_a_proj_with_mqa.bias.normal_()
        if latent_norm:
            attention.kv_a_layernorm.weight.copy_(scale)
    x = torch.randn(3, 10, 32)
    with torch.no_grad():
        before = attention(x)
        sigma = balance_latent(attention, x)
        after = attention(x)
        latent = attention.kv_a_proj_with_mqa(x)[..., :12]
        latent = attention.kv_a_layernorm(latent) if latent_norm else latent
    assert sigma.shape == (12,) and sigma.max() / sigma.min() > 100  # it had something to balance
    # a change of basis of the latent: the same outputs to fp32 rounding, and every coordinate at RMS 1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent.pow(2).mean((0, 1)).sqrt(), torch.ones(12), rtol=1e-5, atol=0)
    assert balance_latent(GroupedQueryAttention(32, 4, 2, 8), x) is None  # a GQA layer has no latent to balance


def test_the_same_seed_gives_the_same_weights(converted, teacher, calibration):
    a, b = copy.deepcopy(converted), copy.deepcopy(converted)
    layerwise(a, teacher, calibration, steps=3)
    layerwise(b, teacher, calibration, steps=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_the_time_limit_stops_it(student, teacher, calibration):
    start = time.perf_counter()
    result = layerwise(student, teacher, calibration, steps=100_000, time_limit_s=3.0)
    wall = time.perf_counter() - start
    assert result.time_limited
    assert all(layer.steps < 100_000 for layer in result.layers) and result.steps > 0
    # the limit covers the whole run; one step and the last layer's measurement may run past it (on a busy CPU
    # a few tenths of a second)
    assert wall < 3.0 + 1.5, wall
    assert result.wall_seconds == pytest.approx(wall, abs=0.2)


def test_layerwise_on_cuda_matches_the_cpu_run(converted, teacher, calibration):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the device path runs only where torch sees a GPU")
    on_cpu, on_gpu = copy.deepcopy(converted), copy.deepcopy(converted)
    cpu = layerwise(on_cpu, teacher, calibration, steps=5)
    gpu = layerwise(on_gpu, teacher, calibration, steps=5, device="cuda")
    assert gpu.device.startswith("cuda")
    assert next(on_gpu.parameters()).device.type == "cpu"  # the layers came back
    assert next(teacher.parameters()).device.type == "cpu"
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        # the same batches (sampled on the CPU), different kernels: the errors agree to a few percent
        assert b.error_after == pytest.approx(a.error_after, rel=0.05)
        assert b.error_after < b.error_before


def test_bad_arguments_are_refused(student, teacher, calibration):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        layerwise(student, teacher, calibration, steps=0)
    with pytest.raises(ValueError, match=r"lr must lie in \(0, 1\)"):
        layerwise(student, teacher, calibration, lr=0.0)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        layerwise(student, teacher, calibration, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"is_available\(\) is False"):
            layerwise(student, teacher, calibration, device="cuda")
    with pytest.raises(ValueError, match="inputs must be one of 'teacher', 'student'; got 'both'"):
        layerwise(student, teacher, calibration, inputs="both")
    with pytest.raises(ValueError, match="time_limit_s must be a positive number"):
        layerwise(student, teacher, calibration, time_limit_s=0)
    with pytest.raises(ValueError, match=r"tokens must be a non-empty \(n, s\) tensor"):
        layerwise(student, teacher, calibration[0])
    with pytest.raises(ValueError, match=r"holds ids outside \[0, 256\)"):
        layerwise(student, teacher, calibration + 256)
    with pytest.raises(ValueError, match="keep names \\['nope'\\]"):
        layerwise(student, teacher, calibration, keep=("nope",))
    with pytest.raises(ValueError, match="teacher must be a different model"):
        layerwise(student, student, calibration)
    shallow = TinyLM(dataclasses.replace(teacher.config, n_layers=3))
    with pytest.raises(ValueError, match="student and teacher must share n_layers: the student has 4, the teacher 3"):
        layerwise(student, shallow, calibration)


def test_distillation_lowers_the_kl_and_moves_only_attention(student, teacher, corpus, held_out):
    windows = corpus.train[: 32 * (SEQ + 1)].long().reshape(32, SEQ + 1)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".self_attn." not in n}
    before = teacher_divergence(student, teacher, held_out)
    result = recover_distill(student, teacher, windows, steps=8, lr=3e-4, batch_tokens=8 * SEQ)
    assert result.steps == 8 and result.trained_tokens == 8 * 8 * SEQ and not result.time_limited
    assert teacher_divergence(student, teacher, held_out) < 0.92 * before  # measured: 0.85 × in 8 steps
    for name, p in student.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    limited = recover_distill(student, teacher, windows, steps=100_000, lr=1e-4, batch_tokens=SEQ, time_limit_s=1.0)
    assert limited.time_limited and 0 < limited.steps < 100_000 and limited.wall_seconds < 2.0


def test_the_comparison_agrees_with_evaluate_and_teacher_divergence(converted, teacher, held_out):
    result = compare_with_teacher(teacher, {"converted": converted}, held_out, batch_tokens=3 * SEQ)
    assert result["teacher"].kl_to_teacher == 0.0
    # the same sums in other chunks: fp32 logits, fp64 totals; 1e-5 relative
    assert result["teacher"].loss == pytest.approx(evaluate(teacher, held_out).loss, rel=1e-5)
    assert result["converted"].loss == pytest.approx(evaluate(converted, held_out).loss, rel=1e-5)
    assert result["converted"].kl_to_teacher == pytest.approx(
        teacher_divergence(converted, teacher, held_out), rel=1e-5
    )
    assert result["converted"].tokens == held_out.shape[0] * SEQ

"""What the conversion side computes stays what it computed: the weights that ``convert`` and ``recover`` write for the
GQA teacher (Llama layout) are compared with digests recorded once, so moving code between modules can change no
result without a test saying so.

Bit-identical weights can be expected only where torch runs the same CPU kernels as when the digests were recorded
(``RECORDED_ON``): elsewhere (another CPU's vector width, ``ATEN_CPU_CAPABILITY``, another torch) floating-point sums
round differently, and the written model's perplexity on the validation text must then agree to 4 significant
digits instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from mla_ref.__main__ import main
from mla_ref.pipelines.convert import ConvertOptions, convert_checkpoint
from mla_ref.pipelines.recover import RecoverOptions, recover_checkpoint
from mla_ref.train import TEACHERS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread (conftest)

RECORDED_ON = {"torch": "2.14.1", "cpu_capability": "AVX512"}
SMALL = dict(calib_tokens=512, eval_tokens=512, seq_len=64)  # the fewest tokens the recipe's refit takes
# name -> (options, SHA-256 of the written weights, perplexity of the written model on the evaluation tokens)
CONVERSIONS: dict[str, tuple[dict, str, float]] = {
    "recipe-0.5": (
        dict(budget=0.5),
        "91a2f3bdfc928ce0c3f1451eef6edcdeb3c1b430ef490edf0c03deb09aeead0d",
        8.678797218983322,
    ),
    "recipe-0.25": (
        dict(budget=0.25),
        "a13cab8ee9b46f5fe3923feb0a16fb6c684eafa8676b0d8e8d1a7e8e5646df18",
        9.400581340133582,
    ),
    "transmla-0.5": (
        dict(method="transmla", budget=0.5),
        "c9c4adb1995f5b5edd538a8cd188d8c254b2e151c69abaf6ec8ca72bf8b088a8",
        5.863094830661124,
    ),
    "transmla-0.25": (
        dict(method="transmla", budget=0.25),
        "9136dd0b30b18690e06b194f6faa715de4dad9e1151d5b5f4557704f45568802",
        9.380140770593853,
    ),
    "mha2mla-0.5": (
        dict(method="mha2mla", budget=0.5, format="mla-ref"),
        "9bd089370bbc8ed9f67f890d8ddcf66a79de4cca1d3daf16e71d26623fd1a95c",
        4.860328687040403,
    ),
    "mha2mla-0.25": (
        dict(method="mha2mla", budget=0.25, format="mla-ref"),
        "d6ee0bccf783574606fb9a62c043fcdc33402898e6ae1571dc087da372000bb9",
        11.129142493286759,
    ),
}
RECOVERED = (
    "f5714d1050baece91b5532635d51937a215fa8a72de5f0e491331ceeef194cde",
    9.09706454611838,
)  # recipe-0.25 recovered layerwise, seed 0
RECOVER_OPTIONS = dict(tokens=1024, steps=3, batch_tokens=128, eval_tokens=512, seq_len=64, seed=0)


def same_kernels() -> bool:
    return (
        torch.__version__.split("+")[0] == RECORDED_ON["torch"]
        and torch.backends.cpu.get_cpu_capability() == RECORDED_ON["cpu_capability"]
    )


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def assert_unchanged(name: str, directory: Path, perplexity: float, recorded: tuple[str, float]) -> None:
    digest, recorded_perplexity = recorded
    if same_kernels():
        assert weights_digest(directory) == digest, f"{name}: the written weights changed"
    # 4 significant digits: what a reordering of floating-point sums may move, and no real change would leave
    assert f"{perplexity:.4g}" == f"{recorded_perplexity:.4g}", (name, perplexity, recorded_perplexity)


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digests") / "teacher-llama"
    assert main(["export", str(TEACHERS_DIR / "gqa"), str(out), "--format", "llama"]) == 0
    return out


@pytest.fixture(scope="module")
def converted(llama_teacher) -> dict[str, tuple[Path, float]]:
    """name -> (written directory, perplexity of the written model)."""
    done = {}
    for name, (options, _, _) in CONVERSIONS.items():
        out = llama_teacher.parent / name
        report = convert_checkpoint(llama_teacher, out, ConvertOptions(**options, **SMALL))
        done[name] = (out, list(report.quality.values())[-1].perplexity)
    return done


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_convert_writes_the_recorded_weights(converted, name):
    directory, perplexity = converted[name]
    assert_unchanged(name, directory, perplexity, CONVERSIONS[name][1:])


def test_recover_writes_the_recorded_weights(converted, llama_teacher):
    out = llama_teacher.parent / "recovered"
    report = recover_checkpoint(converted["recipe-0.25"][0], out, RecoverOptions(**RECOVER_OPTIONS), force=True)
    assert_unchanged("recovered", out, report.quality["recovered"].perplexity, RECOVERED)


def test_convert_on_a_missing_gpu_is_refused_before_any_work(llama_teacher, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here: --device cuda is allowed")
    argv = ["convert", str(llama_teacher), str(tmp_path / "out"), "--budget", "0.5", "--device", "cuda"]
    assert main(argv) == 2
    assert "--device 'cuda' asked for, but torch sees no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the device path runs only where torch sees a GPU"
)
def test_convert_on_the_gpu_matches_the_cpu(converted, llama_teacher):
    # each layer's solves run on the GPU, whose kernels round differently: the same conversion up to that rounding
    out = llama_teacher.parent / "recipe-0.25-cuda"
    report = convert_checkpoint(llama_teacher, out, ConvertOptions(budget=0.25, device="cuda", **SMALL))
    _, perplexity_on_cpu = converted["recipe-0.25"]
    assert abs(list(report.quality.values())[-1].perplexity / perplexity_on_cpu - 1) < 0.01

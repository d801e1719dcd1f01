"""ModelSource.check: a broken model directory fails fast, before any weight is read, with a message naming the
file and the problem. Each case copies the real SmolLM2 directory and breaks one thing."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from raytp.model.layout import Slice
from raytp.weights.checkpoint import SafetensorsReader
from raytp.weights.source import ModelSource
from tests.util import RAYTP_ENV, raytp_command

LAYER0_Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def model_copy(smollm2_dir, tmp_path):
    """A copy of SmolLM2's directory to break; the weights are linked, not copied, unless a test rewrites them."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in smollm2_dir.iterdir():
        (copy / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, copy / f.name)
    return copy


def _check_fails(path, *fragments):
    with pytest.raises(ValueError) as e:
        ModelSource.parse(str(path)).check()
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def bytes_read_by_this_process() -> int:
    """Linux's count of bytes this process read through read() calls, page cache included."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def test_intact_model_passes_reading_headers_not_weights(smollm2_dir):
    source = ModelSource.parse("smollm2")
    before = bytes_read_by_this_process()
    source.check()
    read = bytes_read_by_this_process() - before
    weights = sum(f.stat().st_size for f in smollm2_dir.glob("*.safetensors"))
    assert read < weights / 50, f"check() read {read} bytes of a {weights}-byte model"  # config, tokenizer, headers
    assert source.tokenizer_dir == smollm2_dir and not source.is_synthetic
    assert ModelSource.parse("synthetic:tiny").tokenizer_dir is None


def test_bad_json_names_the_file_and_line(model_copy):
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 49152,', '"vocab_size": 49152'))
    _check_fails(model_copy, "config.json", "line 7")


def test_unknown_architecture(model_copy):
    config = model_copy / "config.json"
    config.write_text(config.read_text().replace('"model_type": "llama"', '"model_type": "gpt2"'))
    _check_fails(model_copy, "config.json", "model_type='gpt2'")


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    _check_fails(model_copy, "tokenizer.json", str(model_copy))


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) - 1000])
    _check_fails(model_copy, "model.safetensors", "truncated")


def _rewrite_weights(model_copy, change):
    weights = model_copy / "model.safetensors"
    tensors = change(load_file(weights))
    weights.unlink()
    save_file(tensors, weights)


def test_misshaped_tensor(model_copy):
    _rewrite_weights(model_copy, lambda t: t | {LAYER0_Q: torch.zeros(576, 575, dtype=torch.bfloat16)})
    _check_fails(model_copy, LAYER0_Q, "(576, 575)", "(576, 576)")


def test_missing_tensor(model_copy):
    _rewrite_weights(model_copy, lambda t: {k: v for k, v in t.items() if k != LAYER0_Q})
    _check_fails(model_copy, LAYER0_Q, "no tensor")


def test_reader_reads_and_counts_only_the_slice_bytes(tmp_path):
    save_file({"w": torch.arange(12.0).view(4, 3)}, tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path, torch.float32, torch.device("cpu"), progress=True) as reader:
        got = reader.read(Slice("w", (4, 3), range(1, 3), range(2, 3)))
        assert got.tolist() == [[5.0], [8.0]] and reader.bar.n == 2 * 4  # two float32 values read
        with pytest.raises(ValueError, match=r"'w' .* has shape \(4, 3\), config.json implies \(3, 4\)"):
            reader.read(Slice("w", (3, 4), range(3)))


def test_reader_refuses_nan_and_inf_naming_the_tensor(tmp_path):
    w = torch.ones(4, 3)
    w[2, 1], w[3, 0] = float("nan"), float("inf")
    save_file({"w": w, "big": torch.full((2, 2), 1e30)}, tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path, torch.float32, torch.device("cpu")) as reader:
        assert reader.read(Slice("w", (4, 3), range(0, 2))).tolist() == [[1.0] * 3] * 2  # this slice is clean
        with pytest.raises(ValueError, match=r"tensor 'w' in .*model.safetensors holds 1 NaN and 1 Inf values; "
                                             r"the checkpoint is corrupt"):
            reader.read(Slice("w", (4, 3), range(0, 4)))
    with SafetensorsReader(tmp_path, torch.float16, torch.device("cpu")) as reader:
        with pytest.raises(ValueError, match=r"tensor 'big' .* holds 0 NaN and 4 Inf values; its values overflow "
                                             r"torch.float16"):
            reader.read(Slice("big", (2, 2), range(0, 2)))


def test_reader_refuses_float8_where_the_config_says_unquantized(tmp_path):
    """A module the quantization_config does not name (a fine-grained FP8 router, say) read as a dense weight would
    lose its scales: refused, naming the tensor."""
    save_file({"gate": torch.ones(4, 3).to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path, torch.float32, torch.device("cpu")) as reader:
        assert reader.read(Slice("gate", (4, 3), range(4)), stored=True).dtype == torch.float8_e4m3fn
        with pytest.raises(ValueError, match=r"tensor 'gate' in .* is stored in torch.float8_e4m3fn, but config.json"):
            reader.read(Slice("gate", (4, 3), range(4)))


@pytest.mark.slow
def test_generate_on_nan_weights_prints_one_line(ray_head, model_copy):
    """A NaN in one weight: `raytp generate` names the tensor in one line instead of sampling from NaN logits."""
    def poison(tensors):
        tensors[LAYER0_Q] = tensors[LAYER0_Q].clone()
        tensors[LAYER0_Q][5, 7] = float("nan")
        return tensors

    _rewrite_weights(model_copy, poison)
    run = subprocess.run(raytp_command("generate", "--model", str(model_copy), "--devices", "cpu@2GiB,cpu@1GiB",
                                       "--prompt", "Hello", "--max-tokens", "4", "--address", ray_head.address),
                         capture_output=True, text=True, timeout=300, env=RAYTP_ENV)
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert errors == [f"raytp: error: tensor {LAYER0_Q!r} in {model_copy / 'model.safetensors'} holds 1 NaN and 0 "
                      "Inf values; the checkpoint is corrupt: re-download or re-convert it"], run.stderr[-3000:]

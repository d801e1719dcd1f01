"""The checkpoints the tests have llmcompressor make, all in one llmcompressor run (its environment's start-up and
imports alone cost tens of seconds on 2 cores).

A test module declares its own in a module attribute `LLMCOMPRESSED = {name: Checkpoint(build, schemes)}`; SmolLM2's
are those `raytp pull smollm2 --quant` makes. `make_all` builds each float checkpoint, makes what is missing in one run
and returns {name: a directory holding SCHEME/ for each scheme}. The checkpoints are kept in
raytp_home()/cache/llmcompressor/NAME-KEY, KEY a hash of llmcompressor's script, its environment's packages, the
schemes and every file of the float checkpoint: a change to any of them makes them again. SmolLM2's land where
`raytp pull` keeps them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raytp.weights.smollm2 import pull_smollm2, raytp_home
from raytp.weights.smollm2_quantized import (SCRIPT, Quantization, install_smollm2, llmcompressor_python,
                                             quantize_with_llmcompressor, smollm2_quantization)


@dataclass(frozen=True)
class Checkpoint:
    """A float checkpoint that `build` writes into the directory it is given (tokenizer files included, seeded: the
    same files every time), and the schemes llmcompressor makes of it."""

    build: Callable[[Path], None]
    schemes: tuple[str, ...]


def add_smollm2_tokenizer(model_dir: Path) -> None:
    """SmolLM2's tokenizer files copied into `model_dir`: its 49152 tokens calibrate GPTQ."""
    for f in pull_smollm2(progress=False).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, model_dir / f.name)


def _key(checkpoint: Checkpoint, source: Path, environment: str) -> str:
    digest = hashlib.sha256(environment.encode())
    digest.update(",".join(checkpoint.schemes).encode())
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f"\0{f.relative_to(source)}\0".encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _environment(python: Path) -> str:
    """llmcompressor's script and the packages of its environment, names and versions."""
    packages = sorted(p.name for p in python.parents[1].glob("lib/python*/site-packages/*.dist-info"))
    return SCRIPT.read_text() + "\n".join(packages)


def make_all(checkpoints: dict[str, Checkpoint], smollm2_schemes: tuple[str, ...]) -> dict[str, Path]:
    """{name: its directory of SCHEME/ directories} for every checkpoint, and SmolLM2 pulled in `smollm2_schemes`,
    what is missing made in one llmcompressor run."""
    cache = raytp_home() / "cache" / "llmcompressor"
    cache.mkdir(parents=True, exist_ok=True)
    environment = _environment(llmcompressor_python(progress=False))
    made: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=cache, prefix=".making-") as tmp:
        jobs = []
        for name, checkpoint in checkpoints.items():
            source = Path(tmp) / f"{name}-float"
            checkpoint.build(source)
            made[name] = cache / f"{name}-{_key(checkpoint, source, environment)}"
            if not made[name].is_dir():
                jobs.append((made[name], Quantization(source, Path(tmp) / name, checkpoint.schemes)))
        smollm2 = smollm2_quantization(smollm2_schemes, Path(tmp) / "smollm2", progress=False)
        if jobs or smollm2:
            quantize_with_llmcompressor(*(job for _, job in jobs), *([smollm2] if smollm2 else []), progress=False)
        for place, job in jobs:
            if not place.is_dir():  # else another run finished first: keep its copy
                os.rename(job.out, place)
        if smollm2:
            install_smollm2(smollm2)
    return made

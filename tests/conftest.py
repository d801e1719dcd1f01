"""Shared fixtures. The SmolLM2 fixtures download ~93 MB once into RAYTP_HOME (default ~/.cache/raytp)."""

from pathlib import Path

import pytest

from raytp.weights.smollm2 import pull_smollm2, smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct Hugging Face directory."""
    return pull_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The original GGUF, for transformers to load as an independent reference."""
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def quantized_smollm2() -> dict[str, Path]:
    """SmolLM2 quantized by llmcompressor in every scheme raytp pulls: made once into RAYTP_HOME (the first time
    installs llmcompressor into its own virtual environment, about a minute, and runs GPTQ, about 90 s)."""
    from raytp.weights.smollm2_quantized import SCHEMES, pull_quantized_smollm2

    return dict(zip(SCHEMES, pull_quantized_smollm2(*SCHEMES, progress=False)))

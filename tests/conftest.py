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

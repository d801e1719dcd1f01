"""Shared fixtures. The SmolLM2 fixtures download ~93 MB once into RAYTP_HOME (default ~/.cache/raytp).

What costs tens of seconds on 2 cores is made once per run: the Ray head that the CLI, bench and serve tests join
with --address (tests of the Ray that raytp starts itself - loopback only, token auth, SIGTERM - start their own),
the server that the API, browser and idle tests share, the process that runs every Triton-interpreter check, and
the one llmcompressor invocation that makes every quantized checkpoint (cached on disk across runs)."""

import signal
from pathlib import Path

import pytest

from raytp.weights.smollm2 import pull_smollm2, smollm2_gguf_path
from raytp.weights.smollm2_quantized import SCHEMES, pull_quantized_smollm2
from tests.llmcompressed import Checkpoint, make_all
from tests.triton_interpreter import run_interpreted
from tests.util import SERVED_API_KEY, RayHead, ray_head_process, running_server


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct Hugging Face directory."""
    return pull_smollm2()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The original GGUF, for transformers to load as an independent reference."""
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def llmcompressed(request) -> dict[str, Path]:
    """{name: its directory of SCHEME/ directories} for the LLMCOMPRESSED checkpoints of every module with a
    collected test, made with SmolLM2's (if a collected test uses quantized_smollm2) in one llmcompressor run
    (tests/llmcompressed.py). The first time installs llmcompressor into its own virtual environment, about a minute;
    SmolLM2's GPTQ takes about 90 s."""
    items = request.session.items
    checkpoints: dict[str, Checkpoint] = {}
    for module in dict.fromkeys(getattr(item, "module", None) for item in items):
        declared = getattr(module, "LLMCOMPRESSED", {})
        assert not declared.keys() & checkpoints.keys(), f"{module.__name__} reuses a name: {sorted(declared)}"
        checkpoints |= declared
    smollm2 = SCHEMES if any("quantized_smollm2" in item.fixturenames for item in items) else ()
    return make_all(checkpoints, smollm2)


@pytest.fixture(scope="session")
def quantized_smollm2(llmcompressed) -> dict[str, Path]:
    """SmolLM2 quantized by llmcompressor in every scheme raytp pulls, where `raytp pull smollm2 --quant` keeps
    them (made in the run's one llmcompressor invocation)."""
    return dict(zip(SCHEMES, pull_quantized_smollm2(*SCHEMES, progress=False)))


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> RayHead:
    with ray_head_process(tmp_path_factory.mktemp("ray-head") / "ray-start.log") as head:
        yield head


@pytest.fixture(scope="session")
def shared_server(ray_head, smollm2_dir, tmp_path_factory):
    """(process, base URL) of `raytp serve` (SERVED_DEVICES, --api-key SERVED_API_KEY, --max-queue 0: a 9th
    concurrent request is already one too many) on the session's Ray head. Stopped at the end of the run with
    SIGINT, as a person stops it with Ctrl-C (once serving, SIGTERM takes the same handler): the exit must be clean
    and leave no shared memory behind."""
    log = tmp_path_factory.mktemp("shared-serve") / "serve.log"
    with running_server(log, "--api-key", SERVED_API_KEY, "--max-queue", "0", "--address", ray_head.address,
                        stop_signal=signal.SIGINT, api_key=SERVED_API_KEY) as served:
        yield served


@pytest.fixture(scope="session")
def _interpreted_checks(request) -> dict[str, tuple[str, str]]:
    """Every collected test's @pytest.mark.triton_interpreter(SCRIPT), run in one process on first use."""
    marks = (item.get_closest_marker("triton_interpreter") for item in request.session.items)
    return run_interpreted(list(dict.fromkeys(m.args[0] for m in marks if m)))


@pytest.fixture
def interpreted(request, _interpreted_checks) -> tuple[str, str]:
    """(what this test's triton_interpreter script printed, its traceback or "" if it passed)."""
    return _interpreted_checks[request.node.get_closest_marker("triton_interpreter").args[0]]

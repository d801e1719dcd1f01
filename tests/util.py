"""Helpers shared by the tests that start Ray clusters and servers."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from raytp.weights.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What raytp's processes may create in /dev/shm: its own segments, and what Python's multiprocessing makes (POSIX
# semaphores `sem.mp-*` of its locks and queues, `psm_*` of multiprocessing.shared_memory).
SHM_PREFIXES = ("raytp-", "sem.mp-", "psm_")


def raytp_segments() -> set[str]:
    """The files in /dev/shm that raytp's processes could have left behind (there should be none), for a before /
    after comparison. Filtered by name rather than every file: other test runs on the machine create and remove
    their own files in /dev/shm meanwhile, and a file cannot be traced to its creator once that process is gone;
    the names cover everything raytp and the libraries it drives (multiprocessing) create there."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIXES)}


def transformers_greedy(model_dir, prompt: str, max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: max_tokens ids, fewer if it stops at end-of-sequence."""
    tokenizer = Tokenizer.from_dir(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(tokenizer.eos_token_ids))
    return out[0, len(ids):].tolist()


# The caller's RAY_AUTH_MODE=disabled: a Ray the tests start themselves; one that raytp starts ignores it.
RAYTP_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def raytp_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "raytp", *args]


@contextmanager
def serve_process(log_path: Path, *args: str, headers: dict | None = None, timeout_s: float = 300):
    """`raytp serve ARGS --port P` on a free port, answering /v1/models; yields (process, base URL). The caller
    may stop it as its test needs; one still running on exit gets SIGTERM (a clean shutdown stops the Ray it
    started), then SIGKILL after 90 s."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(raytp_command("serve", *args, "--port", str(port)), stdout=log,
                                stderr=subprocess.STDOUT, env=RAYTP_ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"raytp serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"raytp serve did not answer within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", headers=headers or {}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""Helpers shared by the tests that start Ray clusters and servers."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import transformers

from raytp.weights.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raytp_segments() -> set[str]:
    """raytp's shared-memory segments now in /dev/shm, by their name (there should be none left behind). Files of
    other names (multiprocessing's `sem.mp-*`...) are told apart by `shm_files_mapped_by` instead: other test runs
    on the machine create such files meanwhile."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("raytp-")}


def shm_files_mapped_by(processes) -> set[str]:
    """Every file in /dev/shm that these psutil processes map now (any name: raytp's segments, multiprocessing's
    semaphores...). Taken while they run, it tells which of the files appearing in /dev/shm are theirs: other test
    runs on the machine create files there meanwhile, and a file cannot be traced to its creator once it is gone."""
    names = set()
    for process in processes:
        try:
            maps = process.memory_maps(grouped=False)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        names |= {m.path.removeprefix("/dev/shm/") for m in maps if m.path.startswith("/dev/shm/")
                  and not m.path.endswith("(deleted)")}
    return names


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

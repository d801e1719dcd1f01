"""`raytp chat` as a user at a terminal has it: Ctrl-C while an answer streams stops that answer and the chat goes
on with its history; Ctrl-C at the prompt (or /exit) ends it."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time

import pytest

from tests.util import RAYTP_ENV, raytp_command

pytestmark = pytest.mark.slow


class Lines:
    """What a process writes to one of its pipes, read by a thread, character by character."""

    def __init__(self, pipe):
        self.text = ""
        self._chunks: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        while chunk := pipe.read(1):
            self._chunks.put(chunk)

    def wait_for(self, wanted: str, timeout: float, start: int = 0) -> int:
        """The position of `wanted` in what was written from `start` on, waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        while wanted not in self.text[start:]:
            try:
                self.text += self._chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {wanted!r} within {timeout} s; got: {self.text[-3000:]}") from None
        return self.text.index(wanted, start)


def test_ctrl_c_stops_the_answer_and_keeps_the_chat():
    proc = subprocess.Popen(raytp_command("chat", "--devices", "cpu", "--dtype", "float32", "--max-context", "1024",
                                          "--max-tokens", "400"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=0, env=RAYTP_ENV)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        err.wait_for("Type a message", timeout=300)
        proc.stdin.write("Write a long essay about the history of Rome.\n")
        prompt = out.wait_for("> ", timeout=10)
        out.wait_for(" ", timeout=120, start=prompt + 10)  # a few words of the answer have streamed
        proc.send_signal(signal.SIGINT)
        err.wait_for("(answer stopped; the chat goes on)", timeout=60)
        assert proc.poll() is None and "tokens/s]" not in err.text  # the first answer never finished
        proc.stdin.write("What is the capital of France?\n")
        err.wait_for("tokens/s]", timeout=180)  # the next turn is answered in the same session
        proc.stdin.write("/exit\n")
        assert proc.wait(timeout=120) == 0, err.text[-3000:]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=120)
    assert "Traceback" not in err.text, err.text[-3000:]

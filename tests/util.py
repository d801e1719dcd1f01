"""Helpers shared by the tests that start Ray clusters and servers."""

import os
import socket

import torch
import transformers

from raytp.weights.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raytp_segments() -> set[str]:
    """raytp's shared-memory segments now in /dev/shm (there should be none left behind)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith("raytp-")}


def transformers_greedy(model_dir, prompt: str, max_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: max_tokens ids, fewer if it stops at end-of-sequence."""
    tokenizer = Tokenizer.from_dir(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=sorted(tokenizer.eos_token_ids))
    return out[0, len(ids):].tolist()

"""The per-rank token loop: every rank runs it in lock-step, no Ray call inside.

Rank 0 (the leader) owns the inbox of commands from the driver (`Add`, `Cancel`, `Stop`) and the outbox of
sampled tokens. At the top of every step it broadcasts the commands that arrived (usually none: one tiny
collective) so that every rank admits, cancels and finishes the same requests at the same step. That
broadcast is the one place a request has a wire format (`encode_commands` / `decode_commands`); everywhere
else it is the dataclasses below, which Ray pickles as they are. Then all ranks prefill the new requests,
run one batched decode step over every active request and sample identically. Requests join and leave
between steps; a finished or cancelled request frees its cache slot at once.

Requests arrive checked (`raytp.runtime.requests.check_request`, at the front end): a bad one never reaches a
rank, so the loop does not check them again.

When no request is active the leader waits on its inbox for at most `heartbeat_s` and then broadcasts an
empty step anyway, so a rank that has died is noticed within the collective timeout even when idle.
"""

from __future__ import annotations

import json
import queue
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from raytp.parallel.comm import Communicator
from raytp.model.llama import ShardedLlama
from raytp.runtime.sampling import SamplingParams, ShardedSampler


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: list[int] = field(default_factory=list)  # the end-of-sequence tokens; empty with ignore_eos


@dataclass
class TokenEvent:
    """One sampled token of a request; `finish` is set on its last event ("stop", "length", "cancelled", or
    "error" with `error` saying why)."""

    request_id: str
    token_id: int | None
    finish: str | None = None
    error: str | None = None
    t: float | None = None  # the leader's perf_counter at the step that made it (set by poll_events; benchmarks)


@dataclass
class Add:
    request: Request


@dataclass
class Cancel:
    request_id: str


@dataclass
class Stop:
    """Ends every rank's loop."""


Command = Add | Cancel | Stop


def encode_commands(commands: list[Command]) -> bytes:
    """The leader's broadcast of one step's commands, as JSON (the ranks may be different processes and
    machines; JSON keeps the format readable and free of pickle)."""
    def one(c: Command) -> list:
        if isinstance(c, Add):
            r = c.request
            return ["add", r.id, r.prompt_ids, asdict(r.params), r.stop_ids]
        return ["cancel", c.request_id] if isinstance(c, Cancel) else ["stop"]
    return json.dumps([one(c) for c in commands]).encode()


def decode_commands(payload: bytes) -> list[Command]:
    def one(c: list) -> Command:
        if c[0] == "add":
            _, rid, prompt, params, stop_ids = c
            return Add(Request(rid, prompt, SamplingParams(**params), stop_ids))
        return Cancel(c[1]) if c[0] == "cancel" else Stop()
    return [one(c) for c in json.loads(payload.decode())]


@dataclass
class _Sequence:
    request: Request
    slot: int
    tokens: list[int]  # prompt + generated, the repetition penalty's history
    generated: int = 0


class RankEngine:
    def __init__(self, model: ShardedLlama, comm: Communicator, heartbeat_s: float = 1.0,
                 decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.model, self.comm = model, comm
        self.decode_step = decode or model.forward  # a raytp.model.graphs.GraphedDecode on CUDA ranks
        self.sampler = ShardedSampler(comm, model.vocab_start)
        self.device = model.device
        self.heartbeat_s = heartbeat_s
        self.active: dict[str, _Sequence] = {}
        self.free_slots = list(range(model.max_batch))
        self.pending: deque[Request] = deque()  # leader only: waiting for a free slot
        self.inbox: queue.Queue[Command] = queue.Queue()  # leader only
        self.leader_events: list[TokenEvent] = []  # leader only: events decided without the other ranks

    # ---- leader side -------------------------------------------------------------------------------------

    def _collect_commands(self) -> list[Command]:
        """Leader: what the whole group does this step. A request cancelled while still waiting for a slot
        never reached the other ranks: its "cancelled" event goes straight to `self.leader_events`."""
        commands: list[Command] = []
        wait = not self.active and not self.pending
        while True:
            try:
                cmd = self.inbox.get(timeout=self.heartbeat_s) if wait else self.inbox.get_nowait()
            except queue.Empty:
                break
            wait = False
            if isinstance(cmd, Add):
                self.pending.append(cmd.request)
            elif isinstance(cmd, Cancel) and any(r.id == cmd.request_id for r in self.pending):
                self.pending = deque(r for r in self.pending if r.id != cmd.request_id)
                self.leader_events.append(TokenEvent(cmd.request_id, None, "cancelled"))
            else:
                commands.append(cmd)
        free = len(self.free_slots) - sum(1 for c in commands if isinstance(c, Cancel) and c.request_id in self.active)
        while self.pending and free > 0:
            commands.append(Add(self.pending.popleft()))
            free -= 1
        return commands

    def _broadcast_commands(self, commands: list[Command]) -> list[Command]:
        """One int64 collective when idle-ish; a second one carrying the commands when there is news."""
        payload = encode_commands(commands) if self.comm.rank == 0 and commands else b""
        n = self.comm.broadcast(torch.tensor([len(payload)], dtype=torch.int64))
        if int(n) == 0:
            return []
        buf = torch.zeros(int(n), dtype=torch.uint8)
        if self.comm.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        return decode_commands(bytes(self.comm.broadcast(buf).tolist()))

    # ---- every rank ----------------------------------------------------------------------------------------

    def run(self, emit: Callable[[list[TokenEvent]], None]) -> None:
        """Step until a `Stop` command. `emit` receives the events of each step (used on the leader)."""
        while True:
            commands = self._broadcast_commands(self._collect_commands() if self.comm.rank == 0 else [])
            events, self.leader_events = self.leader_events, []
            new: list[_Sequence] = []
            for cmd in commands:
                if isinstance(cmd, Stop):
                    return
                if isinstance(cmd, Cancel):
                    if cmd.request_id in self.active:
                        self._finish(self.active[cmd.request_id], "cancelled", events)
                else:
                    seq = _Sequence(cmd.request, self.free_slots.pop(0), list(cmd.request.prompt_ids))
                    self.active[cmd.request.id] = seq
                    new.append(seq)
            decoding = [s for s in self.active.values() if s not in new]
            for seq in new:  # prefill one request at a time: its whole prompt in one forward
                self._prefill(seq, events)
            if decoding:
                self._decode(decoding, events)
            if events:
                emit(events)

    def _prefill(self, seq: _Sequence, events: list[TokenEvent]) -> None:
        prompt = seq.request.prompt_ids
        tokens = torch.tensor([prompt], device=self.device)
        positions = torch.arange(len(prompt), device=self.device).view(1, -1)
        slots = torch.tensor([seq.slot], device=self.device)
        logits = self.model.forward(tokens, positions, slots)
        self._sample([seq], logits, events)

    def _decode(self, seqs: list[_Sequence], events: list[TokenEvent]) -> None:
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        positions = torch.tensor([[len(s.tokens) - 1] for s in seqs], device=self.device)
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        logits = self.decode_step(tokens, positions, slots)
        self._sample(seqs, logits, events)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, events: list[TokenEvent]) -> None:
        params = [s.request.params for s in seqs]
        positions = [s.generated for s in seqs]
        histories = [torch.tensor(s.tokens) for s in seqs] if any(p.repetition_penalty != 1 for p in params) \
            else [torch.empty(0, dtype=torch.int64)] * len(seqs)
        for seq, token in zip(seqs, self.sampler.sample(logits, params, positions, histories)):
            seq.tokens.append(token)
            seq.generated += 1
            if token in seq.request.stop_ids:
                self._finish(seq, "stop", events, token)
            elif seq.generated == seq.request.params.max_tokens or len(seq.tokens) >= self.model.max_context:
                self._finish(seq, "length", events, token)
            else:
                events.append(TokenEvent(seq.request.id, token))

    def _finish(self, seq: _Sequence, reason: str, events: list[TokenEvent], token: int | None = None) -> None:
        del self.active[seq.request.id]
        self.free_slots.append(seq.slot)
        events.append(TokenEvent(seq.request.id, token, reason))

"""The per-rank token loop: every rank runs it in lock-step, no Ray call inside, and the GPU never waits for Python.

Rank 0 (the leader) owns the inbox of commands from the driver (`Add`, `Cancel`, `Stop`) and the outbox of
sampled tokens. Commands reach the other ranks in one broadcast (`encode_commands` / `decode_commands`, the one
place a request has a wire format; everywhere else it is the dataclasses below, which Ray pickles as they are),
so that every rank admits, cancels and finishes the same requests at the same step.

Decode is device-resident (raytp.runtime.batch): a step samples on the device and writes its tokens and positions
into the next step's inputs itself. The host enqueues step N+1 before it reads step N's tokens (a pinned buffer
and an event, one step behind), so it finds stop tokens, max_tokens and the end of the context one step late: the
token that step N+1 drew for a finished request is surplus and dropped, never emitted. When the batch changes (a
request joins, finishes or is cancelled) the loop drains the step in flight and rewrites the device buffers from
its own view of the sequences. A row whose top-p nucleus reached below the candidates the captured sampler
exchanges comes back marked inexact (rare); the loop then drops the step after it, runs that step again and
draws the row with the exact host-side loop of `ShardedSampler.sample`.

Commands are exchanged only when there is news, not by a collective every step. While requests decode, the leader
raises a news counter that rides along in every step's sampler exchange (a word in an all-gather that runs
anyway, so it reaches ranks on every node); all ranks read it back with the step's tokens and, when it has grown,
run the command broadcast at the same point of the same iteration. With nothing decoding (idle, or only
prefilling) every iteration broadcasts: then the leader waits on its inbox for at most `heartbeat_s` first, so an
idle group still runs one small collective a second, and a rank that has died is noticed within the collective
timeout. (A shared-memory word would spare the leader the wait of one step but exists only within a node.)

New requests are prefilled eagerly in chunks of at most `prefill_chunk` tokens, one chunk per iteration between
decode steps, so a long prompt delays running requests by one chunk at a time. A request joins the decode batch
with the token its last chunk drew. A request with `prompt_logprobs` (echo) has each chunk's logits at every
position scored against the prompt's next tokens (`ShardedSampler.prompt_logprobs`, one gather per chunk); its
chunks are shorter (PROMPT_SCORES_PER_CHUNK), so that one costs the running requests no more than a plain one.

A request for n samples (`params.n`) takes n cache slots: its prompt is prefilled once, in the first, and copied
into the others (`ShardedLlama.copy_slot`); each sample then draws with its own seed (`sample_seed`) and decodes as
a row of its own. Its events carry the sample's `index`.

A request with a grammar (`params.grammar`, from a JSON schema) has a matcher per sample on every rank
(raytp.runtime.constraints); before each draw its rows' masks of this rank's vocabulary slice are written, and
the loop reads each step before it enqueues the next (the next mask needs the token). The grammar was compiled
before the request was sent (`prepare_grammar`, on a thread beside the loop, on every rank): admitting it, the loop
only copies the compiled matcher for each sample, so a large schema never stalls the other requests' tokens.

Waiting requests are admitted where they fit, in arrival order, a large one (many samples) passed over by at most
max_batch later ones before the slots that free up are kept for it (raytp.runtime.admission).

A request that asks for `speculate` (raytp.runtime.speculation) has its rows draft tokens from its own text, from
the script of an earlier identical row (`oracle`, raytp bench's: raytp.runtime.oracle), or from the rank's draft
model (`draft`, raytp.runtime.draft_model: its cache prefilled beside the target's, all drafting rows decoded
together), or from the model's own MTP layer (`mtp`, raytp.runtime.mtp_drafter: fed the hidden states that the
prefill and verify forwards of its rows return); while any row of a small batch may draft, the loop reads each step
before it queues the next, and a step in which some row has a draft (or an MTP row lacks the hidden state it drafts
from) is a verify step (`_verify`): every row's last token and draft in one forward, the target's token at each
position drawn exactly on the host, the drafted ones accepted up to the first that differs, every accepted token
passing `_accept` in order. It leaves the device batch stale: the next plain step reloads it.

Log-probabilities of generated tokens (`logprobs`) come out of the step's own exchange (raytp.runtime.sampling),
computed only while a row of the batch asks for them (a graph variant of its own), and ride on each TokenEvent.

Requests arrive checked (`raytp.runtime.requests.check_request`, at the front end): a bad one never reaches a
rank, so the loop does not check them again.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from raytp.model.llama import ShardedLlama
from raytp.parallel.comm import Communicator
from raytp.parallel.plan import PREFILL_CHUNK
from raytp.runtime.admission import AdmissionQueue
from raytp.runtime.batch import NO_HISTORY, DecodeBatch, Pending
from raytp.runtime.constraints import Grammars, grammar_failure
from raytp.runtime.sampling import Logprobs, SamplingParams, ShardedSampler, sample_seed
from raytp.runtime.draft_model import DraftRow, ModelDrafter
from raytp.runtime.mtp_drafter import MtpDrafter
from raytp.runtime.oracle import Scripts
from raytp.runtime.speculation import DRAFT, MTP, ORACLE, SPECULATE_MAX_BATCH, RowSpeculation, row_speculation

# echo: prompt positions x vocabulary scored in one prefill chunk (85 positions of a 49152-token vocabulary). Each
# position costs its lm_head columns and its scores over the whole vocabulary in float64 (summed, searched for the
# top ones) on top of its layers: fewer positions a chunk keep an echo chunk's delay to the running requests within
# a plain chunk's.
PROMPT_SCORES_PER_CHUNK = 1 << 22


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: list[int] = field(default_factory=list)  # the end-of-sequence tokens; empty with ignore_eos


@dataclass
class TokenEvent:
    """One sampled token of a request; `finish` is set on its last event ("stop", "length", "cancelled", or
    "error" with `error` saying why: its grammar failed while decoding)."""

    request_id: str
    token_id: int | None
    finish: str | None = None
    error: str | None = None
    t: float | None = None  # the leader's perf_counter at the step that made it (set by poll_events; benchmarks)
    logprob: float | None = None  # the token's log-probability, where the request asked (`logprobs`)
    top_logprobs: list[tuple[int, float]] | None = None  # the top N (id, log-probability), highest first
    # echo: (log-probability, top N) of prompt tokens, in order from the second; an event without a token carries
    # a prefill chunk's
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    index: int = 0  # which of the request's n samples
    # on a row's first event of a verify step (raytp.runtime.speculation): its drafted tokens, and how many of them
    # were accepted and emitted (the step's events for the row are 1 + accepted)
    drafted: int = 0
    accepted: int = 0


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


@dataclass(eq=False)
class _Sequence:
    request: Request
    slot: int
    tokens: list[int]  # prompt + generated as read back so far: the repetition penalty's history
    generated: int = 0
    prefilled: int = 0  # prompt tokens already in the cache
    finished: bool = False  # results of steps still in flight for it are dropped
    index: int = 0  # which of the request's samples; sample 0 prefills for all
    matcher: object | None = None  # the grammar's state (llguidance), for a constrained request
    forks: list[_Sequence] = field(default_factory=list)  # sample 0: the others, waiting for its prefill
    speculation: RowSpeculation | None = None  # its drafting, where its request asks for it


class RankEngine:
    def __init__(self, model: ShardedLlama, comm: Communicator, heartbeat_s: float = 1.0,
                 prefill_chunk: int = PREFILL_CHUNK, grammars: Grammars | None = None,
                 draft: ShardedLlama | None = None):
        self.model, self.comm = model, comm
        # `speculate: draft` rows' drafter
        self.drafter = None if draft is None else ModelDrafter(draft, comm, prefill_chunk)
        self.mtp = MtpDrafter(model, comm) if model.mtp else None  # `speculate: mtp` rows' drafter
        self.scripts = Scripts()  # `speculate: oracle` rows' (raytp bench's): the tokens of earlier identical rows
        self.sampler = ShardedSampler(comm, model.vocab_start)
        self.batch = DecodeBatch(model, self.sampler)
        self.device = model.device
        self.heartbeat_s, self.prefill_chunk = heartbeat_s, prefill_chunk
        self.echo_chunk = max(1, min(prefill_chunk, PROMPT_SCORES_PER_CHUNK // model.config.vocab_size))
        self.active: dict[str, list[_Sequence]] = {}  # a request's live samples
        self.free_slots = list(range(model.max_batch))
        self.prefilling: deque[_Sequence] = deque()  # admitted, prompt not yet all in the cache
        self.decoding: list[_Sequence] = []  # the device batch's rows, in order
        self.stale = False  # `decoding` changed since the device batch was loaded
        self.in_flight: deque[Pending] = deque()  # enqueued steps not read yet (at most two)
        self.news = self.news_handled = 0  # the leader's news counter as read back, and as acted on
        self.iteration_started = 0.0  # perf_counter when this loop iteration's work began (after any wait for work)
        self.pending = AdmissionQueue(model.max_batch)  # leader only: requests waiting for free slots
        self.inbox: queue.Queue[Command] = queue.Queue()  # leader only
        self.leader_events: list[TokenEvent] = []  # leader only: events decided without the other ranks
        self.grammars = grammars  # the tokenizer's, built before the loop (it holds the GIL for a second or more)

    def use_cuda_graphs(self) -> None:
        """Replay decode steps from CUDA graphs (the communicator must be `graph_safe`)."""
        self.batch.use_graphs()

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
                self.pending.push(cmd.request)
                continue
            if isinstance(cmd, Cancel) and self.pending.remove(cmd.request_id):
                self.leader_events.append(TokenEvent(cmd.request_id, None, "cancelled"))
            commands.append(cmd)  # a cancel of a waiting request too: every rank forgets its prepared grammar
        free = len(self.free_slots) - sum(len(self.active.get(c.request_id, ())) for c in commands
                                          if isinstance(c, Cancel))
        commands += [Add(r) for r in self.pending.admit(free)]
        return commands

    def _has_news(self) -> bool:
        """Leader: whether the group has something to hear (a command, or a waiting request that now fits)."""
        return not self.inbox.empty() or self.pending.can_admit(len(self.free_slots))

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

    @torch.inference_mode()
    def run(self, emit: Callable[[list[TokenEvent]], None]) -> None:
        """Step until a `Stop` command. `emit` receives the events of each iteration (used on the leader)."""
        while True:
            events, self.leader_events = self.leader_events, []
            if not self.decoding or self.news > self.news_handled:
                self.news_handled = self.news
                commands = self._broadcast_commands(self._collect_commands() if self.comm.rank == 0 else [])
                if any(isinstance(c, Stop) for c in commands):
                    for step in self.in_flight:  # finish the GPU's work before the communicator closes
                        step.read()
                    return
                self._apply(commands, events)
            self.iteration_started = time.perf_counter()
            self._prefill_chunk(events)
            if self.stale:
                self._drain(events)
            if self.decoding:
                if self.comm.rank == 0 and self.news == self.news_handled and self._has_news():
                    self.batch.post(self.news + 1)
                drafts = None if self.in_flight else self._drafts()
                if drafts:
                    self._verify(drafts, events)
                else:
                    if self.stale:
                        self.batch.load(self.decoding)
                        self.stale = False
                    self._enqueue()
            # step N+1 is queued: read step N; every step at once where the next needs its tokens
            while len(self.in_flight) > (0 if self.batch.constrained or self._speculating() else 1):
                self._read(self.in_flight.popleft(), events)
            if events:
                emit(events)

    def _apply(self, commands: list[Command], events: list[TokenEvent]) -> None:
        for cmd in commands:
            if isinstance(cmd, Cancel):
                for seq in list(self.active.get(cmd.request_id, ())):
                    self._finish(seq, "cancelled", events)
                if self.grammars is not None:
                    self.grammars.release(cmd.request_id)
            else:
                r = cmd.request
                samples = [_Sequence(r if i == 0 else dataclasses.replace(r, params=dataclasses.replace(
                               r.params, seed=sample_seed(r.params.seed, i))), self.free_slots.pop(0),
                               list(r.prompt_ids), index=i) for i in range(r.params.n)]
                samples[0].forks = samples[1:]
                for sample in samples:
                    spec = row_speculation(r.params.speculate, r.params.grammar is not None, self.model.config,
                                           self.drafter is not None)
                    if spec is not None and spec.kind == ORACLE:
                        spec.drafter = self.scripts.drafter(r.prompt_ids, sample.request.params,
                                                            self.model.config.vocab_size)
                    sample.speculation = spec
                if r.params.grammar is not None:
                    for sample, matcher in zip(samples, self.grammars.matchers(r.id, len(samples))):
                        sample.matcher = matcher
                self.active[r.id] = samples
                self.prefilling.append(samples[0])

    def _prefill_chunk(self, events: list[TokenEvent]) -> None:
        """The next chunk of the first waiting prompt; its last chunk draws the request's first token."""
        if not self.prefilling:
            return
        seq = self.prefilling[0]
        prompt = seq.request.prompt_ids
        params = seq.request.params
        echo = params.prompt_logprobs is not None
        start = seq.prefilled
        end = min(len(prompt), start + (self.echo_chunk if echo else self.prefill_chunk))
        tokens = torch.tensor([prompt[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device).view(1, -1)
        slots = torch.tensor([seq.slot], device=self.device)
        kind = seq.speculation.kind if seq.speculation is not None else None
        if kind == MTP:
            logits, hidden = self.model.forward(tokens, positions, slots, span=end, every=echo, hidden=True)
            self.mtp.prefill(hidden, start, seq.slot, prompt)
        else:
            logits = self.model.forward(tokens, positions, slots, span=end, every=echo)
        if kind == DRAFT:
            self.drafter.prefill(tokens, positions, seq.slot, end)
        if echo:
            scored = min(end, len(prompt) - 1) - start  # positions whose next token is a prompt token
            if scored > 0:
                following = torch.tensor(prompt[start + 1 : start + 1 + scored])
                lp = self.sampler.prompt_logprobs(logits[0, :scored], following)
                events.append(TokenEvent(seq.request.id, None, prompt_logprobs=[
                    lp.rows(t, params.prompt_logprobs) for t in range(scored)]))
            logits = logits[:, -1]
        seq.prefilled = end
        if end < len(prompt):
            return
        self.prefilling.popleft()
        samples = [seq] + [s for s in seq.forks if not s.finished]
        for fork in samples[1:]:
            self.model.copy_slot(seq.slot, fork.slot, len(prompt))
            if kind == DRAFT:
                self.drafter.copy_slot(seq.slot, fork.slot, len(prompt))
            if kind == MTP:
                self.mtp.copy_slot(seq.slot, fork.slot)
        seq.forks = []
        history = torch.tensor(prompt)
        draw = self.sampler.draw_exact(logits.expand(len(samples), -1), [s.request.params for s in samples],
                                       [0] * len(samples), [history] * len(samples), params.logprobs is not None,
                                       self._masks(samples))
        tokens = draw.tokens.tolist()
        for b, sample in enumerate(samples):
            if self._accept(sample, tokens[b], events, _row_logprobs(draw.logprobs, b, params)):
                self.decoding.append(sample)
                self.stale = True

    def prepare_grammar(self, request_id: str, grammar: str) -> None:
        """Compile the grammar of a request about to be sent, on the calling thread (not the loop's): every rank
        does this before the request's `Add` (RequestError if it cannot be compiled)."""
        if self.grammars is None:
            raise RuntimeError("a constrained request reached a rank without the model's tokenizer")
        self.grammars.prepare(request_id, grammar)

    def _masks(self, seqs: list[_Sequence]) -> dict[int, torch.Tensor]:
        """The grammar masks of the constrained ones among `seqs`, by row."""
        return {b: self.grammars.allowed(s.matcher) for b, s in enumerate(seqs) if s.matcher is not None}

    def _enqueue(self) -> None:
        if self.batch.constrained:  # every token of the batch is read: the matchers are up to date
            self.batch.allow(self._masks(self.decoding))
        step, _ = self.batch.step(list(self.decoding))
        self.in_flight.append(step)

    def _speculating(self) -> bool:
        """Whether the next step may verify drafts: then the host reads every step before it queues the next."""
        return len(self.decoding) <= SPECULATE_MAX_BATCH and any(
            s.speculation is not None and s.speculation.active(s.generated) for s in self.decoding)

    def _drafts(self) -> list[list[int]] | None:
        """Each decoding row's draft, where the batch speculates and some row has one, or an MTP row lacks the
        hidden state it drafts from (then a verify step returns it; every rank alike)."""
        if not self._speculating():
            return None
        drafts, batched, lacking = [], {DRAFT: [], MTP: []}, False
        for b, seq in enumerate(self.decoding):
            spec, room = seq.speculation, self.model.max_context - len(seq.tokens)
            if seq.request.params.max_tokens is not None:  # the target's own token comes on top of the draft
                room = min(room, seq.request.params.max_tokens - seq.generated - 1)
            if spec is not None and spec.kind in batched:
                k = spec.wanted(seq.generated, room)
                if k and spec.kind == MTP and not self.mtp.ready(seq.slot, seq.tokens):
                    lacking = True
                elif k:
                    batched[spec.kind].append((b, DraftRow(seq.slot, seq.tokens, seq.request.params, seq.generated,
                                                           k)))
            drafts.append([] if spec is None or spec.kind in batched else spec.draft(seq.tokens, seq.generated, room))
        for kind, drafter in ((DRAFT, self.drafter), (MTP, self.mtp)):  # each model's rows, in one batch
            if batched[kind]:
                for (b, _), draft in zip(batched[kind], drafter.propose([row for _, row in batched[kind]])):
                    drafts[b] = draft
        return drafts if any(drafts) or lacking else None

    def _verify(self, drafts: list[list[int]], events: list[TokenEvent]) -> None:
        """One step over every row's last token and its draft (raytp.runtime.speculation): the target's token at
        each position, the drafted ones taken up to the first that differs. Leaves the device batch stale."""
        rows = list(self.decoding)
        width = 1 + max(len(d) for d in drafts)
        tokens, positions = [], []
        for seq, draft in zip(rows, drafts):
            run, start = [seq.tokens[-1]] + draft, len(seq.tokens) - 1
            pad = width - len(run)  # copies of the last real position write that position's keys and values again
            tokens.append(run + run[-1:] * pad)
            positions.append(list(range(start, start + len(run))) + [start + len(run) - 1] * pad)
        mtp = [s.speculation is not None and s.speculation.kind == MTP for s in rows]
        logits = self.model.forward(torch.tensor(tokens, device=self.device),
                                    torch.tensor(positions, device=self.device),
                                    torch.tensor([s.slot for s in rows], device=self.device), every=True,
                                    verify=True, hidden=any(mtp))
        if any(mtp):
            logits, hidden = logits
        picked, params, generated, histories, masks = [], [], [], [], {}
        for b, (seq, draft) in enumerate(zip(rows, drafts)):
            p = seq.request.params
            if seq.matcher is not None:
                masks[len(picked)] = self.grammars.allowed(seq.matcher)
            for j in range(len(draft) + 1):
                picked.append(b * width + j)
                params.append(p)
                generated.append(seq.generated + j)
                histories.append(torch.tensor(seq.tokens + draft[:j]) if p.repetition_penalty != 1 else NO_HISTORY)
        flat = logits.view(len(rows) * width, -1)[torch.tensor(picked, device=self.device)]
        draw = self.sampler.draw_exact(flat, params, generated, histories,
                                       any(p.logprobs is not None for p in params), masks, self.batch.word)
        self.news = max(self.news, int(draw.word))
        targets = draw.tokens.tolist()
        row, kept = 0, []
        for b, (seq, draft) in enumerate(zip(rows, drafts)):
            first, taken, start = len(events), 0, len(seq.tokens) - 1
            for j, target in enumerate(targets[row : row + len(draft) + 1]):
                going = self._accept(seq, target, events, _row_logprobs(draw.logprobs, row + j, seq.request.params))
                taken += 1
                if not going or j == len(draft) or draft[j] != target:
                    break
            if mtp[b] and going:  # the positions whose inputs the sequence kept
                self.mtp.record(seq.slot, start, hidden[b, :taken])
            if draft:
                events[first].drafted, events[first].accepted = len(draft), taken - 1
                seq.speculation.record(taken - 1, seq.generated)
            row += len(draft) + 1
            kept.append(taken - 1)  # the row's last token and its accepted draft: the positions its state keeps
        self.model.keep_verified(torch.tensor(kept, device=self.device))
        self.stale = True

    def _drain(self, events: list[TokenEvent]) -> None:
        while self.in_flight:
            self._read(self.in_flight.popleft(), events)

    def _read(self, step: Pending, events: list[TokenEvent]) -> None:
        tokens, exact, news, lp = step.read()
        self.news = max(self.news, news)
        if not all(exact):
            self._redraw(step, events)
            return
        for b, (seq, token) in enumerate(zip(step.rows, tokens)):
            if not seq.finished:
                self._accept(seq, token, events, _row_logprobs(lp, b, seq.request.params))

    def _redraw(self, step: Pending, events: list[TokenEvent]) -> None:
        """Step N left rows inexact: forget step N+1 (it ran on their provisional tokens), run step N again from
        the host's view, and draw the inexact rows exactly (every rank does this: the flags were gathered)."""
        for later in self.in_flight:
            later.read()
        self.in_flight.clear()
        self.stale = True
        live = [s for s in step.rows if not s.finished]
        if not live:
            return
        self.batch.load(live)
        self.batch.allow(self._masks(live))
        again, logits = self.batch.step(live)
        tokens, exact, _, lp = again.read()
        for i, (seq, token) in enumerate(zip(live, tokens)):
            params = seq.request.params
            row = _row_logprobs(lp, i, params)
            if not exact[i]:
                history = torch.tensor(seq.tokens)
                draw = self.sampler.draw_exact(logits[i : i + 1], [params], [seq.generated], [history],
                                               params.logprobs is not None, self._masks([seq]))
                token, row = int(draw.tokens[0]), _row_logprobs(draw.logprobs, 0, params)
            self._accept(seq, token, events, row)

    def _accept(self, seq: _Sequence, token: int, events: list[TokenEvent],
                logprobs: tuple[float, list[tuple[int, float]]] | None = None) -> bool:
        """Take a sampled token (with its log-probabilities where asked); returns whether the request goes on."""
        seq.tokens.append(token)
        seq.generated += 1
        failed = seq.matcher is not None and grammar_failure(seq.matcher, token)
        if failed:  # the answer cannot go on as the schema says: an error, never a "stop" that cuts it short
            self._finish(seq, "error", events, token, logprobs, error=failed)
        elif token in seq.request.stop_ids:
            self._finish(seq, "stop", events, token, logprobs)
        elif seq.generated == seq.request.params.max_tokens or len(seq.tokens) >= self.model.max_context:
            self._finish(seq, "length", events, token, logprobs)
        else:
            events.append(_token_event(seq, token, None, logprobs))
            return True
        return False

    def _finish(self, seq: _Sequence, reason: str, events: list[TokenEvent], token: int | None = None,
                logprobs: tuple[float, list[tuple[int, float]]] | None = None, error: str | None = None) -> None:
        seq.finished = True
        if reason in ("stop", "length") and seq.speculation is not None and seq.speculation.kind == ORACLE:
            seq.speculation.drafter.record(seq.tokens)
        samples = self.active[seq.request.id]
        samples.remove(seq)
        if not samples:
            del self.active[seq.request.id]
        self.free_slots.append(seq.slot)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        if seq in self.decoding:
            self.decoding.remove(seq)
            self.stale = True
        events.append(_token_event(seq, token, reason, logprobs, error))


def _row_logprobs(lp: Logprobs | None, b: int, params: SamplingParams) -> tuple[float, list[tuple[int, float]]] | None:
    """Row b's (log-probability, top N) where its request asks for them."""
    return None if lp is None or params.logprobs is None else lp.rows(b, params.logprobs)


def _token_event(seq: _Sequence, token: int | None, finish: str | None,
                 logprobs: tuple[float, list[tuple[int, float]]] | None, error: str | None = None) -> TokenEvent:
    lp = {} if logprobs is None else {"logprob": logprobs[0], "top_logprobs": logprobs[1]}
    return TokenEvent(seq.request.id, token, finish, error=error, index=seq.index, **lp)

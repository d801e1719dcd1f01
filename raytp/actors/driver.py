"""The driver: owns the tokenizer, the requests and their token streams; the ranks do the stepping.

A request is tokenized here (`encode`), checked and handed to the leader rank once (`submit`), and from
then on the ranks step on their own. `submit` is the one way in for the HTTP API and the web chat (which run
in this actor's event loop) and for the CLI (over Ray, as a streaming generator). Sampled tokens come back
in batches through one long-poll loop (`poll_events`): Ray is touched per batch of tokens, off the ranks'
critical path, never per token inside a step.

If any rank dies, every request in flight fails at once with an error naming the rank, the group is torn
down and built again, and the next request runs on the new group. If the lost rank's device cannot be placed
again (its node or GPU is gone), the group is re-planned over the devices that remain; if the model no longer
fits on them, the error says how much memory is missing and requests get UnavailableError (HTTP 503) until
the server is restarted. New requests wait out a rebuild. Every request that fails after it was admitted is
logged here, once, on one line carrying its id.

A constrained request's grammar is compiled before the request is sent: here first, on a thread, bounded in size
and time (past either bound the request is refused, and never reaches a rank), then on every rank beside its token
loop (`prepare_grammar`); the request goes to the leader once every rank has it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence

import ray

from raytp.actors.group import ClusterError, GroupSettings, WorkerGroup
from raytp.runtime.constraints import GRAMMAR_COMPILE_S, Grammars
from raytp.runtime.engine import Add, Cancel, Request, TokenEvent
from raytp.parallel.plan import PlanError
from raytp.runtime.errors import BusyError, RequestError, UnavailableError, error_summary
from raytp.runtime.requests import StopScanner, check_request, check_text
from raytp.runtime.sampling import SamplingParams
from raytp.runtime.speculation import check_drafter
from raytp.serving.harmony import Harmony
from raytp.serving.metrics import ServingMetrics
from raytp.serving.tool_calls import template_syntax
from raytp.weights.generation_defaults import SamplingDefaults
from raytp.weights.source import ModelSource
from raytp.weights.tokenizer import StreamDecoder, Tokenizer
from raytp.weights.tokenizer_pool import TextTooLong, TokenizerPool

log = logging.getLogger("raytp")


MAX_QUEUE = 64  # streams that may wait for a cache slot beyond the max_batch running ones; `serve` sets it
REBUILDING = "the group is rebuilding: retry shortly"
SHUTTING_DOWN = "the server is shutting down: the request was not finished"
HEALTH_DEADLINE_S = 1.0  # /health's wait for every rank's answer: a stopped rank shows at once, not after heartbeat_s
HEARTBEAT_EVERY_S = 1.0  # between two heartbeats of every rank (each waits up to settings.heartbeat_s for answers)
LOG_LINES = 1000  # `raytp` log lines kept for the CLI between two `take_logs`; older ones are dropped
GRAMMAR_THREADS = 2  # grammars the driver compiles at once; a compile past its time bound keeps its thread until done


class LogTail(logging.Handler):
    """Keeps this process's `raytp` log lines for the CLI: Ray's log_to_driver stays off (it would also carry
    Ray's own worker noise), so the CLI fetches these with `take_logs` once a second instead."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Driver:
    def __init__(self, settings: GroupSettings):
        self.settings = settings
        source = ModelSource.parse(settings.model)
        self.config = source.config()
        # synthetic models have no tokenizer: their requests pass token ids and stream no text
        self.tokenizer = None if source.tokenizer_dir is None else Tokenizer.from_dir(source.tokenizer_dir)
        # prompts are encoded in child processes, never in this event loop (raytp.weights.tokenizer_pool)
        self.tokenizer_pool = None if self.tokenizer is None else \
            TokenizerPool(self.tokenizer, source.tokenizer_dir, settings.max_context)
        self.tokenizer_dir = source.tokenizer_dir
        # what a request that names no temperature, top_p, top_k or repetition penalty samples with
        self.sampling_defaults = SamplingDefaults.read(source.path)
        # how the model writes a tool call by itself (tool_choice "auto"), read off its chat template; None: it
        # has no syntax raytp parses, and "auto" is refused
        self.tool_syntax = None if self.tokenizer is None else template_syntax(
            lambda messages: self.tokenizer.apply_chat_template(messages, add_generation_prompt=False))
        # the chat format's reader where the template speaks harmony (gpt-oss): answers come as channels
        self.harmony = None if self.tokenizer is None else Harmony.of(self.tokenizer)
        self._grammars: asyncio.Future[Grammars] | None = None  # checks constrained requests' grammars (`start`)
        self._grammar_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._compiling = 0  # grammars compiling in `_grammar_pool`, those past their time bound included
        self.group: WorkerGroup | None = None
        # each request's events; an UnavailableError instead when the group failed under it
        self.streams: dict[str, asyncio.Queue[TokenEvent | UnavailableError]] = {}
        self.devices = settings.devices  # the devices the group runs on: fewer after a re-plan over survivors
        self.ready = asyncio.Event()
        self.failure: str | None = None
        self.down: str | None = None  # why no group can be built: requests get UnavailableError
        self.history: list[str] = []  # what happened to the group, for the web chat's cluster panel
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.max_queue = MAX_QUEUE
        self.metrics = ServingMetrics()  # what /metrics reports (raytp.serving.metrics)
        self._answering = 0  # admitted requests that have their first token
        self.metrics.running.set_function(lambda: self._answering)
        self.metrics.waiting.set_function(lambda: len(self.streams) - self._answering)
        self._http = None  # the HTTP server `serve` runs in this actor's event loop
        self._probe: asyncio.Future | None = None  # /health's question to the ranks, while one is asked
        self._log_tail = LogTail()
        log.addHandler(self._log_tail)
        log.setLevel(logging.INFO)  # the phases are INFO: made whatever level Ray gave this process's root logger

    # ---- group lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> dict:
        if self.tokenizer_pool is not None:  # its processes start while the ranks load: the first request is quick
            warm = asyncio.ensure_future(self.tokenizer_pool.encode(prompt="warm up"))
            self._start_grammars()
        await self._build()
        if self.tokenizer_pool is not None:
            await warm
            await self._grammars
        return self.info()

    async def _build(self) -> None:
        group = WorkerGroup(dataclasses.replace(self.settings, devices=self.devices), self.config)
        try:
            await asyncio.to_thread(group.build)
        except BaseException:
            await asyncio.to_thread(group.shutdown)
            raise
        self.group = group
        self._tasks = [asyncio.create_task(self._pump_events(group)), asyncio.create_task(self._watch(group))]
        self.ready.set()

    async def _pump_events(self, group: WorkerGroup) -> None:
        """Move batches of sampled tokens from the leader to each request's queue."""
        while True:
            try:
                events = await group.leader.poll_events.remote(0.5)
            except ray.exceptions.RayError:
                return  # the watcher reports the failure
            for e in events:
                q = self.streams.get(e.request_id)
                if q is not None:
                    q.put_nowait(e)

    async def _heartbeat(self, group: WorkerGroup) -> tuple[int, str]:
        """Return (rank, why) once a rank leaves a heartbeat unanswered for settings.heartbeat_s: a stopped or
        stuck process, which the other ranks would otherwise wait for until their collective times out. One Ray
        call per rank per HEARTBEAT_EVERY_S, off the token path; a rank that died is the watcher's to report."""
        limit = self.settings.heartbeat_s
        while True:
            beats = [asyncio.wrap_future(w.heartbeat.remote().future()) for w in group.workers]
            _, late = await asyncio.wait(beats, timeout=limit)
            if late:
                for beat in late:
                    beat.cancel()
                rank = min(i for i, beat in enumerate(beats) if beat in late)
                return rank, f"it answered no heartbeat for {limit:g} s (stopped or stuck; --rank-timeout)"
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def _watch(self, group: WorkerGroup) -> None:
        """Wait for any rank's loop to end, or to stop answering; when that happens unasked, fail the requests and
        rebuild."""
        futures = {asyncio.wrap_future(ref.future()): rank for rank, ref in enumerate(group.run_refs)}
        heartbeat = asyncio.ensure_future(self._heartbeat(group))
        done, _ = await asyncio.wait({*futures, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
        heartbeat.cancel()
        if self._closing:
            return
        ended = next(f for f in done if f is not heartbeat) if done - {heartbeat} else heartbeat
        if ended is heartbeat:
            rank, why = heartbeat.result()
        else:
            rank = futures[ended]
            try:
                ended.result()
                why = "its loop ended"
            except Exception as e:  # noqa: BLE001 - any failure of a rank is reported, whatever its type
                why = rank_error_summary(e)
        self.failure = f"rank {rank} ({self.devices[rank]}) failed: {why}"
        self.metrics.rebuilds.inc()
        self._record(f"{self.failure}; rebuilding the group", logging.ERROR)
        self.ready.clear()
        for q in self.streams.values():
            q.put_nowait(UnavailableError(f"{self.failure}; {REBUILDING}"))
        self._tasks[0].cancel()
        await asyncio.to_thread(group.shutdown, False)
        try:
            try:
                await self._build()
            except (ClusterError, ray.exceptions.RayError) as e:  # the lost devices cannot come back: go on without
                lost = _lost_ranks(group, rank)
                self.devices = tuple(d for i, d in enumerate(self.devices) if i not in lost)
                self._record(f"{error_summary(e)}; re-planning over the {len(self.devices)} devices that remain: "
                             f"{', '.join(map(str, self.devices)) or 'none'}", logging.ERROR)
                await self._build()
            self._record(f"serving again on {len(self.devices)} ranks")
        except (ClusterError, PlanError, ray.exceptions.RayError) as e:
            self.down = f"the model cannot be served on the devices that remain: {e}"
            self._record(self.down, logging.ERROR)
            self.ready.set()  # wake the requests waiting for the rebuild: they fail with the reason

    def _record(self, event: str, level: int = logging.WARNING) -> None:
        """Log what happened to the group, and keep it for the cluster panel."""
        log.log(level, "%s", event)
        self.history.append(f"{time.strftime('%H:%M:%S')} {event}")

    async def shutdown(self) -> None:
        """Stop serving: every open request first fails with UnavailableError (a stream's client gets an error event
        and [DONE], a whole answer a 503), then the HTTP server stops, then the ranks and the tokenizer's
        processes."""
        self._closing = True
        for q in self.streams.values():
            q.put_nowait(UnavailableError(SHUTTING_DOWN))
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for t in self._tasks:
            t.cancel()
        if self.group is not None:
            await asyncio.to_thread(self.group.shutdown)
            self.group = None
        if self.tokenizer_pool is not None:
            self.tokenizer_pool.close()
        if self._grammar_pool is not None:
            self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        log.removeHandler(self._log_tail)

    def unavailable(self) -> str | None:
        """Why requests cannot run now (the group is rebuilding, or cannot be served any more), else None. The
        HTTP API answers those 503 with Retry-After at once; `submit` itself waits out a rebuild."""
        if self.down:
            return self.down
        if not self.ready.is_set():
            return f"{self.failure}; {REBUILDING}" if self.failure else "the ranks are starting; retry shortly"
        return None

    async def health(self) -> str | None:
        """Why requests cannot run now, asking every rank too: None only when all answer within HEALTH_DEADLINE_S
        (a stopped or stuck rank shows here before the watcher's heartbeat gives up on it). Concurrent callers
        share one probe: /health needs no key, so callers must not multiply the Ray calls."""
        if why := self.unavailable():
            return why
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_ranks(self.group))
            self._probe.add_done_callback(lambda _: setattr(self, "_probe", None))
        return await asyncio.shield(self._probe)

    async def _probe_ranks(self, group: WorkerGroup) -> str | None:
        deadline = min(HEALTH_DEADLINE_S, self.settings.heartbeat_s)
        beats = [asyncio.wrap_future(w.heartbeat.remote().future()) for w in group.workers]
        done, late = await asyncio.wait(beats, timeout=deadline)
        for beat in late:
            beat.cancel()
        silent = [rank for rank, beat in enumerate(beats) if beat in late or beat.exception() is not None]
        if silent:
            return f"rank {silent[0]} ({self.devices[silent[0]]}) did not answer within {deadline:g} s"
        return self.unavailable()

    def take_logs(self) -> list[str]:
        """The `raytp` log lines since the last call. The CLI calls it once a second: it is also the liveness ping."""
        tail = self._log_tail.lines
        return [tail.popleft() for _ in range(len(tail))]  # popleft, not copy-and-clear: the group logs from a thread

    def chat_format(self):
        """The model's harmony (raytp.serving.harmony.Harmony) where its chat template speaks it, else None: the CLI
        reads answers with it."""
        return self.harmony

    def info(self) -> dict:
        g = self.group
        return {
            "model": self.settings.model, "backend": g.backend, "dtype": self.settings.dtype,
            "kv_dtype": self.settings.kv_dtype,
            "max_context": self.settings.max_context, "max_batch": self.settings.max_batch,
            "plan": g.plan.to_dict(), "ranks": g.ranks, "plan_table": g.plan.format_table() + (
                "" if g.draft_plan is None else f"\ndraft model {self.settings.draft_model}:\n"
                                                f"{g.draft_plan.format_table()}"),
            "draft_plan": None if g.draft_plan is None else g.draft_plan.to_dict(),
            "history": list(self.history),
        }

    # ---- requests ------------------------------------------------------------------------------------------

    async def encode(self, prompt: str | None = None, messages: list[dict] | None = None,
                     tools: list[dict] | None = None, variables: dict | None = None) -> list[int]:
        """The token ids of a text prompt, or of chat messages (and the tools offered, the template's own
        `variables`) through the model's chat template, where a message's text is text (no control token can be
        forged in it). Encoded in a child process, after the text's length in characters is checked against the
        context: this event loop never tokenizes."""
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        param = "prompt" if messages is None else "messages"
        if self.tokenizer_pool is None:
            raise RequestError(f"{self.settings.model} has no tokenizer: pass token ids instead of text",
                               param="prompt")
        for m in messages or []:
            check_text(m.get("content") or "", param)
        if prompt is not None:
            check_text(prompt, param)
        try:
            return await self.tokenizer_pool.encode(prompt, messages, tools, variables)
        except TextTooLong as e:
            raise RequestError(str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:  # a model without a chat template, or a template that refuses the messages
            raise RequestError(str(e), param=param) from None

    def _start_grammars(self) -> None:
        """Read the tokenizer for grammars on a thread (llguidance holds the GIL meanwhile: at start-up, not at the
        first constrained request, when it would stall every stream)."""
        self._grammar_pool = concurrent.futures.ThreadPoolExecutor(GRAMMAR_THREADS, "raytp-grammar")
        self._grammars = asyncio.get_running_loop().run_in_executor(
            self._grammar_pool, Grammars.for_model, self.tokenizer_dir, self.config)

    async def _check_grammar(self, grammar: str, ignore_eos: bool) -> None:
        """RequestError unless the ranks can follow `grammar` (llguidance's, from a JSON schema): it must compile
        here within GRAMMAR_COMPILE_S; BusyError while GRAMMAR_THREADS grammars are compiling."""
        if self.tokenizer_dir is None:
            raise RequestError(f"{self.settings.model} has no tokenizer: response_format needs one",
                               param="response_format")
        if ignore_eos:
            raise RequestError("ignore_eos cannot go with response_format: the answer ends where the schema does",
                               param="ignore_eos")
        if self._grammars is None:
            self._start_grammars()
        grammars = await self._grammars
        if self._compiling >= GRAMMAR_THREADS:
            raise BusyError(f"the server is busy compiling {self._compiling} other JSON schemas; retry shortly")
        self._compiling += 1
        compiled = asyncio.get_running_loop().run_in_executor(self._grammar_pool, grammars.compile, grammar)
        compiled.add_done_callback(self._compiled)
        try:
            await asyncio.wait_for(asyncio.shield(compiled), GRAMMAR_COMPILE_S)
        except asyncio.TimeoutError:
            raise RequestError(f"response_format: the JSON schema's grammar did not compile within "
                               f"{GRAMMAR_COMPILE_S:g} s, raytp's bound; use a simpler schema (fewer optional "
                               "properties)", param="response_format") from None

    def _compiled(self, _: asyncio.Future) -> None:
        self._compiling -= 1

    async def _prepare_grammar(self, request_id: str, grammar: str) -> None:
        """Have every rank compile the grammar of `request_id`, beside its token loop, before the request is sent."""
        group = self.group
        prepared = asyncio.ensure_future(asyncio.gather(*[w.prepare_grammar.remote(request_id, grammar)
                                                          for w in group.workers]))
        try:
            errors = await asyncio.shield(prepared)
        except asyncio.CancelledError:  # the caller went away: the ranks forget the grammar once they have it
            prepared.add_done_callback(lambda _: group.leader.submit.remote(Cancel(request_id)))
            raise
        except ray.exceptions.RayError as e:  # a rank died: the watcher rebuilds the group
            raise UnavailableError(f"a rank failed: {rank_error_summary(e)}; {REBUILDING}") from None
        error = next((e for e in errors if e), None)
        if error:
            raise RequestError(error, param="response_format")

    def decode(self, ids: Sequence[int], strict: bool = False) -> str:
        """The text of token ids, control tokens included (echo, /detokenize); without a tokenizer "", or with
        `strict` a RequestError."""
        if self.tokenizer is None:
            if strict:
                raise RequestError(f"{self.settings.model} has no tokenizer: it has no text for token ids")
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token's own text (special tokens included), as logprobs show them; "token_id:N" without a
        tokenizer, as vLLM spells them."""
        if self.tokenizer is None:
            return [f"token_id:{i}" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    async def submit(self, prompt_ids: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
                     ignore_eos: bool = False):
        """Run one request; yield {"index", "text", "token_id"} as tokens arrive, then one final {"finish",
        stats...}. With `params.n` > 1 the samples' items interleave, each with its sample's index.

        With `params.logprobs` each token's item also has "logprob" and "top_logprobs" ([(id, logprob)]); every
        generated token gets an item then (its text may be ""), the end token too ("end_token" is true). With
        `params.prompt_logprobs` items {"prompt_logprobs": [(logprob, top)]} come first, for the prompt's tokens
        from the second on.

        The request is checked here, before anything reaches a rank (RequestError names the field), and
        refused with BusyError past max_batch running + max_queue waiting requests. The text stops before
        the first of the `stop` strings, which ends the request ("stop"). `ignore_eos` generates max_tokens
        whatever the model says (vLLM's extension: benchmarks, tests). Without a tokenizer (synthetic
        models) the text pieces are empty and only token ids stream. Closing the generator early cancels
        the request and frees its cache slot at the leader's next step."""
        prompt_ids = list(prompt_ids)
        check_request(prompt_ids, params, stop, self.config.vocab_size, self.settings.max_context,
                      self.settings.max_batch)
        check_drafter(params.speculate, self.settings.draft_model, self.config.mtp_layers)
        if params.grammar is not None:
            await self._check_grammar(params.grammar, ignore_eos)
        if len(self.streams) >= self.settings.max_batch + self.max_queue:  # admitted: running or waiting for a slot
            raise BusyError(f"the server is busy: {len(self.streams)} requests are running or waiting "
                            f"(--max-batch {self.settings.max_batch} + --max-queue {self.max_queue}); retry shortly")
        rid = uuid.uuid4().hex
        queue: asyncio.Queue[TokenEvent | UnavailableError] = asyncio.Queue()
        self.streams[rid] = queue
        samples = [_SampleText(self.tokenizer, stop) for _ in range(params.n)]
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else self.config.eos_token_ids
        if self.harmony is not None:  # whatever the checkpoint's files list (a GGUF's eos is <|return|> alone)
            eos = eos | self.harmony.end_ids
        start = time.perf_counter()
        first = last_t = None  # the first token's arrival here; the leader's clock at the last token's step
        drafted = accepted = 0  # of the request's verify steps (raytp.runtime.speculation)
        try:
            await self.ready.wait()  # inside the bound, so requests waiting out a rebuild count as admitted too
            if self.down:
                raise UnavailableError(self.down)
            request = Request(rid, prompt_ids, params, [] if ignore_eos else sorted(eos))
            if params.grammar is not None:
                await self._prepare_grammar(rid, params.grammar)
            try:
                await self.group.leader.submit.remote(Add(request))
            except ray.exceptions.RayError as e:  # the leader died before the watcher noticed
                raise UnavailableError(f"rank 0 ({self.devices[0]}) failed: {rank_error_summary(e)}; {REBUILDING}"
                                       ) from None
            while any(s.finish is None for s in samples):
                e = await queue.get()
                if isinstance(e, UnavailableError):  # a rank failed: the request may run again once the group is back
                    raise e
                if e.error:  # the ranks cannot go on with this request: its grammar failed while decoding
                    raise RequestError(e.error)
                if e.prompt_logprobs is not None:
                    yield {"prompt_logprobs": e.prompt_logprobs}
                    continue
                sample = samples[e.index]
                if sample.finish is not None:  # cut by a stop string: its tokens still on the way are dropped
                    continue
                if e.token_id is not None:
                    self._observe_token(start, first, last_t, e.t)
                    first, last_t = first or time.perf_counter(), e.t
                if e.drafted:
                    self.metrics.drafted.inc(e.drafted)
                    self.metrics.accepted.inc(e.accepted)
                    drafted, accepted = drafted + e.drafted, accepted + e.accepted
                text = sample.take(e)
                scored = e.logprob is not None
                if text or sample.finish is None or scored:
                    # an end token is scored too (its text is empty, as vLLM's and OpenAI's completions give it):
                    # lm-eval reads one logprob per generated token
                    yield {"index": e.index, "text": text, "token_id": e.token_id, "end_token": e.finish == "stop"
                           } | ({"logprob": e.logprob, "top_logprobs": e.top_logprobs} if scored else {})
        except Exception as e:  # noqa: BLE001 - whatever ended an admitted request is logged once, with its id
            log.error("request %s failed: %s", rid, e)
            raise
        finally:
            del self.streams[rid]
            self._answering -= first is not None
            self.metrics.prompt_tokens.inc(len(prompt_ids))
            live = self.ready.is_set() and not self.down  # not while the group rebuilds: it failed every request
            if not all(s.ended_on_ranks for s in samples) and live:  # a stop string, or the caller went away
                self.group.leader.submit.remote(Cancel(rid))  # frees the slots
        elapsed = time.perf_counter() - start
        decode_s = time.perf_counter() - (first or start)
        generated = sum(len(s.token_ids) for s in samples)
        yield {
            "finish": samples[0].finish, "token_ids": samples[0].token_ids, "prompt_tokens": len(prompt_ids),
            "finishes": [s.finish for s in samples],  # with n > 1: each sample's
            "generated_tokens": generated, "ttft_s": (first or start) - start, "elapsed_s": elapsed,
            "tokens_per_s": (generated - params.n) / decode_s if generated > params.n and decode_s > 0 else 0.0,
            "drafted_tokens": drafted, "accepted_tokens": accepted,
        }

    def _observe_token(self, start: float, first: float | None, last_t: float | None, t: float | None) -> None:
        self.metrics.generation_tokens.inc()
        if first is None:
            self._answering += 1
            self.metrics.ttft.observe(time.perf_counter() - start)
        elif last_t is not None and t is not None:
            self.metrics.inter_token.observe(t - last_t)

    async def _collect_rank_steps(self) -> None:
        """Take the ranks' step times since the last call into the metrics: one Ray call per rank, at a scrape or
        a refresh of the Cluster panel, never per step."""
        group = self.group
        if group is None or not self.ready.is_set() or self.down:
            return
        try:
            taken = await asyncio.wait_for(asyncio.gather(*[w.take_step_seconds.remote() for w in group.workers]),
                                           timeout=self.settings.heartbeat_s)
        except (asyncio.TimeoutError, ray.exceptions.RayError):
            return  # a rank failing now: the watcher reports it
        for rank, seconds in enumerate(taken):
            histogram = self.metrics.rank_step.labels(rank=str(rank), device=str(self.devices[rank]))
            for s in seconds:
                histogram.observe(s)

    async def metrics_text(self) -> bytes:
        """/metrics, in Prometheus' text format."""
        await self._collect_rank_steps()
        return self.metrics.exposition()

    async def live_numbers(self) -> dict:
        """The running totals the web chat's Cluster panel turns into rates (the same numbers /metrics reports):
        {"t", "tokens", "ranks": [(rank, device, steps, step seconds)]}."""
        await self._collect_rank_steps()
        value = self.metrics.registry.get_sample_value
        ranks = []
        for rank, device in enumerate(self.devices):
            labels = {"rank": str(rank), "device": str(device)}
            ranks.append((rank, str(device), value("raytp_rank_step_seconds_count", labels) or 0.0,
                          value("raytp_rank_step_seconds_sum", labels) or 0.0))
        return {"t": time.monotonic(), "tokens": value("raytp_generation_tokens_total") or 0.0, "ranks": ranks}

    # ---- HTTP ----------------------------------------------------------------------------------------------

    async def serve(self, path: str, api_key: str | None = None, max_queue: int = MAX_QUEUE) -> None:
        """Serve the OpenAI-compatible API (/v1) and the web chat (/) on the Unix socket `path`, to which `raytp
        serve` relays its clients (raytp.serving.relay); returns once listening.

        The HTTP server runs in this actor's own event loop, so its handlers call `submit` directly: tokens go
        from the leader's event batches to the HTTP responses without a Ray call per token."""
        from raytp.serving.openai_api import HTTPServer

        if self._http is not None:
            raise RuntimeError("already serving")
        self.max_queue = max_queue
        self._http = await HTTPServer.start(self, path, api_key)


def rank_error_summary(e: BaseException) -> str:
    """One line for what ended a rank, without Ray's internals (actor id, pid, namespace, address)."""
    if isinstance(e, ray.exceptions.RayActorError) and not isinstance(e, ray.exceptions.RayTaskError):
        return "its process died (killed, crashed or out of memory)"
    return error_summary(e)


class _SampleText:
    """One sample's text as its tokens arrive: detokenized incrementally, cut at the first stop string."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = StopScanner(stop)
        self.token_ids: list[int] = []
        self.finish: str | None = None
        self.ended_on_ranks = False  # the ranks finished it: no cancel needed

    def take(self, e: TokenEvent) -> str:
        """The text `e` adds; sets `finish` when the sample ends."""
        self.ended_on_ranks = e.finish is not None
        text = ""
        if e.token_id is not None:
            self.token_ids.append(e.token_id)
            if e.finish != "stop" and self.decoder:  # the stop token itself is not part of the answer
                text = self.decoder.feed(e.token_id)
        if e.finish is not None and self.decoder:
            text += self.decoder.flush()
        text, hit = self.stops.feed(text)
        self.finish = "stop" if hit else e.finish
        if self.finish is not None and not hit:
            text += self.stops.flush()
        return text


def _lost_ranks(group: WorkerGroup, failed: int) -> set[int]:
    """The ranks whose node Ray no longer lists alive; the rank that failed, if its node is alive (its GPU may be
    gone while the node lives)."""
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    gone = {r["rank"] for r in group.ranks if r["node_id"] not in alive}
    return gone or {failed}


DriverActor = ray.remote(num_cpus=0, max_concurrency=1000)(Driver)

"""The driver: owns the tokenizer, the requests and their token streams; the ranks do the stepping.

A request is tokenized here, handed to the leader rank once (`submit`), and from then on the ranks step
on their own. Sampled tokens come back in batches through one long-poll loop (`poll_events`): Ray is
touched per batch of tokens, off the ranks' critical path, never per token inside a step.

If any rank dies, every request in flight fails at once with an error naming the rank, the group is torn
down and built again, and the next request runs on the new group.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import asdict

import ray

from raytp.actors.group import GroupSettings, WorkerGroup
from raytp.runtime.engine import Request
from raytp.runtime.errors import BusyError, RequestError
from raytp.runtime.sampling import SamplingParams
from raytp.weights.source import ModelSource
from raytp.weights.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("raytp")


MAX_QUEUE = 64  # streams that may wait for a cache slot beyond the max_batch running ones; `serve` sets it
LOG_LINES = 1000  # `raytp` log lines kept for the CLI between two `take_logs`; older ones are dropped


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
        # synthetic models have no tokenizer: their requests pass token ids (`prompt_ids`) and stream no text
        self.tokenizer = None if source.tokenizer_dir is None else Tokenizer.from_dir(source.tokenizer_dir)
        self.group: WorkerGroup | None = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.ready = asyncio.Event()
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.max_queue = MAX_QUEUE
        self._http = None  # the HTTP server `serve` runs in this actor's event loop
        self._log_tail = LogTail()
        log.addHandler(self._log_tail)
        log.setLevel(logging.INFO)  # the phases are INFO: made whatever level Ray gave this process's root logger

    # ---- group lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> dict:
        await self._build()
        return self.info()

    async def _build(self) -> None:
        group = WorkerGroup(self.settings, self.config)
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
                q = self.streams.get(e["request_id"])
                if q is not None:
                    q.put_nowait(e)

    async def _watch(self, group: WorkerGroup) -> None:
        """Wait for any rank's loop to end; when it ends unasked, fail the requests and rebuild."""
        futures = {asyncio.wrap_future(ref.future()): rank for rank, ref in enumerate(group.run_refs)}
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        if self._closing:
            return
        rank = futures[next(iter(done))]
        try:
            next(iter(done)).result()
            why = "its loop ended"
        except Exception as e:  # noqa: BLE001 - any failure of a rank is reported, whatever its type
            why = _first_line(e)
        self.failure = f"rank {rank} ({self.settings.devices[rank]}) failed: {why}"
        log.error("%s; rebuilding the group", self.failure)
        self.ready.clear()
        for q in self.streams.values():
            q.put_nowait({"finish": "error", "error": self.failure, "token_id": None})
        self._tasks[0].cancel()
        await asyncio.to_thread(group.shutdown, False)
        await self._build()

    async def shutdown(self) -> None:
        self._closing = True
        if self._http is not None:
            await self._http.stop()
            self._http = None
        for t in self._tasks:
            t.cancel()
        if self.group is not None:
            await asyncio.to_thread(self.group.shutdown)
            self.group = None
        log.removeHandler(self._log_tail)

    def take_logs(self) -> list[str]:
        """The `raytp` log lines since the last call. The CLI calls it once a second: it is also the liveness ping."""
        tail = self._log_tail.lines
        return [tail.popleft() for _ in range(len(tail))]  # popleft, not copy-and-clear: the group logs from a thread

    def info(self) -> dict:
        g = self.group
        return {
            "model": self.settings.model, "backend": g.backend, "dtype": self.settings.dtype,
            "max_context": self.settings.max_context, "max_batch": self.settings.max_batch,
            "plan": g.plan.to_dict(), "ranks": g.ranks, "plan_table": g.plan.format_table(),
        }

    # ---- requests ------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None,
                   token_ids: list[int] | None = None) -> list[int]:
        if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
            raise RequestError("give exactly one of prompt, messages or prompt_ids")
        if token_ids is not None:
            ids = [int(t) for t in token_ids]
            if any(not 0 <= t < self.config.vocab_size for t in ids):
                raise RequestError(f"prompt_ids must lie in [0, {self.config.vocab_size}) (the vocabulary)")
        elif self.tokenizer is None:
            raise RequestError(f"{self.settings.model} has no tokenizer: pass prompt_ids instead of text")
        else:
            text = self.tokenizer.apply_chat_template(messages) if messages is not None else prompt
            ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.settings.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context holds {self.settings.max_context} "
                               f"(--max-context); shorten the prompt or raise --max-context")
        return ids

    async def stream(self, prompt: str | None = None, messages: list[dict] | None = None, params: dict | None = None,
                     prompt_ids: list[int] | None = None, ignore_eos: bool = False):
        """Yield {"text", "token_ids"} pieces as tokens arrive, then one final {"finish", stats...} item.

        Without a tokenizer (synthetic models) the text pieces are empty and only token ids stream."""
        try:
            sampling = SamplingParams(**(params or {}))
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        ids = self.prompt_ids(prompt, messages, prompt_ids)
        room = self.settings.max_context - len(ids)
        if sampling.max_tokens > room:
            sampling = SamplingParams(**{**asdict(sampling), "max_tokens": room})
        if len(self.streams) >= self.settings.max_batch + self.max_queue:  # admitted: running or waiting for a slot
            raise BusyError(f"the server is busy: {len(self.streams)} requests are running or waiting "
                            f"(--max-batch {self.settings.max_batch} + --max-queue {self.max_queue}); retry shortly")
        rid = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        eos = self.tokenizer.eos_token_ids if self.tokenizer is not None else self.config.eos_token_ids
        start = time.perf_counter()
        first = None
        generated: list[int] = []
        finish = None
        try:
            await self.ready.wait()  # inside the bound, so requests waiting out a rebuild count as admitted too
            request = Request(rid, ids, sampling, [] if ignore_eos else sorted(eos))
            await self.group.leader.submit.remote(("add", asdict(request)))
            while finish is None:
                e = await queue.get()
                if e.get("error"):
                    raise RuntimeError(e["error"])
                finish = e["finish"]
                text = ""
                if e["token_id"] is not None:
                    first = first or time.perf_counter()
                    generated.append(e["token_id"])
                    if finish != "stop" and decoder:  # the stop token itself is not part of the answer
                        text = decoder.feed(e["token_id"])
                if finish is not None and decoder:
                    text += decoder.flush()
                if text or finish is None:
                    yield {"text": text, "token_id": e["token_id"]}
        finally:
            del self.streams[rid]
            if finish is None and self.group is not None:  # the caller went away: free the slot now
                self.group.leader.submit.remote(("cancel", rid))
        elapsed = time.perf_counter() - start
        decode_s = time.perf_counter() - (first or start)
        yield {
            "finish": finish, "token_ids": generated, "prompt_tokens": len(ids), "generated_tokens": len(generated),
            "ttft_s": (first or start) - start, "elapsed_s": elapsed,
            "tokens_per_s": (len(generated) - 1) / decode_s if len(generated) > 1 and decode_s > 0 else 0.0,
        }


    # ---- HTTP ----------------------------------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
                    max_queue: int = MAX_QUEUE) -> str:
        """Serve the OpenAI-compatible API (/v1) and the web chat (/) on one port; returns the URL once listening.

        The HTTP server runs in this actor's own event loop, so its handlers call `stream` directly: tokens go
        from the leader's event batches to the HTTP responses without a Ray call per token."""
        from raytp.serving.openai_api import HTTPServer

        if self._http is not None:
            raise RuntimeError(f"already serving at {self._http.url}")
        self.max_queue = max_queue
        self._http = await HTTPServer.start(self, host, port, api_key)
        return self._http.url


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


DriverActor = ray.remote(num_cpus=0, max_concurrency=1000)(Driver)

"""The driver: owns the tokenizer, the requests and their token streams; the ranks do the stepping.

A request is tokenized here, handed to the leader rank once (`submit`), and from then on the ranks step
on their own. Sampled tokens come back in batches through one long-poll loop (`poll_events`): Ray is
touched per batch of tokens, off the ranks' critical path, never per token inside a step.

If any rank dies, every request in flight fails at once with an error naming the rank, the group is torn
down and built again, and the next request runs on the new group.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict

import ray

from raytp.actors.group import GroupSettings, WorkerGroup
from raytp.engine import Request
from raytp.models import resolve_model
from raytp.sampling import SamplingParams
from raytp.source import model_config
from raytp.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("raytp")


class RequestError(ValueError):
    """Bad input in a request: the message names the value and the limit."""


class Driver:
    def __init__(self, settings: GroupSettings):
        self.settings = settings
        self.config = model_config(settings.model)
        self.tokenizer = Tokenizer.from_dir(resolve_model(settings.model))
        self.group: WorkerGroup | None = None
        self.streams: dict[str, asyncio.Queue] = {}
        self.ready = asyncio.Event()
        self.failure: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False

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
        for t in self._tasks:
            t.cancel()
        if self.group is not None:
            await asyncio.to_thread(self.group.shutdown)
            self.group = None

    def info(self) -> dict:
        g = self.group
        return {
            "model": self.settings.model, "backend": g.backend, "dtype": self.settings.dtype,
            "max_context": self.settings.max_context, "max_batch": self.settings.max_batch,
            "plan": g.plan.to_dict(), "ranks": g.ranks, "plan_table": g.plan.format_table(),
        }

    # ---- requests ------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise RequestError("give exactly one of prompt or messages")
        text = self.tokenizer.apply_chat_template(messages) if messages is not None else prompt
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.settings.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens but the context holds {self.settings.max_context} "
                               f"(--max-context); shorten the prompt or raise --max-context")
        return ids

    async def stream(self, prompt: str | None = None, messages: list[dict] | None = None, params: dict | None = None):
        """Yield {"text", "token_ids"} pieces as tokens arrive, then one final {"finish", stats...} item."""
        try:
            sampling = SamplingParams(**(params or {}))
        except (TypeError, ValueError) as e:
            raise RequestError(str(e)) from None
        ids = self.prompt_ids(prompt, messages)
        room = self.settings.max_context - len(ids)
        if sampling.max_tokens > room:
            sampling = SamplingParams(**{**asdict(sampling), "max_tokens": room})
        await self.ready.wait()
        rid = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        decoder = StreamDecoder(self.tokenizer)
        start = time.perf_counter()
        first = None
        generated: list[int] = []
        finish = None
        try:
            request = Request(rid, ids, sampling, sorted(self.tokenizer.eos_token_ids))
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
                    if finish != "stop":  # the stop token itself is not part of the answer
                        text = decoder.feed(e["token_id"])
                if finish is not None:
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


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


DriverActor = ray.remote(num_cpus=0, max_concurrency=1000)(Driver)

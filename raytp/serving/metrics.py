"""What `/metrics` reports, in Prometheus' text format (prometheus-client), from numbers the driver records.

    raytp_requests_running               admitted requests that have begun answering (hold a batch slot)
    raytp_requests_waiting               admitted requests not answering yet: waiting for a slot, or in prefill
    raytp_prompt_tokens_total            prompt tokens of admitted requests, counted as each ends
    raytp_generation_tokens_total        tokens generated, counted as they stream
    raytp_time_to_first_token_seconds    histogram: submission to the first token, as the driver sees it
    raytp_inter_token_latency_seconds    histogram: between two tokens of one request, on the leader's clock (the
                                         step that made each), so the driver's batched event pump does not blur it
    raytp_rank_step_seconds{rank,device} histogram: each rank's wall time per loop iteration while it has work
                                         (the ranks step in lockstep: the slowest rank sets everyone's pace)
    raytp_rebuilds_total                 groups rebuilt after a rank failed
    raytp_speculative_drafted_tokens_total   tokens drafted and checked by verify steps (raytp.runtime.speculation)
    raytp_speculative_accepted_tokens_total  of those, the ones accepted (and streamed)

The acceptance rate is accepted / drafted; the tokens a request gets per decode step are generation /
(generation - accepted), every step giving one token of its own plus the drafted ones it accepted.

One registry per server, not prometheus-client's global one (Ray keeps its own metrics in the process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; TTFT spans a cached short prompt on a GPU to a long prefill on CPUs, a step 1 ms to a second
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServingMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("raytp_requests_running", "admitted requests that have begun answering", registry=r)
        self.waiting = Gauge("raytp_requests_waiting", "admitted requests waiting for a batch slot or in prefill",
                             registry=r)
        self.prompt_tokens = Counter("raytp_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("raytp_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("raytp_time_to_first_token_seconds", "submission to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("raytp_inter_token_latency_seconds", "between two tokens of one request",
                                     buckets=STEP_BUCKETS, registry=r)
        self.rank_step = Histogram("raytp_rank_step_seconds", "a rank's wall time per loop iteration with work",
                                   ["rank", "device"], buckets=STEP_BUCKETS, registry=r)
        self.rebuilds = Counter("raytp_rebuilds", "groups rebuilt after a rank failed", registry=r)
        self.drafted = Counter("raytp_speculative_drafted_tokens", "drafted tokens checked by verify steps",
                               registry=r)
        self.accepted = Counter("raytp_speculative_accepted_tokens", "drafted tokens accepted", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

"""Admission to the cache slots: what fits goes in, in arrival order, and a large request waits for a bounded number
of later ones, never for an endless stream of them."""

from raytp.runtime.admission import AdmissionQueue
from raytp.runtime.engine import Request
from raytp.runtime.sampling import SamplingParams


def request(rid: str, n: int = 1) -> Request:
    return Request(rid, [1, 2], SamplingParams(n=n))


def ids(requests) -> list[str]:
    return [r.id for r in requests]


def test_requests_that_fit_go_in_ahead_of_one_that_does_not():
    queue = AdmissionQueue(overtakes_max=8)
    for r in [request("a"), request("big", n=4), request("b"), request("c")]:
        queue.push(r)
    assert ids(queue.admit(3)) == ["a", "b", "c"]
    assert ids(queue) == ["big"] and not queue.can_admit(3) and queue.can_admit(4)
    assert ids(queue.admit(4)) == ["big"] and len(queue) == 0


def test_a_large_request_is_overtaken_at_most_overtakes_max_times_then_the_slots_are_kept_for_it():
    queue = AdmissionQueue(overtakes_max=2)
    queue.push(request("big", n=4))
    queue.push(request("s1"))
    assert ids(queue.admit(1)) == ["s1"]  # overtaken once
    queue.push(request("s2"))
    queue.push(request("s3"))
    assert ids(queue.admit(1)) == ["s2"]  # twice: no one else goes ahead of it now
    assert not queue.can_admit(3) and queue.admit(3) == []
    assert ids(queue.admit(4)) == ["big"]
    assert ids(queue.admit(1)) == ["s3"]


def test_a_request_ahead_of_a_starved_one_still_goes_in_and_a_cancelled_one_leaves_the_line():
    queue = AdmissionQueue(overtakes_max=0)
    for r in [request("a", n=2), request("big", n=4), request("b")]:
        queue.push(r)
    assert ids(queue.admit(3)) == ["a"]  # b may not pass big, a came before it
    assert queue.remove("big") and not queue.remove("big")
    assert ids(queue.admit(1)) == ["b"]

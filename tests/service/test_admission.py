"""The fair queue of service/engine/admission.py, alone: requests here are plain strings (the
scheduler's are lists of sequences; the queue never looks inside them)."""

from __future__ import annotations

import pytest

from service.engine.admission import FairQueue
from service.errors import InFlightLimit, QueueFull


def flood(queue: FairQueue, tenant: str, count: int, slots: int = 1) -> list:
    return [queue.push(tenant, f"{tenant}{i}", slots) for i in range(count)]


def test_one_tenant_is_first_in_first_out():
    queue = FairQueue(max_waiting=10)
    flood(queue, "a", 4)
    assert queue.take(3) == ["a0", "a1", "a2"]
    assert queue.take(3) == ["a3"]
    assert len(queue) == 0


def test_tenants_take_turns_one_request_each():
    queue = FairQueue(max_waiting=100)
    flood(queue, "a", 5)
    flood(queue, "b", 2)
    flood(queue, "c", 1)
    assert queue.take(4) == ["a0", "b0", "c0", "a1"]
    assert queue.take(10) == ["b1", "a2", "a3", "a4"]


def test_a_late_tenant_waits_for_one_request_of_a_flood_not_all_of_it():
    queue = FairQueue(max_waiting=300)
    flood(queue, "a", 200)
    assert queue.take(1) == ["a0"]
    queue.push("b", "b0", 1)
    # One slot frees at a time, as requests finish.
    assert [queue.take(1) for _ in range(3)] == [["a1"], ["b0"], ["a2"]]
    # b, with one request at a time, gets every other turn.
    queue.push("b", "b1", 1)
    assert [queue.take(1) for _ in range(2)] == [["a3"], ["b1"]]


def test_the_turn_holds_until_a_request_of_many_choices_fits():
    queue = FairQueue(max_waiting=100)
    queue.push("big", "n4", 4)
    flood(queue, "small", 3)
    # Two slots would fit the small requests, but letting them pass could keep the big one waiting for ever.
    assert queue.take(2) == []
    assert queue.take(3) == []
    assert queue.take(5) == ["n4", "small0"]
    assert queue.take(1) == ["small1"]


def test_a_big_request_behind_a_flood_is_admitted_in_its_turn():
    queue = FairQueue(max_waiting=100)
    flood(queue, "a", 50)
    queue.push("b", "b-n3", 3)
    assert queue.take(1) == ["a0"]
    # b's turn: one and two free slots are not enough, and a waits too.
    assert queue.take(1) == []
    assert queue.take(2) == []
    assert queue.take(3) == ["b-n3"]
    assert queue.take(1) == ["a1"]


def test_max_waiting_counts_every_tenant():
    queue = FairQueue(max_waiting=3)
    flood(queue, "a", 2)
    queue.push("b", "b0", 1)
    with pytest.raises(QueueFull, match="3 requests are waiting"):
        queue.push("c", "c0", 1)
    queue.take(1)
    queue.push("c", "c0", 1)


def test_inflight_limit_counts_waiting_and_running_requests_of_one_tenant():
    queue = FairQueue(max_waiting=100, max_inflight_per_tenant=2)
    first, _ = flood(queue, "a", 2)
    with pytest.raises(InFlightLimit, match="2 are waiting or running"):
        queue.push("a", "a2", 1)
    queue.push("b", "b0", 1)  # another key is not affected
    assert queue.take(5) == ["a0", "b0", "a1"]
    with pytest.raises(InFlightLimit):
        queue.push("a", "a2", 1)  # running counts as much as waiting
    queue.end(first)
    queue.end(first)  # a second end (the stream's end, then its cancel) changes nothing
    assert queue.inflight("a") == 1
    queue.push("a", "a2", 1)
    with pytest.raises(InFlightLimit):
        queue.push("a", "a3", 1)


def test_no_inflight_limit_by_default():
    queue = FairQueue(max_waiting=1000)
    flood(queue, "a", 500)
    assert queue.inflight("a") == 500


def test_ending_a_waiting_request_removes_it_at_once():
    queue = FairQueue(max_waiting=100, max_inflight_per_tenant=5)
    a0, a1 = flood(queue, "a", 2)
    (b0,) = flood(queue, "b", 1)
    assert queue.end(a1) is True
    assert queue.end(b0) is True
    assert len(queue) == 1 and queue.inflight("a") == 1 and queue.inflight("b") == 0
    assert queue.take(10) == ["a0"]
    assert queue.end(a0) is False  # was running
    # b left the turn with its last request; it joins again at the back.
    queue.push("b", "b1", 1)
    flood(queue, "c", 1)
    assert queue.take(10) == ["b1", "c0"]


def test_drain_empties_the_queue_and_keeps_counting_until_each_ends():
    queue = FairQueue(max_waiting=100, max_inflight_per_tenant=3)
    tickets = flood(queue, "a", 2) + flood(queue, "b", 1)
    assert sorted(queue.drain()) == ["a0", "a1", "b0"]
    assert len(queue) == 0 and queue.take(10) == []
    assert queue.inflight("a") == 2
    for ticket in tickets:
        assert queue.end(ticket) is False
    assert queue.inflight("a") == 0


def test_a_tenant_at_its_slot_cap_leaves_the_last_slot_to_another_key():
    queue = FairQueue(max_waiting=300, max_slots_per_tenant=3)
    flood(queue, "a", 200)
    assert queue.take(4) == ["a0", "a1", "a2"]
    # a holds 3 slots: the fourth stays free, and b's request takes it the moment it arrives.
    assert queue.take(1, {"a": 3}) == []
    queue.push("b", "b0", 1)
    assert queue.take(1, {"a": 3}) == ["b0"]
    # a keeps its place in the turn while it is passed over.
    queue.push("c", "c0", 1)
    assert queue.take(2, {"a": 2, "b": 1}) == ["a3", "c0"]


def test_a_request_of_more_choices_than_the_cap_runs_when_its_tenant_holds_none():
    queue = FairQueue(max_waiting=100, max_slots_per_tenant=2)
    queue.push("a", "a-n4", 4)
    queue.push("a", "a-n1", 1)
    assert queue.take(8, {}) == ["a-n4"]
    assert queue.take(4, {"a": 4}) == []
    assert queue.take(8, {}) == ["a-n1"]


def test_no_slot_cap_by_default():
    queue = FairQueue(max_waiting=100)
    flood(queue, "a", 8)
    assert queue.take(8, {"a": 0}) == [f"a{i}" for i in range(8)]


def test_check_refuses_what_push_would_without_queueing_anything():
    queue = FairQueue(max_waiting=3, max_inflight_per_tenant=2)
    flood(queue, "a", 2)
    with pytest.raises(InFlightLimit):
        queue.check("a")
    queue.check("b")  # another key still fits
    queue.push("b", "b0", 1)
    with pytest.raises(QueueFull):
        queue.check("c")
    assert len(queue) == 3 and queue.inflight("c") == 0

"""The Pub/Sub subscriber side (`app.broker.pubsub.pull`) against a scripted StreamingPull API.

A fake subscriber client answers the stream with the deliveries a test queues (as Pub/Sub
would: a key's messages in order, several per response) and records every ack and
ModifyAckDeadline, so hand-out order, gating and lease handling are checked exactly.
Failed acks and modacks carry Pub/Sub's per-ack-id ErrorInfo, as with exactly-once delivery.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.rpc import code_pb2, error_details_pb2, status_pb2

from app.broker.base import BrokerUnavailable
from app.broker.pubsub import settle
from app.broker.pubsub.pull import HELD_MAX_BYTES, MAX_RETRY_BACKOFF, Puller
from app.settings import Settings

SUB = "projects/p/subscriptions/s"


def exactly_once_error(failures: dict[str, str]) -> gexc.InvalidArgument:
    """What Pub/Sub answers an ack/modack naming invalid ack ids, with exactly-once delivery on."""
    info = error_details_pb2.ErrorInfo(
        reason="EXACTLY_ONCE_ACKID_FAILURE", domain="pubsub.googleapis.com", metadata=failures
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="Some acknowledgement ids were invalid.")
    status.details.add().Pack(info)
    call = SimpleNamespace(
        code=lambda: grpc.StatusCode.INVALID_ARGUMENT,
        details=lambda: status.message,
        trailing_metadata=lambda: (("grpc-status-details-bin", status.SerializeToString()),),
    )
    return gexc.InvalidArgument(status.message, response=call)


class FakeSubscriberClient:
    def __init__(self) -> None:
        self.responses: queue.Queue = queue.Queue()
        self.acked: list[str] = []
        self.modacks: list[tuple[tuple[str, ...], int]] = []
        self.streams: list = []  # the opening request of each stream
        self.heartbeats = 0
        self.reads = 0  # responses the puller has taken off the stream
        self.refuse: dict[str, dict[str, str]] = {"ack": {}, "modack": {}}  # ack id -> ErrorInfo reason
        self.flow_control = False  # like Google's server: send nothing while max_outstanding_messages are out
        self.outstanding: set[str] = set()  # delivered ack ids neither acked nor nacked (deadline 0)
        self.lock = threading.Lock()
        self._ack_ids = itertools.count(1)

    def deliver(self, *messages: tuple[str, str], attempt: int = 0) -> list[str]:
        """Queue one stream response of (message_id, key) deliveries; returns their ack ids."""
        received = []
        for message_id, key in messages:
            ack_id = f"ack-{next(self._ack_ids)}"
            received.append(
                SimpleNamespace(
                    ack_id=ack_id,
                    delivery_attempt=attempt,
                    message=SimpleNamespace(
                        message_id=message_id, data=message_id.encode(), attributes={"dedup_id": message_id},
                        ordering_key=key,
                    ),
                )
            )
        self.responses.put(received)
        return [r.ack_id for r in received]

    def fail_stream(self, exc: Exception) -> None:
        self.responses.put(exc)

    def streaming_pull(self, requests, timeout, retry):
        requests = iter(requests)
        opening = next(requests)
        with self.lock:
            self.streams.append(opening)

        def read_requests() -> None:
            for _ in requests:
                with self.lock:
                    self.heartbeats += 1

        threading.Thread(target=read_requests, daemon=True).start()
        cancelled = threading.Event()

        def full() -> bool:
            with self.lock:
                return self.flow_control and len(self.outstanding) >= opening.max_outstanding_messages

        def responses():
            while not cancelled.is_set():
                if full():
                    time.sleep(0.01)
                    continue
                try:
                    answer = self.responses.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(answer, Exception):
                    raise answer
                with self.lock:
                    self.reads += 1
                    self.outstanding.update(r.ack_id for r in answer)
                yield SimpleNamespace(received_messages=answer)

        return _Stream(responses(), cancelled)

    def _refused(self, kind: str, ack_ids) -> None:
        failures = {a: self.refuse[kind][a] for a in ack_ids if a in self.refuse[kind]}
        if failures:
            raise exactly_once_error(failures)

    def acknowledge(self, request, timeout):
        with self.lock:
            self.acked.extend(a for a in request["ack_ids"] if a not in self.refuse["ack"])
            self.outstanding.difference_update(request["ack_ids"])
        self._refused("ack", request["ack_ids"])

    def modify_ack_deadline(self, request, timeout):
        with self.lock:
            self.modacks.append((tuple(request["ack_ids"]), request["ack_deadline_seconds"]))
            if request["ack_deadline_seconds"] == 0:
                self.outstanding.difference_update(request["ack_ids"])
        self._refused("modack", request["ack_ids"])

    def deadlines_of(self, ack_id: str) -> list[int]:
        with self.lock:
            return [seconds for ids, seconds in self.modacks if ack_id in ids]


class _Stream:
    def __init__(self, responses, cancelled: threading.Event) -> None:
        self._responses, self.cancel = responses, cancelled.set

    def __iter__(self):
        return self._responses


def make_puller(client: FakeSubscriberClient, **overrides) -> Puller:
    values = dict(ack_deadline_seconds=30, pull_max_messages=500, pubsub_max_lease_seconds=600)
    values.update(overrides)
    return Puller(Settings(**values), SUB, lambda: client)


@pytest.fixture
def client():
    return FakeSubscriberClient()


@pytest.fixture
def puller(client):
    p = make_puller(client)
    yield p
    p.close()
    p.join(2)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def ids(messages) -> list[str]:
    return [m.message_id for m in messages]


def test_a_one_key_backlog_comes_out_in_one_pull_in_order(client, puller):
    client.deliver(*[(f"m{i}", "t") for i in range(60)])
    got = puller.pull(500, 5.0)
    assert ids(got) == [f"m{i}" for i in range(60)]
    assert all(m.ordering_key == "t" and m.delivery_attempt == 1 for m in got)


def test_pull_respects_max_messages_and_keeps_the_rest_of_the_key_back(client, puller):
    client.deliver(*[(f"m{i}", "t") for i in range(5)], ("u0", "u"))
    first = puller.pull(3, 5.0)
    assert ids(first) == ["m0", "m1", "m2"]
    # "t" is busy until m0..m2 are settled; "u" is free.
    assert ids(puller.pull(10, 0.5)) == ["u0"]
    assert puller.pull(10, 0.2) == []
    puller.ack(first)
    assert ids(puller.pull(10, 1.0)) == ["m3", "m4"]


def test_new_deliveries_move_to_our_ack_deadline_at_once(client, puller):
    [ack_id] = client.deliver(("m0", "t"))
    puller.pull(10, 5.0)
    assert client.deadlines_of(ack_id) == [30]


def test_ack_acknowledges_and_frees_the_key(client, puller):
    ack_ids = client.deliver(("m0", "t"), ("m1", "t"))
    got = puller.pull(10, 5.0)
    puller.ack(got)
    assert client.acked == ack_ids
    client.deliver(("m2", "t"))
    assert ids(puller.pull(10, 5.0)) == ["m2"]


def test_a_redelivery_of_a_message_the_pipeline_holds_waits_and_is_acked_with_it(client, puller):
    client.deliver(("m0", "t"), ("m1", "t"))
    got = puller.pull(10, 5.0)
    # Its lease ran out on Pub/Sub's side: the key comes again from m0.
    again = client.deliver(("m0", "t"), ("m1", "t"), ("m2", "t"))
    wait_for(lambda: puller._gate.waiting_count == 3)
    assert puller.pull(10, 0.2) == []  # never two runs of one key at once
    puller.ack(got)
    # The copies of m0 and m1 were acked along with the originals; m2 is next.
    assert set(again[:2]) <= set(client.acked)
    assert ids(puller.pull(10, 1.0)) == ["m2"]


def test_a_redelivery_of_a_waiting_message_replaces_its_ack_id(client, puller):
    client.deliver(("m0", "t"))
    holding = puller.pull(10, 5.0)
    client.deliver(("m1", "t"))
    wait_for(lambda: puller._gate.waiting_count == 1)
    [new_ack] = client.deliver(("m1", "t"), attempt=2)
    wait_for(lambda: client.deadlines_of(new_ack))
    puller.ack(holding)
    [m1] = puller.pull(10, 1.0)
    assert (m1.message_id, m1.delivery_attempt, m1.handle.ack_id) == ("m1", 2, new_ack)


def test_nack_hands_back_at_once_whatever_the_delay_with_the_key_s_waiting_messages(client, puller):
    first = client.deliver(("m0", "t"), ("u0", "u"))
    got = puller.pull(10, 5.0)
    later = client.deliver(("m1", "t"))
    wait_for(lambda: puller._gate.waiting_count == 1)
    t_message = [m for m in got if m.ordering_key == "t"]
    puller.nack(t_message, delay_seconds=7)
    # Deadline 0: no longer outstanding to the stream; the retry policy spaces the redelivery.
    assert client.modacks[-1] == ((first[0], later[0]), 0)
    # m1 must not overtake m0, which Pub/Sub redelivers after its backoff (with m1).
    assert puller.pull(10, 0.2) == []
    puller.ack([m for m in got if m.ordering_key == "u"])


def test_a_key_s_later_message_never_overtakes_one_handed_back(client, puller):
    client.deliver(("m5", "t"), ("m6", "t"))
    m5, m6 = puller.pull(10, 5.0)
    puller.nack([m6], delay_seconds=60)  # m6 handed back (the table held enough), m5 kept
    # m7 was on its way to this stream before the nack reached Pub/Sub.
    [m7_ack] = client.deliver(("m7", "t"))
    wait_for(lambda: client.deadlines_of(m7_ack))
    puller.ack([m5])
    assert puller.pull(10, 0.3) == []  # m7 must not be applied before m6
    assert client.deadlines_of(m7_ack) == [0]  # handed back at once: Pub/Sub redelivers the key in order
    assert m7_ack not in client.acked
    # m6's backoff passed: Pub/Sub redelivers the key from m6, in order.
    client.deliver(("m6", "t"), ("m7", "t"))
    assert ids(puller.pull(10, 5.0)) == ["m6", "m7"]


def test_the_redelivered_message_ends_the_deferral_of_its_key(client, puller):
    client.deliver(("m0", "t"))
    puller.nack(puller.pull(10, 5.0), delay_seconds=0)
    client.deliver(("m0", "t"), ("m1", "t"))
    assert ids(puller.pull(10, 5.0)) == ["m0", "m1"]


def test_a_deferral_is_forgotten_after_the_longest_retry_backoff(client, puller):
    client.deliver(("m0", "t"))
    puller.nack(puller.pull(10, 5.0), delay_seconds=30)
    puller._deferred["t"].since -= MAX_RETRY_BACKOFF + puller.ack_deadline  # m0 went to another replica
    client.deliver(("m1", "t"))
    assert ids(puller.pull(10, 5.0)) == ["m1"]


def test_a_waiting_table_s_backlog_never_holds_the_stream_s_flow_control(client):
    # As Google's server: nothing more is sent while max_outstanding_messages are neither
    # acked nor nacked. One table waits (its messages handed back with a delay) while its
    # backlog is 3 x PULL_MAX_MESSAGES; the other table's message must still come.
    client.flow_control = True
    puller = make_puller(client, pull_max_messages=2)
    try:
        for n in range(3):
            client.deliver((f"t{2 * n}", "t"), (f"t{2 * n + 1}", "t"))
        client.deliver(("u0", "u"))
        handed_out: list[str] = []
        for _ in range(6):  # the pipeline hands every message of t back: t waits
            got = puller.pull(10, 2.0)
            handed_out += ids(got)
            if not got or "u0" in handed_out:
                break
            puller.nack([m for m in got if m.ordering_key == "t"], delay_seconds=30)
        assert "u0" in handed_out
        assert [i for i in handed_out if i.startswith("t")] == ["t0", "t1", "t2", "t3"]  # t4, t5 behind them
    finally:
        puller.close()


def test_messages_without_an_ordering_key_are_never_held_back(client, puller):
    client.deliver(("a", ""), ("b", ""))
    assert ids(puller.pull(1, 5.0)) == ["a"]
    assert ids(puller.pull(1, 1.0)) == ["b"]


def test_the_lease_keeper_extends_held_messages_until_the_max_lease(client):
    puller = make_puller(client, pubsub_max_lease_seconds=600)
    try:
        out, waiting = client.deliver(("m0", "t"), ("u0", "u"))
        puller.pull(1, 5.0)  # m0 to the pipeline; u0 stays waiting
        puller.extend_leases()
        assert sorted(client.modacks[-1][0]) == [out, waiting] and client.modacks[-1][1] == 30

        puller.max_lease = 0.0  # both are now held past the max lease
        client.modacks.clear()
        puller.extend_leases()
        assert client.modacks == []
        # The waiting one is left to Pub/Sub; the pipeline's keeps its key busy here.
        assert puller._gate.waiting_count == 0
        puller.max_lease = 600.0  # (for m1; m0 stays left to expire)
        client.deliver(("m1", "t"))
        wait_for(lambda: puller._gate.waiting_count == 1)
        assert puller.pull(10, 0.2) == []
        client.modacks.clear()
        puller.extend_leases()
        assert client.modacks[-1][0] == (puller._gate.waiting()[0].ack_id,)
    finally:
        puller.close()


def test_leases_are_extended_on_the_keeper_s_interval_not_on_every_pull_and_ack(client, puller):
    [held_ack] = client.deliver(("h0", "h"))
    held = puller.pull(10, 5.0)
    for n in range(5):
        client.deliver((f"t{n}", "t"))
        puller.ack(puller.pull(10, 5.0))
    assert client.deadlines_of(held_ack) == [30]  # only when it arrived (next due after 10 s)
    puller.ack(held)


def test_the_stream_opens_with_flow_control_our_deadline_and_one_client_id_across_reopens(client):
    puller = make_puller(client, pull_max_messages=3)
    try:
        puller.start()
        wait_for(lambda: client.streams)
        client.fail_stream(gexc.ServiceUnavailable("stream closed by the server"))
        wait_for(lambda: len(client.streams) == 2)
        first, second = client.streams
        assert (first.max_outstanding_messages, first.max_outstanding_bytes) == (6, HELD_MAX_BYTES)
        assert first.stream_ack_deadline_seconds == 30 and first.subscription == SUB
        # The server carries key affinity over to a reopened stream with the same client id.
        assert first.client_id and second.client_id == first.client_id
    finally:
        puller.close()


def test_the_puller_stops_reading_the_stream_while_it_holds_twice_pull_max_messages(client):
    puller = make_puller(client, pull_max_messages=3)
    try:
        client.deliver(*[(f"m{i}", f"k{i}") for i in range(6)])
        client.deliver(("m6", "k6"))
        puller.start()
        wait_for(lambda: puller._gate.waiting_count == 6)
        time.sleep(0.3)
        assert (client.reads, puller._gate.waiting_count) == (1, 6)  # the next response stays unread
        puller.ack(puller.pull(2, 1.0))
        wait_for(lambda: puller._gate.waiting_count == 5)
        assert client.reads == 2
    finally:
        puller.close()


def test_a_failing_stream_is_broker_unavailable_until_it_works_again(client, puller):
    client.fail_stream(gexc.PermissionDenied("no pubsub.subscriptions.consume"))
    with pytest.raises(BrokerUnavailable, match="PermissionDenied"):
        puller.pull(10, 5.0)
    client.deliver(("m0", "t"))
    wait_for(lambda: puller.error is None)
    assert ids(puller.pull(10, 5.0)) == ["m0"]


def test_the_lease_counts_from_the_delivery_not_from_the_hand_out(client, puller):
    client.deliver(("m0", "t"))
    puller.start()
    wait_for(lambda: puller._gate.waiting_count == 1)
    delivered = puller._gate.waiting()[0].received_at
    time.sleep(0.05)
    [m0] = puller.pull(10, 1.0)
    assert m0.received_at == delivered
    assert not m0.lease_lost


def test_a_failed_ack_is_broker_unavailable_and_still_frees_the_key(client, puller, monkeypatch):
    monkeypatch.setattr(settle, "RETRY_DELAY", 0.0)
    client.deliver(("m0", "t"))
    got = puller.pull(10, 5.0)

    def broken(request, timeout):
        raise gexc.ServiceUnavailable("down")

    client.acknowledge = broken
    with pytest.raises(BrokerUnavailable):
        puller.ack(got)  # retried (transient) first, then reported
    client.deliver(("m1", "t"))
    assert ids(puller.pull(10, 5.0)) == ["m1"]


def test_close_gives_back_what_the_pipeline_never_took(client):
    puller = make_puller(client)
    [ack_id] = client.deliver(("m0", "t"))
    puller.start()
    wait_for(lambda: puller._gate.waiting_count == 1)
    puller.close()
    assert client.modacks[-1] == ((ack_id,), 0)
    with pytest.raises(BrokerUnavailable):
        puller.pull(10, 0.1)


# --- exactly-once delivery: every ack and modack result is checked


def failures(op: str) -> float:
    from app import metrics

    return sum(
        sample.value
        for metric in metrics.SUBSCRIBER.collect() if metric.name == "pubsub_settle_failures"
        for sample in metric.samples if sample.name.endswith("_total") and sample.labels["op"] == op
    )


def test_a_refused_ack_is_counted_and_logged_and_the_others_hold(client, puller, caplog):
    a0, a1 = client.deliver(("m0", "t"), ("u0", "u"))
    got = puller.pull(10, 5.0)
    client.refuse["ack"][a0] = "PERMANENT_FAILURE_INVALID_ACK_ID"
    before = failures("ack")
    puller.ack(got)  # not an error for the pipeline: m0 comes back and the warehouse dedups it
    assert client.acked == [a1]
    assert failures("ack") == before + 1
    assert "refused 1 of 2 ack(s)" in caplog.text


def test_a_transient_per_ack_id_failure_is_retried(client, puller, monkeypatch):
    monkeypatch.setattr(settle, "RETRY_DELAY", 0.0)
    [a0] = client.deliver(("m0", "t"))
    got = puller.pull(10, 5.0)
    calls = []
    original = client.acknowledge

    def flaky(request, timeout):
        calls.append(list(request["ack_ids"]))
        if len(calls) == 1:
            raise exactly_once_error({a0: "TRANSIENT_FAILURE_UNORDERED_ACK_ID"})
        original(request, timeout)

    client.acknowledge = flaky
    before = failures("ack")
    puller.ack(got)
    assert calls == [[a0], [a0]] and client.acked == [a0]
    assert failures("ack") == before


def test_a_refused_lease_extension_drops_what_waits_and_marks_what_the_pipeline_has(client, puller):
    out, waiting, kept = client.deliver(("m0", "t"), ("m1", "t"), ("u0", "u"))
    [m0] = puller.pull(1, 5.0)  # m1 waits behind m0
    [u0] = puller.pull(10, 1.0)
    client.refuse["modack"].update({out: "PERMANENT_FAILURE_INVALID_ACK_ID", waiting: "PERMANENT_FAILURE_INVALID_ACK_ID"})
    before = failures("lease")
    puller.extend_leases()
    assert failures("lease") == before + 2
    assert m0.lease_lost and not u0.lease_lost
    assert puller._gate.waiting_count == 0  # m1 is Pub/Sub's again
    client.modacks.clear()
    puller.extend_leases()
    assert client.modacks == [((kept,), 30)]  # a lost lease is not extended any more


def test_a_delivery_whose_receipt_modack_is_refused_is_never_handed_out(client, puller):
    client.refuse["modack"]["ack-1"] = "PERMANENT_FAILURE_INVALID_ACK_ID"
    client.deliver(("m0", "t"), ("m1", "u"))
    assert ids(puller.pull(10, 5.0)) == ["m1"]
    assert puller.pull(10, 0.2) == []


def test_intake_is_full_when_the_window_holds_only_keys_the_pipeline_has(client):
    puller = make_puller(client, pull_max_messages=2)  # a window of 4
    try:
        client.deliver(("t0", "t"), ("t1", "t"))
        client.deliver(("t2", "t"), ("t3", "t"))
        client.deliver(("u0", "u"))
        got = puller.pull(2, 5.0)
        wait_for(lambda: puller._gate.waiting_count == 2)
        assert ids(got) == ["t0", "t1"] and puller.pull(10, 0.2) == []
        assert puller.intake_full()  # t2, t3 wait behind the pipeline's t0, t1: u0 stays unread
        puller.nack(got, delay_seconds=30)  # the pipeline hands its waiting table back
        assert not puller.intake_full()
        assert ids(puller.pull(10, 5.0)) == ["u0"]
    finally:
        puller.close()

"""The fault layer itself, checked through Google's own client libraries against the emulators.

If these pass, an error the proxy serves is the error Google's libraries would raise for
the real service (same exception class, same structured `errors[].reason`, the same
`StorageError` code in AppendRows' status details), and the Pub/Sub gate keeps the
ordering, lease and dead-letter rules the e2e fault tests rely on.
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid

import grpc
import pytest

from tests.support.fault_proxy import BigQueryRestProxy, GrpcProxy, OrderingGate, SchemaVisibility, StorageWriteFaults, errors

pytestmark = [pytest.mark.emulator]


@pytest.fixture(scope="module")
def emu():
    from tests.support.bqemulator import shared_emulator

    return shared_emulator()


@pytest.fixture
def bq(emu):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    lag = SchemaVisibility(lag_seconds=3600)
    with BigQueryRestProxy(emu.rest, schema=lag) as rest, GrpcProxy(emu.grpc, storage_write=StorageWriteFaults(lag)) as writes:
        client = bigquery.Client(project=emu.project, credentials=AnonymousCredentials(),
                                 client_options=ClientOptions(api_endpoint=f"http://{rest.address}"))
        dataset = f"fp_{uuid.uuid4().hex[:8]}"
        client.create_dataset(dataset)
        client.create_table(bigquery.Table(f"{emu.project}.{dataset}.t", schema=[bigquery.SchemaField("id", "INT64")]))
        yield client, rest, writes, lag, dataset
        client.close()


@pytest.mark.parametrize("make, cls, reason", [
    (errors.quota_exceeded, "Forbidden", "quotaExceeded"),
    (errors.rate_limit_exceeded, "Forbidden", "rateLimitExceeded"),
])  # fmt: skip
def test_quota_errors_reach_the_client_as_google_sends_them(bq, make, cls, reason):
    client, rest, *_ = bq
    rest.add(make(), errors.QUERY_KINDS, times=1)
    with pytest.raises(Exception) as info:  # retry=None: see the error itself, not the client's retry of it
        client.query_and_wait("SELECT 1", retry=None, job_retry=None)
    assert type(info.value).__name__ == cls and info.value.code == 403
    assert [e["reason"] for e in info.value.errors] == [reason]
    assert rest.faults == {"jobs.query": 1}
    assert list(client.query_and_wait("SELECT 2 AS x")) and rest.rules[0].hits == 1  # spent after one call


def test_jobs_query_resolves_names_in_the_default_dataset_as_google_does(bq):
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    client, _, _, _, dataset = bq
    client.query_and_wait(f"INSERT INTO {dataset}.t (id) VALUES (4)")
    config = bigquery.QueryJobConfig(default_dataset=f"{client.project}.{dataset}")
    assert [r[0] for r in client.query_and_wait("SELECT id FROM t", job_config=config)] == [4]
    with pytest.raises(gexc.NotFound):
        client.query_and_wait("SELECT id FROM no_such_table", job_config=config, job_retry=None)


@pytest.mark.parametrize("how", ["jobs.insert", "jobs.query"])
def test_dml_queue_error_fails_the_job_and_never_runs_the_statement(bq, how):
    from google.api_core import exceptions as gexc

    client, rest, _, _, dataset = bq
    client.query_and_wait(f"INSERT INTO {dataset}.t (id) VALUES (1)")
    rest.add(errors.dml_queue_full(f"{dataset}.t"), errors.QUERY_KINDS, times=1, sql=r"^\s*DELETE")
    sql = f"DELETE FROM {dataset}.t WHERE id = 1"
    with pytest.raises(gexc.BadRequest) as info:
        client.query(sql, job_retry=None).result() if how == "jobs.insert" else client.query_and_wait(sql, job_retry=None)
    assert info.value.errors[0]["reason"] == "resourcesExceeded"
    assert "Too many DML statements outstanding" in info.value.errors[0]["message"]
    assert [r[0] for r in client.query_and_wait(f"SELECT id FROM {dataset}.t")] == [1]  # not deleted


def test_a_new_column_is_refused_by_appendrows_with_schema_mismatch_extra_fields(bq, emu):
    import pyarrow as pa
    from google.cloud import bigquery
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types
    from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

    client, rest, writes, lag, dataset = bq
    t = client.get_table(f"{dataset}.t")
    t.schema = [*t.schema, bigquery.SchemaField("note", "STRING")]
    client.update_table(t, ["schema"])
    assert lag.added(dataset, "t") == {"note"}  # seen by the REST proxy
    schema = pa.schema([("id", pa.int64()), ("note", pa.string())])
    batch = pa.RecordBatch.from_arrays([pa.array([1]), pa.array(["x"])], schema=schema)
    stream = f"projects/{emu.project}/datasets/{dataset}/tables/t/streams/_default"
    request = types.AppendRowsRequest(write_stream=stream, arrow_rows=types.AppendRowsRequest.ArrowData(
        writer_schema=types.ArrowSchema(serialized_schema=schema.serialize().to_pybytes()),
        rows=types.ArrowRecordBatch(serialized_record_batch=batch.serialize().to_pybytes())))  # fmt: skip
    writer = BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=grpc.insecure_channel(writes.address)))
    response = next(iter(writer.append_rows(iter([request]), metadata=(("x-goog-request-params", f"write_stream={stream}"),))))
    assert response.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    detail = types.StorageError.pb()()
    assert response.error.details[0].Unpack(detail)
    assert detail.code == types.StorageError.StorageErrorCode.SCHEMA_MISMATCH_EXTRA_FIELDS
    assert "note" in detail.error_message and detail.entity == stream


def test_a_committed_pending_stream_says_so_and_refuses_a_second_commit_as_google_does(bq, emu):
    import pyarrow as pa
    from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types
    from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport

    client, rest, writes, lag, dataset = bq
    parent = f"projects/{emu.project}/datasets/{dataset}/tables/t"
    writer = BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=grpc.insecure_channel(writes.address)))
    stream = writer.create_write_stream(parent=parent, write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING))
    schema = pa.schema([("id", pa.int64())])
    batch = pa.RecordBatch.from_arrays([pa.array([7])], schema=schema)
    request = types.AppendRowsRequest(write_stream=stream.name, arrow_rows=types.AppendRowsRequest.ArrowData(
        writer_schema=types.ArrowSchema(serialized_schema=schema.serialize().to_pybytes()),
        rows=types.ArrowRecordBatch(serialized_record_batch=batch.serialize().to_pybytes())))  # fmt: skip
    next(iter(writer.append_rows(iter([request]), metadata=(("x-goog-request-params", f"write_stream={stream.name}"),))))
    writer.finalize_write_stream(name=stream.name)
    assert not writer.get_write_stream(name=stream.name).commit_time  # PENDING, not committed: empty
    commit = types.BatchCommitWriteStreamsRequest(parent=parent, write_streams=[stream.name])
    first = writer.batch_commit_write_streams(request=commit)
    assert first.commit_time and not first.stream_errors
    assert writer.get_write_stream(name=stream.name).commit_time == first.commit_time
    again = writer.batch_commit_write_streams(request=commit)
    assert not again.commit_time
    assert [(e.code, e.entity) for e in again.stream_errors] == [
        (types.StorageError.StorageErrorCode.STREAM_ALREADY_COMMITTED, stream.name)
    ]
    assert [r.id for r in client.query_and_wait(f"SELECT id FROM `{dataset}.t`")] == [7]  # once


@contextlib.contextmanager
def _gated_pubsub(retry_policy: dict | None = None, clock=time.monotonic):
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    from tests.support.pstest import running_pstest

    with running_pstest() as address:
        gate = OrderingGate(clock=clock)
        with GrpcProxy(address, pubsub=gate) as proxy:
            pub = pubsub_v1.PublisherClient(
                publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
                transport=PublisherGrpcTransport(channel=grpc.insecure_channel(proxy.address)))  # fmt: skip
            sub = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(proxy.address)))
            pub.create_topic(name="projects/p/topics/t")
            pub.create_topic(name="projects/p/topics/dl")
            extra = {"retry_policy": retry_policy} if retry_policy else {}
            sub.create_subscription(request={
                "name": "projects/p/subscriptions/s", "topic": "projects/p/topics/t", "ack_deadline_seconds": 10,
                "enable_message_ordering": True,
                "dead_letter_policy": {"dead_letter_topic": "projects/p/topics/dl", "max_delivery_attempts": 5}, **extra})  # fmt: skip
            for f in [pub.publish("projects/p/topics/t", f"{k}{i}".encode(), ordering_key=k) for i in range(8) for k in "ab"]:
                f.result()
            yield gate, sub, pub
            sub.close()
            pub.stop()
        gate.close()


@pytest.fixture
def pubsub():
    with _gated_pubsub() as (gate, sub, _):
        yield gate, sub


class _Clock:
    """The gate's time, moved on by the test (no test waits for a backoff)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def retrying():
    clock = _Clock()
    with _gated_pubsub({"minimum_backoff": {"seconds": 10}, "maximum_backoff": {"seconds": 30}}, clock) as (gate, sub, pub):
        yield gate, sub, pub, clock


def _pull(sub) -> list:
    return list(sub.pull(subscription="projects/p/subscriptions/s", max_messages=100, timeout=10).received_messages)


def _data(msgs) -> list[str]:
    return [m.message.data.decode() for m in msgs]


def test_ordering_keys_are_enforced_and_a_nack_redelivers_the_rest_of_the_key_in_order(pubsub):
    gate, sub = pubsub
    first = _pull(sub)
    by_key = {k: [d for d in _data(first) if d.startswith(k)] for k in "ab"}
    assert by_key == {"a": [f"a{i}" for i in range(8)], "b": [f"b{i}" for i in range(8)]}  # in order, many per pull
    assert {m.delivery_attempt for m in first} == {1}  # the subscription has a dead-letter policy
    assert _pull(sub) == []  # nothing of a key while earlier messages of it are outstanding
    a = [m for m in first if m.message.ordering_key == "a"]
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in a[:3]])
    sub.modify_ack_deadline(subscription="projects/p/subscriptions/s", ack_ids=[a[3].ack_id], ack_deadline_seconds=0)
    again = _pull(sub)
    assert _data(again) == [f"a{i}" for i in range(3, 8)]  # the nacked one and every later one of its key
    assert {m.delivery_attempt for m in again} == {2}
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in a[4:]])
    assert gate.late_acks == 4  # acks of the leases the nack ended (a4..a7) are dropped


def test_an_expired_lease_redelivers_and_too_many_attempts_go_to_the_dead_letter_topic(pubsub):
    gate, sub = pubsub
    first = _pull(sub)
    b = [m.ack_id for m in first if m.message.ordering_key == "b"]
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=b)
    a = [m.ack_id for m in first if m.message.ordering_key == "a"]
    sub.modify_ack_deadline(subscription="projects/p/subscriptions/s", ack_ids=a, ack_deadline_seconds=1)
    time.sleep(1.2)  # the lease runs out (not a timing assertion: the gate's deadline passed)
    for attempt in range(2, 6):
        got = _pull(sub)
        assert _data(got) == [f"a{i}" for i in range(8)] and {m.delivery_attempt for m in got} == {attempt}
        sub.modify_ack_deadline(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in got], ack_deadline_seconds=0)
    assert _pull(sub) == []
    assert sorted(gate.dead_lettered) == sorted({m.message.message_id for m in first if m.message.ordering_key == "a"})
    assert gate.expired == 1  # a0 ran out first and took the rest of its key back with it


def test_acking_a_later_message_of_a_key_before_an_earlier_one_is_recorded(pubsub):
    gate, sub = pubsub
    first = _pull(sub)
    a = [m for m in first if m.message.ordering_key == "a"]
    b = [m for m in first if m.message.ordering_key == "b"]
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in b])  # all of b at once: fine
    assert gate.violations == []
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=[a[5].ack_id])
    assert len(gate.violations) == 1 and a[5].message.message_id in gate.violations[0]


def _nack(sub, msgs) -> None:
    sub.modify_ack_deadline(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in msgs], ack_deadline_seconds=0)


def _ack(sub, msgs) -> None:
    sub.acknowledge(subscription="projects/p/subscriptions/s", ack_ids=[m.ack_id for m in msgs])


def test_without_a_retry_policy_a_nacked_message_comes_back_at_once(pubsub):
    gate, sub = pubsub
    first = _pull(sub)
    _nack(sub, first)
    assert sorted(_data(_pull(sub))) == sorted(_data(first)) and gate.backoffs == 0


def test_a_nacked_message_waits_out_the_retry_policy_s_backoff_and_its_key_waits_behind_it(retrying):
    gate, sub, _, clock = retrying
    first = _pull(sub)
    a = [m for m in first if m.message.ordering_key == "a"]
    _ack(sub, a[:3])
    _ack(sub, [m for m in first if m.message.ordering_key == "b"])
    _nack(sub, [a[3]])  # a3 backs off 10 s; a4..a7 were outstanding and come back behind it
    assert _pull(sub) == []
    clock.now += 9
    assert _pull(sub) == []
    clock.now += 1
    again = _pull(sub)
    assert _data(again) == [f"a{i}" for i in range(3, 8)]
    _nack(sub, again[:1])  # a3's second nack: 20 s (exponential), a4..a7 behind it again
    clock.now += 19
    assert _pull(sub) == []
    clock.now += 1
    third = _pull(sub)
    assert _data(third) == [f"a{i}" for i in range(3, 8)]
    _nack(sub, third[:1])  # third nack: 40 s, capped at the policy's maximum of 30 s
    clock.now += 30
    assert _data(_pull(sub)) == [f"a{i}" for i in range(3, 8)]
    assert gate.backoffs == 3 and gate.violations == []


def test_an_expired_lease_backs_off_too_and_other_keys_flow_meanwhile(retrying):
    gate, sub, pub, clock = retrying
    first = _pull(sub)
    _ack(sub, [m for m in first if m.message.ordering_key == "b"])
    clock.now += 10  # a's leases run out: a0 (and a1..a7 behind it) back off 10 s
    pub.publish("projects/p/topics/t", b"c0", ordering_key="c").result()
    assert _data(_pull(sub)) == ["c0"]
    clock.now += 10
    assert _data(_pull(sub)) == [f"a{i}" for i in range(8)]
    assert gate.expired >= 1 and gate.backoffs >= 1


def test_a_stream_is_sent_nothing_while_max_outstanding_messages_are_leased(retrying):
    from google.pubsub_v1 import types as t

    gate, sub, _, clock = retrying
    requests: queue.Queue = queue.Queue()
    requests.put(t.StreamingPullRequest(subscription="projects/p/subscriptions/s", stream_ack_deadline_seconds=60,
                                        max_outstanding_messages=4, client_id="c"))  # fmt: skip

    def send():
        while (r := requests.get()) is not None:
            yield r

    responses = iter(sub.streaming_pull(requests=send()))
    try:
        got = list(next(responses).received_messages)
        first_keys = {m.message.ordering_key for m in got}  # the gate serves a or b first
        assert len(got) == 4 and len(first_keys) == 1
        # A longer deadline keeps them outstanding: the stream stays full (the rest waits).
        requests.put(t.StreamingPullRequest(modify_deadline_ack_ids=[m.ack_id for m in got],
                                            modify_deadline_seconds=[120] * 4))  # fmt: skip
        # Nacked: no longer outstanding; that key backs off and the other is the next thing sent.
        requests.put(t.StreamingPullRequest(modify_deadline_ack_ids=[m.ack_id for m in got],
                                            modify_deadline_seconds=[0] * 4))  # fmt: skip
        more = list(next(responses).received_messages)
        assert {m.message.ordering_key for m in more} == {"a", "b"} - first_keys and len(more) == 4
    finally:
        requests.put(None)


"""Listing and replaying the Pub/Sub dead-letter subscription, on pstest.

pstest has no dead-letter policy, so what Pub/Sub would forward is published to the
dead-letter topic here the way Pub/Sub does it: the original data, attributes and
ordering key plus its `CloudPubSubDeadLetterSource*` attributes.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import orjson
import pytest
from typer.testing import CliRunner

from app.broker.base import OutgoingMessage
from app.broker.pubsub import PubSubBroker
from app.broker.pubsub.deadletters import DeadLetterSubscription
from app.broker.pubsub.publisher import Publisher
from app.messages.codec import decode_message, encode_batch
from app.messages.deadletters import DeadLetterStore, rejected_activity_batch_id
from app.pipeline.subscriber import Subscriber
from app.provision import provision_pubsub
from app.schema.activity import Activity
from tests.broker.test_pubsub import make_settings, msg, pull_until
from tests.support.memory_warehouse import MemoryWarehouse
from tests.support.subscribers import running, wait_until

pytestmark = pytest.mark.emulator


@pytest.fixture
def settings(pubsub_emulator):
    s = make_settings()
    provision_pubsub(s)
    return s


def dead_lettered_by_pubsub(settings, table: str, n: int, original: OutgoingMessage | None = None) -> OutgoingMessage:
    """Publish to the dead-letter topic what Pub/Sub's dead-letter policy would."""
    original = original or msg(table, n)
    forwarded = OutgoingMessage(
        data=original.data,
        ordering_key="",  # the dead-letter topic's own subscription is not ordered
        attributes=original.attributes | {
            "CloudPubSubDeadLetterSourceDeliveryCount": "5",
            "CloudPubSubDeadLetterSourceSubscription": settings.pubsub_subscription,
            "CloudPubSubDeadLetterSourceSubscriptionProject": settings.gcp_project,
            "CloudPubSubDeadLetterSourceTopicPublishTime": "2026-11-27T12:00:00Z",
        },
    )
    publisher = Publisher(settings, f"projects/{settings.gcp_project}/topics/{settings.pubsub_topic}-dead-letter")
    try:
        asyncio.run(publisher.publish([forwarded]))
    finally:
        publisher.close()
    return original


def forwarded_by_pipeline(settings, broker: PubSubBroker, table: str, n: int) -> None:
    asyncio.run(broker.publish([msg(table, n)], batch_id="b"))
    [received] = pull_until(broker, 1, ack=False)
    broker.forward_dead_letters([(received, "undecodable: not JSON")])
    broker.ack([received])


def listed(settings, expected: int):
    subscription = DeadLetterSubscription(settings)
    try:
        deadline = time.monotonic() + 20
        while True:
            got = subscription.list(50)
            if len(got) >= expected or time.monotonic() > deadline:
                return got
    finally:
        subscription.close()


def test_list_shows_both_kinds_and_gives_them_back(settings):
    broker = PubSubBroker(settings)
    try:
        dead_lettered_by_pubsub(settings, "orders", 1)
        forwarded_by_pipeline(settings, broker, "users", 2)
    finally:
        broker.close()
    first = listed(settings, 2)
    assert sorted((m.table, m.forwarded_by_pipeline, m.reason) for m in first) == [
        ("orders", False, "Pub/Sub dead-lettered it after 5 delivery attempts"),
        ("users", True, "undecodable: not JSON"),
    ]
    # Listing consumed nothing.
    assert sorted(m.message_id for m in listed(settings, 2)) == sorted(m.message_id for m in first)


def test_replay_republishes_pubsub_s_dead_letters_with_their_key_and_acks_them(settings):
    broker = PubSubBroker(settings)
    try:
        original = dead_lettered_by_pubsub(settings, "orders", 1)
        forwarded_by_pipeline(settings, broker, "users", 2)
        listed(settings, 2)  # both have arrived

        subscription = DeadLetterSubscription(settings)
        try:
            assert subscription.replay() == (1, 1)
        finally:
            subscription.close()

        [again] = pull_until(broker, 1)
        assert (again.data, again.attributes, again.ordering_key) == (
            original.data, original.attributes, "orders"
        )
        # What the pipeline forwarded stays (it is replayed from the dead-letter store).
        [left] = listed(settings, 1)
        assert left.forwarded_by_pipeline
    finally:
        broker.close()


def test_cli_lists_the_dead_letter_subscription(settings, monkeypatch):
    from app import cli

    dead_lettered_by_pubsub(settings, "orders", 7)
    listed(settings, 1)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-list"])
    assert result.exit_code == 0, result.output
    assert "table=orders" in result.output and "after 5 delivery attempts" in result.output
    assert "(1 dead letter on " in result.output
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-replay"])
    assert result.exit_code == 0 and result.output.startswith("replayed 1, left 0"), result.output


def test_cli_shows_a_columnar_message_as_json_and_replays_it_as_it_was_sent(settings, monkeypatch):
    from app import cli

    activity = Activity("insert", "orders", ["id", "at"], ["integer", "timestamp"], [7, "2021-03-30T06:12:44.500000Z"])
    [original] = encode_batch([activity], "b7")
    dead_lettered_by_pubsub(settings, "orders", 7, original)
    listed(settings, 1)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-list", "--json"])
    assert result.exit_code == 0, result.output
    [line] = [orjson.loads(text) for text in result.output.splitlines()]
    # The Arrow body is rendered back from its rows: one JSON object per activity.
    assert orjson.loads(line["data"]) == {
        "v": 1, "batch_id": "b7", "table": "orders",
        "activities": [{"operation": "insert", "col_names": ["id", "at"], "col_types": ["integer", "timestamp"],
                        "col_values": [7, "2021-03-30T06:12:44.500000Z"]}],
    }
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-replay"])
    assert result.exit_code == 0 and result.output.startswith("replayed 1, left 0"), result.output
    broker = PubSubBroker(settings)
    try:
        [again] = pull_until(broker, 1)
    finally:
        broker.close()
    assert again.data == original.data and again.attributes == original.attributes
    assert decode_message(again).activities == [activity]


def test_a_refused_activity_outlives_the_replica_s_disk_and_is_listed_and_replayed_from_pubsub(
    settings, tmp_path, monkeypatch
):
    from app import cli

    data_dir = tmp_path / "replica"
    settings = settings.model_copy(update={"data_dir": data_dir})
    refused = Activity("insert", "t", ["n"], ["string"], ["x"])  # "n" is created as an integer just before
    broker, store = PubSubBroker(settings), DeadLetterStore(settings.dead_letter_file)
    try:
        asyncio.run(broker.publish(encode_batch([Activity("insert", "t", ["n"], ["integer"], [1]), refused], "b1"),
                                   batch_id="b1"))
        subscriber = Subscriber(settings, broker, MemoryWarehouse(), store)
        with running(subscriber):
            wait_until(lambda: subscriber.totals.messages_acked == 1, "the message applied and acked")
    finally:
        broker.close()
        store.close()
    shutil.rmtree(data_dir)  # the replica is replaced: a fresh, empty disk
    data_dir.mkdir()
    listed(settings, 1)
    monkeypatch.setattr(cli, "get_settings", lambda: settings)
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-list"])
    assert result.exit_code == 0, result.output
    assert "kind=activity table=t" in result.output and "is integer in table t" in result.output
    result = CliRunner().invoke(cli.cli, ["dead-letters", "pubsub-replay", "--include-forwarded"])
    assert result.exit_code == 0 and result.output.startswith("replayed 1, left 0"), result.output
    broker = PubSubBroker(settings)
    try:
        [again] = pull_until(broker, 1)
    finally:
        broker.close()
    # The activity alone, under the batch id a replay from the store would use too.
    assert decode_message(again).activities == [refused]
    assert again.dedup_id == f"{rejected_activity_batch_id('b1:t:0', 1)}:t:0"

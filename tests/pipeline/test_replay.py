"""Dead-letter replay: checked against the edge validator and the table's current schema, linked to its outcome."""

from __future__ import annotations

import json

import pytest

from app.broker.local import LocalBroker
from app.messages.deadletters import DeadLetterStore, NewDeadLetter
from app.pipeline.replay import replay
from app.pipeline.subscriber import Subscriber
from app.schema.activity import Activity
from app.settings import Settings
from app.warehouse.base import Envelope
from app.warehouse.duckdb import DuckDBWarehouse
from tests.support.processes import Pipeline, wait_until
from tests.support.subscribers import running


def _activity(table, names, types, values, operation="insert"):
    return {"operation": operation, "table": table, "col_names": names, "col_types": types, "col_values": values}


def _dead(store, n, body, kind="activity"):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    table = "raw" if isinstance(body, bytes) else body["table"]
    store.add([NewDeadLetter(reason="original reason", kind=kind, payload=payload, attempts=1, table_name=table,
                             dedup_id=f"orig{n}:{table}:0", activity_index=0 if kind == "activity" else None)])


@pytest.fixture
def settings(tmp_path):
    settings = Settings(data_dir=tmp_path)
    warehouse = DuckDBWarehouse(settings)
    warehouse.apply("scores", [Envelope("seed:scores:0", "scores", [Activity("insert", "scores", ["id", "score"], ["integer", "integer"], [1, 10])])])
    warehouse.close()
    return settings


def _entries(settings):
    store = DeadLetterStore(settings.dead_letter_file)
    try:
        return {e.id: e for e in store.list(include_replayed=True)}
    finally:
        store.close()


def test_only_entries_that_would_apply_are_replayed(settings):
    store = DeadLetterStore(settings.dead_letter_file)
    _dead(store, 1, _activity("scores", ["id", "score"], ["integer", "string"], [2, "high"]))  # column is integer
    _dead(store, 2, _activity("scores", ["id", "score"], ["integer", "integer"], [3, 30]))  # fits now
    _dead(store, 3, _activity("scores", ["id"], ["integer"], ["three"]))  # the edge validator refuses it
    _dead(store, 4, b"\xff not json", kind="message")  # still undecodable
    _dead(store, 5, _activity("fresh", ["c"], ["integer"], [1]))  # creates table fresh with c integer...
    _dead(store, 6, _activity("fresh", ["c"], ["string"], ["x"]))  # ...which this one then conflicts with
    store.close()

    outcomes = {o.entry_id: o for o in replay(settings, None)}
    assert {i for i, o in outcomes.items() if o.problem is None} == {2, 5}
    assert "column 'score'" in outcomes[1].problem and "integer" in outcomes[1].problem
    assert outcomes[3].problem.startswith("user_activities[0].col_values[0]: ") and "integer" in outcomes[3].problem
    assert outcomes[4].problem.startswith("still undecodable")
    assert "would be rejected again" in outcomes[6].problem and "fresh" in outcomes[6].problem

    entries = _entries(settings)
    assert {i for i, e in entries.items() if e.replayed_at is None} == {1, 3, 4, 6}  # left where they were
    assert entries[2].replayed_batch_id == outcomes[2].batch_id and entries[5].replayed_batch_id == outcomes[5].batch_id
    assert replay(settings, [2])[0].problem.startswith("already replayed as batch ")
    assert replay(settings, [99])[0].problem == "no such dead letter"


def test_a_replay_dead_lettered_again_links_back(settings):
    store = DeadLetterStore(settings.dead_letter_file)
    _dead(store, 1, _activity("later", ["v"], ["integer"], [1]))
    store.close()
    [outcome] = replay(settings, None)
    assert outcome.problem is None

    # Between the check and the apply, someone creates `later` with v as a string.
    broker, warehouse = LocalBroker(settings), DuckDBWarehouse(settings)
    store = DeadLetterStore(settings.dead_letter_file)
    try:
        warehouse.apply("later", [Envelope("other:later:0", "later", [Activity("insert", "later", ["v"], ["string"], ["x"])])])
        subscriber = Subscriber(settings, broker, warehouse, store)
        with running(subscriber):
            wait_until(lambda: subscriber.totals.dead_lettered == 1, what="the replayed activity to be dead-lettered again")
    finally:
        broker.close()
        warehouse.close()
        store.close()
    entries = _entries(settings)
    assert entries[2].replay_of == 1 and entries[2].dedup_id.startswith(outcome.batch_id + ":")
    assert entries[1].replay_of is None


def test_replay_reads_the_schema_through_the_running_subscriber(tmp_path):
    p = Pipeline.create(tmp_path)
    seeded = Settings(data_dir=p.data_dir)
    warehouse = DuckDBWarehouse(seeded)
    warehouse.apply("scores", [Envelope("seed:scores:0", "scores", [Activity("insert", "scores", ["id", "score"], ["integer", "integer"], [1, 10])])])
    warehouse.close()
    store = DeadLetterStore(seeded.dead_letter_file)
    _dead(store, 1, _activity("scores", ["id", "score"], ["integer", "string"], [2, "high"]))
    _dead(store, 2, _activity("scores", ["id", "score"], ["integer", "integer"], [3, 30]))
    _dead(store, 3, _activity("scores", ["id"], ["integer"], [1], operation="delete"))  # row 1 is there now
    store.close()
    p.start("subscriber")  # holds the DuckDB file: the schema can only come from its admin port
    try:
        import httpx

        assert httpx.get(p.admin_url + "/tables/scores", timeout=5).json() == {"table": "scores", "columns": {"id": "integer", "score": "integer"}}
        assert httpx.get(p.admin_url + "/tables/missing", timeout=5).json() == {"table": "missing", "columns": None}
        assert httpx.get(p.admin_url + "/tables/bad%20name", timeout=5).status_code == 400
        out = p.cli("dead-letters", "replay", "--all")
        assert out.returncode == 1, out.stderr
        assert "#1 not replayed: would be rejected again" in out.stdout and "#2 replayed as " in out.stdout
        # Compared with the rows through the subscriber's admin port too.
        assert "#3 not replayed: would delete 1 row(s) of scores" in out.stdout and "--force" in out.stdout
        wait_until(lambda: p.query("SELECT id, score FROM scores ORDER BY id") == [(1, 10), (3, 30)], what="replayed row")
    finally:
        p.stop()


def test_message_entries_replay_from_their_json_rendering_or_a_columnar_body(settings):
    from app.messages.codec import MAGIC, decode_message, encode_batch, readable_body

    store = DeadLetterStore(settings.dead_letter_file)
    row = [Activity("insert", "scores", ["id", "score"], ["integer", "integer"], [4, 40])]
    columnar = encode_batch(row, "dead1")[0].data
    _dead(store, 1, readable_body(columnar), kind="message")  # what the subscriber stores after max attempts
    _dead(store, 2, encode_batch([Activity("insert", "scores", ["id", "score"], ["integer", "integer"], [5, 50])], "dead2")[0].data,
          kind="message")  # a format 2 body as it was delivered
    store.close()
    outcomes = replay(settings, None)
    assert [o.problem for o in outcomes] == [None, None]
    broker = LocalBroker(settings)
    try:
        published = broker.pull(10, 0.2)
    finally:
        broker.close()
    assert len(published) == 2 and all(m.data.startswith(MAGIC) for m in published)  # republished as format 2
    assert sorted(a.col_values for m in published for a in decode_message(m).activities) == [[4, 40], [5, 50]]


def test_a_replay_that_would_change_what_the_table_got_since_needs_force(settings):
    store = DeadLetterStore(settings.dead_letter_file)
    _dead(store, 1, _activity("scores", ["id"], ["integer"], [1], operation="delete"))  # row 1 was written since
    _dead(store, 2, _activity("scores", ["id", "score"], ["integer", "integer"], [1, 10]))  # written again since
    _dead(store, 3, _activity("scores", ["id", "score"], ["integer", "integer"], [4, 40]))  # nothing to collide with
    _dead(store, 4, _activity("scores", ["id"], ["integer"], [9], operation="delete"))  # matches nothing now
    store.close()

    outcomes = {o.entry_id: o for o in replay(settings, None)}
    assert {i for i, o in outcomes.items() if o.problem is None} == {3, 4}
    assert outcomes[1].problem.startswith("would delete 1 row(s) of scores as it is now (id=1)")
    assert "already holds 1 row(s) with these values (id=1, score=10)" in outcomes[2].problem
    assert all(outcomes[i].problem.endswith("replay with --force to apply it anyway") for i in (1, 2))
    assert {i for i, e in _entries(settings).items() if e.replayed_at is None} == {1, 2}

    forced = {o.entry_id: o for o in replay(settings, [1, 2], force=True)}
    assert all(o.problem is None and o.batch_id for o in forced.values())
    assert forced[1].changes.startswith("would delete 1 row(s)") and "already holds" in forced[2].changes

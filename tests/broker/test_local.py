"""The local broker as a whole (`LocalBroker`): publish to pull, restart, readiness, two processes.

The writer's and the lease store's own behaviour is in test_local_writer.py and
test_local_leases.py. No timing assertions: the tests wait with generous pull timeouts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.local_broker import count_rows, datas, msg, publish

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- basics


def test_publish_then_pull_returns_data_attributes_and_key(broker):
    result = publish(broker, msg("a1", "alpha", table="alpha", count="3"), batch_id="batch-1")
    assert result.batch_id == "batch-1" and result.message_count == 1 and not result.duplicate

    [m] = broker.pull(10, timeout=5)
    assert m.data == b"a1"
    assert m.attributes == {"dedup_id": "a1", "table": "alpha", "count": "3"}
    assert m.ordering_key == "alpha"
    assert m.delivery_attempt == 1
    assert m.dedup_id == "a1"
    assert m.message_id.isdigit()


def test_empty_publish_without_key_is_a_no_op(broker):
    result = publish(broker)
    assert result.message_count == 0 and not result.duplicate
    assert broker.pull(10, timeout=0) == []


def test_messages_survive_a_restart(make_broker):
    first = make_broker()
    publish(first, msg("kept"))
    first.close()
    second = make_broker()
    assert datas(second.pull(10, timeout=5)) == ["kept"]


def test_ready(broker):
    assert broker.ready() == (True, "ok")


def test_pull_with_nothing_waits_and_returns_empty(broker):
    assert broker.pull(10, timeout=0.05) == []
    assert broker.pull(0, timeout=0) == []


# ---------------------------------------------------------------- multi-process


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, threading, time
    from pathlib import Path
    from app.broker.base import OutgoingMessage
    from app.broker.local import LocalBroker
    from app.settings import Settings

    data_dir, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    broker = LocalBroker(Settings(data_dir=data_dir, ack_deadline_seconds=60))
    received = []

    async def produce():
        for i in range(0, n, 10):
            await asyncio.gather(*[
                broker.publish([OutgoingMessage(f"{name}-{j}".encode(), f"k{j % 5}", {"dedup_id": f"{name}-{j}"})],
                               batch_id=f"{name}-{j}")
                for j in range(i, min(n, i + 10))
            ])
        (data_dir / f"{name}.done").touch()

    producer = threading.Thread(target=lambda: asyncio.run(produce()))
    producer.start()
    idle_since = None
    while True:
        got = broker.pull(7, timeout=0.05)
        received.extend((m.ordering_key, int(m.message_id), m.data.decode()) for m in got)
        broker.ack(got)
        if got:
            idle_since = None
            continue
        finished = len(list(data_dir.glob("*.done"))) == 2 and broker.backlog().messages == 0
        if finished:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.3:
                break
    producer.join()
    broker.close()
    (data_dir / f"{name}.json").write_text(json.dumps(received))
    """
)


def test_two_processes_publish_and_pull_lose_and_duplicate_nothing(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n = 400
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), name, str(n)],
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        for name in ("p1", "p2")
    ]
    try:
        for p in procs:
            assert p.wait(timeout=120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    received = [tuple(r) for name in ("p1", "p2") for r in json.loads((tmp_path / f"{name}.json").read_text())]
    payloads = [r[2] for r in received]
    assert len(payloads) == 2 * n
    assert set(payloads) == {f"{name}-{j}" for name in ("p1", "p2") for j in range(n)}
    # Each process sees every key's messages in publish order.
    for name in ("p1", "p2"):
        per_key: dict[str, list[int]] = {}
        for key, message_id, _ in json.loads((tmp_path / f"{name}.json").read_text()):
            per_key.setdefault(key, []).append(message_id)
        assert all(ids == sorted(ids) for ids in per_key.values())
    assert count_rows(tmp_path / "broker.sqlite") == 0

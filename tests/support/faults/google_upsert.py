"""Issue 17's kill -9 during an upsert storm on the Google path (pstest -> bqemulator
through the fault layer): the same storm as the local e2e (`harness.UpsertStorm`), over
several tables, the subscriber killed -9 at random moments while it applies."""

from __future__ import annotations

import random
import threading
from pathlib import Path

from tests.support.faults.google import google_stack
from tests.support.faults.harness import UpsertStorm, kill_subscriber_while
from tests.support.faults.outcome import Outcome, timed
from tests.support.processes import wait_until


@timed
def scenario_upsert_storm_kill9(tmp: Path, tables: int = 3, keys: int = 100, per_request: int = 50,
                                requests: int = 60, kills: int = 4, pull_max: int = 4) -> Outcome:
    """`requests` requests of `per_request` upserts / inserts / deletes over `keys` keys in
    each of `tables` tables; the subscriber killed -9 at least `kills` times meanwhile.
    `data["rows"][table]` is [(key, version, note)] as BigQuery holds it at the end, to
    compare with `data["wanted"][table]`, [(key, version)] as the accepted requests left it."""
    out = Outcome("kill -9 during an upsert storm",
                  f"{requests * per_request} upserts (some inserts, 5% deletes) over {tables} x {keys} keys; "
                  f"the subscriber killed -9 at least {kills} times")
    names = [f"current{n}" for n in range(tables)]
    storm = UpsertStorm(names, keys, per_request, seed=23)
    # small pulls: many applies, so kills land between an apply's commit and its acks
    with google_stack(tmp, PULL_MAX_MESSAGES=str(pull_max)) as g:
        g.p.start("subscriber")
        g.p.start("api")
        producer = threading.Thread(target=storm.produce, args=(g.p.post, requests))
        producer.start()
        # pauses around the stack's 10 s ack deadline: a killed replica's leases come back to the
        # next one, which applies some before it is killed in turn
        out.data["kills"] = kill_subscriber_while(g.p, producer, random.Random(29), at_least=kills, pause=(8.0, 14.0))
        wanted = {t: storm.wanted(t) for t in names}

        def sums() -> dict[str, tuple[int, int]]:
            got = {}
            for t in names:
                rows = g.query(f"SELECT count(*), coalesce(sum(version), 0) FROM {g.table(t)}") or [(-1, -1)]
                got[t] = (int(rows[0][0]), int(rows[0][1]))
            return got

        target = {t: (len(w), sum(v for _, v in w)) for t, w in wanted.items()}
        try:
            wait_until(lambda: sums() == target or bool(g.gate.dead_lettered) or bool(g.dead_letter_store()),
                       timeout=300, interval=1.0, what="every key's last version")
        except AssertionError:
            pass  # the rows tell what is missing
        out.data.update(
            errors=storm.errors, wanted=wanted,
            rows={t: [(int(k), int(v), n) for k, v, n in g.query(f"SELECT k, version, note FROM {g.table(t)} ORDER BY k") or []]
                  for t in names},
            dead_letter_store=g.dead_letter_store(), dead_letter_topic=g.dead_letter_topic(),
            gate_dead_lettered=list(g.gate.dead_lettered), ordering_violations=list(g.gate.violations),
        )  # fmt: skip
        out.sent = out.accepted = sum(len(w) for w in wanted.values())
        out.landed = sum(len(r) for r in out.data["rows"].values())
        return out

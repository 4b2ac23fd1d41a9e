"""DuckDB specifics: file lock, read-only queries, injection, exact decimals, internals."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pytest

from app.messages.envelope import Envelope
from app.schema.columnar import runs_of, to_arrow
from app.schema.types import TYPES
from app.settings import Settings
from app.warehouse import open_read_only
from app.warehouse.base import TerminalWarehouseError, TransientWarehouseError, WarehouseQueryError
from app.warehouse.duckdb import (
    APPLIED_TABLE,
    COLUMNS_TABLE,
    COLUMN_TYPES,
    DuckDBFileLocked,
    DuckDBFileReader,
    DuckDBWarehouse,
    duck_types,
    query_file,
)
from tests.support.builders import dele, env, ins, ups
from tests.warehouse.test_contract import ROUND_TRIP


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "nested" / "data")


@pytest.fixture
def wh(settings: Settings) -> Iterator[DuckDBWarehouse]:
    w = DuckDBWarehouse(settings)
    yield w
    w.close()


HOLD_LOCK = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
con.close()
"""


def test_creates_parent_dir_and_declares_spatial(wh: DuckDBWarehouse, settings: Settings) -> None:
    assert settings.duckdb_file.exists()
    assert wh.capabilities.transactional
    assert wh.capabilities.supports_geometry  # the offline spatial wheel is a pinned dependency
    assert wh.ready() == (True, "ok")


def test_file_locked_by_other_process_is_transient_then_recovers(wh: DuckDBWarehouse, settings: Settings) -> None:
    wh.close()  # release our lock, another process takes it
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(settings.duckdb_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(TransientWarehouseError, match="lock"):
            wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
        assert wh.ready()[0] is False
        other = DuckDBWarehouse(settings)  # constructing while locked does not raise
        other.close()
        with pytest.raises(DuckDBFileLocked, match="admin port"):
            query_file(settings.duckdb_file, "SELECT 1")
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
    r = wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
    assert r.rows_inserted == 1
    assert wh.query('SELECT id FROM "t"') == (["id"], [(1,)])


def test_query_file_read_only(settings: Settings) -> None:
    w = DuckDBWarehouse(settings)
    w.apply("t", [env("t", ins("t", [("id", "integer"), ("g", "geography")], [1, "POINT(1 2)"]))])
    w.close()
    assert query_file(settings.duckdb_file, 'SELECT id, ST_AsText(g) FROM "t"') == (["id", "st_astext(g)"], [(1, "POINT (1 2)")])
    # activity types, for rendering; a computed column of no activity type is None
    assert query_file(settings.duckdb_file, 'SELECT id, g, sum(id)::HUGEINT FROM "t" GROUP BY ALL').types == [
        "integer", "geography", None]
    with pytest.raises(WarehouseQueryError):
        query_file(settings.duckdb_file, 'DELETE FROM "t"')
    with pytest.raises(WarehouseQueryError, match="no DuckDB warehouse"):
        query_file(settings.duckdb_file.parent / "missing.duckdb", "SELECT 1")


def test_query_cannot_change_data(wh: DuckDBWarehouse) -> None:
    wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
    for sql in [
        'DELETE FROM "t"',
        'DROP TABLE "t"',
        'CREATE TABLE "u" (a INT)',
        'SELECT 1; DROP TABLE "t"',
        'COMMIT; DELETE FROM "t"',
        "ATTACH 'x.duckdb' AS x",
        "COPY t TO 'out.csv'",
    ]:
        with pytest.raises(WarehouseQueryError):
            wh.query(sql)
    with pytest.raises(WarehouseQueryError, match="(?i)disabled|permission"):
        wh.query("SELECT * FROM read_text('/etc/hostname')")
    with pytest.raises(WarehouseQueryError):
        wh.query("SELECT * FROM no_such_table")
    assert wh.query('SELECT count(*) AS n FROM "t" WHERE id = ?', [1]) == (["n"], [(1,)])
    assert wh.table_schema("t") == {"id": "integer"}


def test_failure_mid_apply_rolls_back_everything(wh: DuckDBWarehouse) -> None:
    wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
    bad = env(
        "t",
        ins("t", [("id", "integer"), ("extra", "string")], [2, "x"]),
        dele("t", [("id", "integer")], [1]),
        ins("t", [("id", "integer"), ("ts", "timestamp")], [3, "not a timestamp"]),  # not canonical: cast fails
    )
    with pytest.raises(TerminalWarehouseError, match="rolled back"):
        wh.apply("t", [bad])
    assert wh.table_schema("t") == {"id": "integer"}  # DDL rolled back too
    assert wh.query('SELECT id FROM "t"')[1] == [(1,)]
    assert wh.query(f"SELECT count(*) FROM {APPLIED_TABLE} WHERE dedup_id = ?", [bad.dedup_id])[1] == [(0,)]
    # the connection is still usable
    assert wh.apply("t", [env("t", ins("t", [("id", "integer")], [4]))]).rows_inserted == 1


def test_injection_is_stored_literally(wh: DuckDBWarehouse) -> None:
    nasty = ["x'); DROP TABLE t; --", 'a"b', "/* c */ ; SELECT 1", "\\'", "$$", "\x00?"]
    cols = [("id", "integer"), ("s", "string"), ("r", "record")]
    acts = [ins("t", cols, [i, v, {v: v}]) for i, v in enumerate(nasty)]
    r = wh.apply("t", [env("t", *acts)])
    assert r.rows_inserted == len(nasty) and r.rejections == []
    _, rows = wh.query('SELECT id, s, CAST(r AS VARCHAR) FROM "t" ORDER BY id')
    assert [row[1] for row in rows] == nasty
    # deletes stage their keys in Arrow too, never as SQL text
    r = wh.apply("t", [env("t", dele("t", [("s", "string")], [nasty[0]]), dele("t", [("s", "string")], [nasty[1]]))])
    assert r.rows_deleted == 2
    r = wh.apply("t", [env("t", dele("t", [("r", "record")], [{nasty[2]: nasty[2]}]))])
    assert r.rows_deleted == 1
    assert [row[0] for row in wh.query('SELECT id FROM "t" ORDER BY id')[1]] == [3, 4, 5]
    # hostile identifiers never reach SQL: the activity / table is rejected
    r = wh.apply("t", [env("t", ins("t", [('a" INT); DROP TABLE t; --', "integer")], [1]))])
    assert len(r.rejections) == 1 and "invalid column name" in r.rejections[0].reason
    bad_table = 't"; DROP TABLE t; --'
    r = wh.apply(bad_table, [env(bad_table, ins(bad_table, [("id", "integer")], [1]))])
    assert len(r.rejections) == 1 and "not allowed" in r.rejections[0].reason
    r = wh.apply(APPLIED_TABLE, [env(APPLIED_TABLE, dele(APPLIED_TABLE, [("dedup_id", "string")], ["x"]))])
    assert len(r.rejections) == 1
    assert wh.table_schema("t") == {"id": "integer", "s": "string", "r": "record"}


def test_bignumeric_76_digits_lossless(wh: DuckDBWarehouse) -> None:
    values = ["9" * 38 + "." + "9" * 38, "-" + "1" * 38 + "." + "0" * 37 + "1", "0", "-0.5"]
    cols = [("id", "integer"), ("b", "bignumeric")]
    wh.apply("t", [env("t", *(ins("t", cols, [i, v]) for i, v in enumerate(values)))])
    assert wh.table_schema("t") == {"id": "integer", "b": "bignumeric"}  # VARCHAR, but typed via metadata
    _, rows = wh.query('SELECT b FROM "t" ORDER BY id')
    assert [r[0] for r in rows] == values  # the canonical text itself
    assert Decimal(rows[0][0]) == Decimal(values[0])
    r = wh.apply("t", [env("t", dele("t", [("b", "bignumeric")], [values[1]]))])
    assert r.rows_deleted == 1
    # bignumeric does not silently merge with string
    r = wh.apply("t", [env("t", ins("t", [("b", "string")], ["1"]))])
    assert r.rejections[0].reason == "column 'b' is bignumeric in table t, activity sends string"


def test_only_columns_whose_stored_type_is_ambiguous_are_recorded_and_a_recreated_table_forgets_old_ones(
    settings: Settings,
) -> None:
    wh = DuckDBWarehouse(settings)
    try:
        wh.apply("t", [env("t", ins("t", [("id", "integer"), ("b", "bignumeric"), ("s", "string")], [1, "1.5", "x"]))])
        recorded = wh.query(f"SELECT table_name, column_name, activity_type FROM {COLUMNS_TABLE} ORDER BY 2")[1]
        assert recorded == [("t", "b", "bignumeric")]  # integer and string read back from BIGINT and VARCHAR
    finally:
        wh.close()
    con = duckdb.connect(str(settings.duckdb_file))  # dropped outside the pipeline
    con.execute('DROP TABLE "t"')
    con.close()
    wh = DuckDBWarehouse(settings)
    try:
        wh.apply("t", [env("t", ins("t", [("id", "integer"), ("b", "string")], [2, "two"]))])
        assert wh.table_schema("t") == {"id": "integer", "b": "string"}  # not the old bignumeric row
        r = wh.apply("t", [env("t", ins("t", [("b", "string")], ["three"]))])
        assert r.rejections == [] and r.rows_inserted == 1
    finally:
        wh.close()


def test_numeric_is_exact_decimal_38_9(wh: DuckDBWarehouse) -> None:
    cols = [("n", "numeric")]
    wh.apply("t", [env("t", *(ins("t", cols, ["0.1"]) for _ in range(10)), ins("t", cols, ["99999999999999999999999999999.999999999"]))])
    _, rows = wh.query('SELECT sum(n) FILTER (WHERE n < 1), max(n), typeof(max(n)) FROM "t"')
    assert rows == [(Decimal("1.000000000"), Decimal("99999999999999999999999999999.999999999"), "DECIMAL(38,9)")]
    assert wh.apply("t", [env("t", dele("t", cols, ["0.100000000"]))]).rows_deleted == 10


def test_prune_applied(wh: DuckDBWarehouse) -> None:
    wh.apply("t", [env("t", ins("t", [("id", "integer")], [1]))])
    con = wh._connection()
    con.execute(f"INSERT INTO {APPLIED_TABLE} VALUES ('old', now() - INTERVAL 8 DAY)")
    assert wh.prune_applied() == 1
    assert wh.query(f"SELECT count(*) FROM {APPLIED_TABLE}")[1] == [(1,)]


def test_table_names_case_insensitive(wh: DuckDBWarehouse) -> None:
    wh.apply("Users", [env("Users", ins("Users", [("Id", "integer")], [1]))])
    r = wh.apply("users", [env("users", ins("users", [("ID", "integer"), ("x", "date")], [2, "2024-01-01"]))])
    assert r.rejections == [] and r.schema_changes == 1
    assert wh.table_schema("USERS") == {"Id": "integer", "x": "date"}
    assert wh.query('SELECT count(*) FROM "users"')[1] == [(2,)]


def test_bad_value_is_terminal_and_rolled_back(wh: DuckDBWarehouse) -> None:
    # values are supposed to be canonical; one that is not fails the whole apply, atomically
    good = env("t", ins("t", [("id", "integer")], [1]))
    bad = env("t", ins("t", [("id", "integer")], ["not an int"]))
    with pytest.raises(TerminalWarehouseError, match="rolled back"):
        wh.apply("t", [good, bad])
    assert wh.table_schema("t") is None
    assert wh.apply("t", [good]).rows_inserted == 1


def test_many_envelopes_dedup(wh: DuckDBWarehouse) -> None:
    envs = [env("t", ins("t", [("id", "integer")], [i])) for i in range(40)]
    assert wh.apply("t", envs).applied_envelopes == 40
    again = wh.apply("t", envs[::-1] + [env("t", ins("t", [("id", "integer")], [40]))] + envs[:3])
    assert (again.applied_envelopes, again.skipped_duplicates, again.rows_inserted) == (1, 43, 1)
    assert wh.query('SELECT count(*), count(DISTINCT id) FROM "t"')[1] == [(41, 41)]


def test_query_from_another_thread_while_applying(wh: DuckDBWarehouse) -> None:
    import threading

    wh.apply("t", [env("t", ins("t", [("id", "integer")], [0]))])
    errors: list[BaseException] = []
    counts: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                counts.append(wh.query('SELECT count(*) FROM "t"')[1][0][0])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 30):
            wh.apply("t", [env("t", *(ins("t", [("id", "integer")], [i * 100 + j]) for j in range(100)))])
    finally:
        stop.set()
        thread.join(timeout=30)
    assert errors == []
    assert counts == sorted(counts)  # committed snapshots only, never going back
    assert all((c - 1) % 100 == 0 for c in counts)  # never a half-applied batch


def test_delete_run_one_semi_join_per_column_set(wh: DuckDBWarehouse) -> None:
    cols = [("id", "integer"), ("k", "string"), ("f", "float"), ("g", "geography"), ("r", "record")]
    rows = [
        [0, "a", 1.5, "POINT(1 2)", {"x": 1, "y": [2]}],
        [1, "a", None, "POINT(3 4)", None],
        [2, None, "NaN", None, {"y": [2], "x": 1}],
        [3, "b", "NaN", "POINT(5 6)", {"z": None}],
        [4, None, None, "LINESTRING(0 0, 1 1)", None],
        [5, "c", 2.5, None, {"x": 2}],
    ]
    wh.apply("t", [env("t", *(ins("t", cols, row) for row in rows))])
    deletes = [
        dele("t", [("k", "string"), ("f", "float")], ["a", None]),  # row 1 (NULL matches NULL)
        dele("t", [("f", "float"), ("k", "string")], [None, "a"]),  # same key, other column order: counted once
        dele("t", [("k", "string"), ("f", "float")], [None, "NaN"]),  # row 2 (NaN equals NaN, as before)
        dele("t", [("g", "geography")], ["POINT (5 6)"]),  # row 3: geometry equality, not text
        dele("t", [("r", "record")], [{"x": 1, "y": [2]}]),  # row 0 (row 2 is gone already)
        dele("t", [("id", "integer")], [0]),  # already deleted by the record key in the same run
        dele("t", [("id", "integer")], [99]),  # no match
    ]
    r = wh.apply("t", [env("t", *deletes)])
    assert (r.rows_deleted, r.rejections) == (4, [])
    assert [row[0] for row in wh.query('SELECT id FROM "t" ORDER BY id')[1]] == [4, 5]


def test_delete_is_a_barrier_within_one_apply(wh: DuckDBWarehouse) -> None:
    cols = [("id", "integer"), ("k", "string")]
    acts = [ins("t", cols, [i, f"k{i % 3}"]) for i in range(300)]
    acts.append(dele("t", [("k", "string")], ["k0"]))
    acts.append(dele("t", [("k", "string"), ("id", "integer")], ["k1", 1]))
    acts += [ins("t", cols, [i, f"k{i % 3}"]) for i in range(300, 330)]  # not deleted: after the barrier
    acts.append(dele("t", [("id", "integer")], [2]))
    r = wh.apply("t", [env("t", *acts[:150]), env("t", *acts[150:])])
    assert (r.rows_inserted, r.rows_deleted) == (330, 100 + 1 + 1)
    ids = [row[0] for row in wh.query('SELECT id FROM "t" ORDER BY id')[1]]
    assert ids == [i for i in range(300) if i % 3 and i not in (1, 2)] + list(range(300, 330))


def test_many_deletes_with_nulls_in_one_apply(wh: DuckDBWarehouse) -> None:
    cols = [("id", "integer"), ("ts", "timestamp"), ("n", "numeric"), ("b", "bignumeric")]
    big = "1" * 38 + "." + "2" * 38
    rows = [[i, f"2024-01-01T00:00:{i % 60:02d}.000000Z" if i % 5 else None, f"{i}.5", big if i % 2 else None]
            for i in range(2000)]
    wh.apply("t", [env("t", *(ins("t", cols, row) for row in rows))])
    keys = [row[1:] for row in rows[::2]]  # even ids: every key names ts (maybe NULL), n, b (NULL)
    r = wh.apply("t", [env("t", *(dele("t", cols[1:], key) for key in keys))])
    assert r.rows_deleted == 1000
    assert wh.query('SELECT count(*), min(id % 2) FROM "t"')[1] == [(1000, 1)]
    r = wh.apply("t", [env("t", dele("t", [("b", "bignumeric")], [big]))])  # canonical text
    assert r.rows_deleted == 1000


@pytest.mark.parametrize("typ", sorted(ROUND_TRIP))
def test_lone_delete_binds_each_type(wh: DuckDBWarehouse, typ: str) -> None:
    # A run of one delete binds its key as parameters instead of staging it (see test_contract
    # for runs of several keys); both must match the same rows.
    cols = [("id", "integer"), ("v", typ)]
    cases = ROUND_TRIP[typ] + [(None, None)]
    wh.apply("t", [env("t", *(ins("t", cols, [i, sent]) for i, (sent, _) in enumerate(cases)))])
    assert wh.apply("t", [env("t", dele("t", [("v", typ)], [cases[0][0]]))]).rows_deleted == 1
    assert wh.apply("t", [env("t", dele("t", [("v", typ)], [None]))]).rows_deleted == 1
    assert [row[0] for row in wh.query('SELECT id FROM "t" ORDER BY id')[1]] == list(range(1, len(cases) - 1))


# DuckDB's own parse of each type's canonical text (geography and record go through SQL anyway)
_TEXT_SQL = {typ: f"CAST({{}} AS {COLUMN_TYPES[typ]})" for typ in TYPES if typ not in ("geography", "record")}
_TEXT_SQL["bytes"] = "from_base64({})"


@pytest.mark.parametrize("typ", sorted(_TEXT_SQL))
def test_arrow_column_equals_duckdb_parse_of_canonical_text(typ: str) -> None:
    # Inserts hand DuckDB each column in its Arrow type (no SQL cast); the stored values
    # must be exactly what DuckDB's own conversion of the canonical text gives.
    spec = duck_types(spatial=True)[typ]
    sent = [value for value, _ in ROUND_TRIP[typ]] + [None]
    texts = [None if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in sent]
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE TABLE t (c {spec.sql_type})")
        con.register("staged", pa.table({"c": to_arrow(typ, sent), "text": pa.array(texts, pa.string())}))
        con.execute(f"INSERT INTO t SELECT {spec.value_sql.format('c')} FROM staged")
        differ, values = con.execute(
            f"SELECT count(*) FILTER (t.c IS DISTINCT FROM {_TEXT_SQL[typ].format('s.text')}), count(t.c)"
            " FROM t POSITIONAL JOIN staged s"
        ).fetchone()
    finally:
        con.close()
    assert (differ, values) == (0, len(sent) - 1)


SPATIAL_LOADED = "SELECT count(*) > 0 FROM duckdb_functions() WHERE lower(function_name) = 'st_geomfromtext'"


def test_spatial_loads_only_with_the_first_geography_column(wh: DuckDBWarehouse, settings: Settings) -> None:
    first = env("t", ins("t", [("id", "integer")], [1]))
    wh.apply("t", [first])
    assert wh.query(SPATIAL_LOADED)[1] == [(False,)]  # tables without geography never pay for it
    assert query_file_after_close(wh, settings, SPATIAL_LOADED) == [(False,)]
    # the apply that brings geography reconnects with spatial, once, and plans again
    geo = env("t", ins("t", [("id", "integer"), ("g", "geography")], [2, "POINT(1 2)"]))
    r = wh.apply("t", [first, geo])
    assert (r.skipped_duplicates, r.applied_envelopes, r.rows_inserted, r.schema_changes) == (1, 1, 1, 1)
    assert wh.query(SPATIAL_LOADED)[1] == [(True,)]
    assert wh.query('SELECT id, ST_X(g), typeof(g) FROM "t" WHERE g IS NOT NULL')[1] == [(2, 1.0, "GEOMETRY")]
    assert wh.table_schema("t") == {"id": "integer", "g": "geography"}
    assert wh.apply("t", [env("t", dele("t", [("g", "geography")], ["POINT (1 2)"]))]).rows_deleted == 1


def test_spatial_loads_at_connect_when_a_table_has_geometry(settings: Settings) -> None:
    w = DuckDBWarehouse(settings)
    w.apply("t", [env("t", ins("t", [("id", "integer"), ("g", "geography")], [1, "POINT(3 4)"]))])
    w.apply("plain", [env("plain", ins("plain", [("id", "integer")], [1]))])
    w.close()
    assert query_file(settings.duckdb_file, 'SELECT ST_Y(g) FROM "t"')[1] == [(4.0,)]
    w = DuckDBWarehouse(settings)
    try:
        assert w.query(SPATIAL_LOADED)[1] == [(True,)]
        assert w.query('SELECT ST_Y(g) FROM "t"')[1] == [(4.0,)]
        assert w.apply("plain", [env("plain", ins("plain", [("id", "integer")], [2]))]).rows_inserted == 1
    finally:
        w.close()


def query_file_after_close(wh: DuckDBWarehouse, settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    wh.close()  # the next apply reconnects
    return query_file(settings.duckdb_file, sql)[1]


def test_geography_falls_back_to_wkt_text_when_spatial_cannot_load(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.warehouse.duckdb.connection as connection

    monkeypatch.setattr(connection, "load_spatial", lambda con: (False, "simulated: no extension"))
    w = DuckDBWarehouse(settings)
    try:
        assert w.capabilities.supports_geometry  # not known until geography arrives
        r = w.apply("t", [env("t", ins("t", [("id", "integer"), ("g", "geography")], [1, "POINT(1 2)"]))])
        assert (r.rows_inserted, r.rejections) == (1, [])
        assert not w.capabilities.supports_geometry
        assert w.ready() == (True, "ok (no spatial extension: geography stored as WKT)")
        assert w.query('SELECT g, typeof(g) FROM "t"')[1] == [("POINT(1 2)", "VARCHAR")]
        assert w.apply("t", [env("t", dele("t", [("g", "geography")], ["POINT(1 2)"]))]).rows_deleted == 1
    finally:
        w.close()


def test_redelivered_ids_among_many_new_are_skipped_after_the_retry(wh: DuckDBWarehouse) -> None:
    # The claim first tries a plain INSERT (all ids new); one id seen before makes it
    # roll back and claim again with INSERT OR IGNORE, so nothing applies twice.
    envs = [env("t", ins("t", [("id", "integer")], [i])) for i in range(40)]
    assert wh.apply("t", envs[:20]).applied_envelopes == 20
    r = wh.apply("t", envs[10:40])
    assert (r.applied_envelopes, r.skipped_duplicates, r.rows_inserted) == (20, 10, 20)
    assert wh.query('SELECT count(*), count(DISTINCT id) FROM "t"')[1] == [(40, 40)]
    assert wh.query(f"SELECT count(*) FROM {APPLIED_TABLE}")[1] == [(40,)]


def test_threads_and_memory_limit_come_from_settings(tmp_path: Path) -> None:
    wh = DuckDBWarehouse(Settings(duckdb_path=tmp_path / "w.duckdb", duckdb_threads=2, duckdb_memory_limit="256MB"))
    try:
        assert wh.query("SELECT current_setting('threads'), current_setting('memory_limit')")[1] == [(2, "244.1 MiB")]
    finally:
        wh.close()


def test_one_duckdb_thread_by_default(wh: DuckDBWarehouse) -> None:
    assert wh.query("SELECT current_setting('threads')")[1] == [(1,)]


def test_a_file_that_fails_to_open_unlocked_is_not_reported_locked(tmp_path: Path) -> None:
    # DuckDB says "locked" and "not a database" with the same exception class; the OS
    # lock decides which, so a broken file fails at once instead of waiting for a subscriber.
    broken = tmp_path / "broken.duckdb"
    broken.write_bytes(b"not a duckdb file" * 512)
    with pytest.raises(WarehouseQueryError) as caught:
        query_file(broken, "SELECT 1")
    assert not isinstance(caught.value, DuckDBFileLocked)


def _three_tables(wh: DuckDBWarehouse) -> None:
    for table, n in (("b_t", 2), ("A_t", 1), ("c_t", 0)):
        acts = [ins(table, [("id", "integer")], [i]) for i in range(n)] or [dele(table, [("id", "integer")], [0])]
        if n == 0:  # an empty table: create it, then delete its one row
            acts = [ins(table, [("id", "integer")], [0]), dele(table, [("id", "integer")], [0])]
        wh.apply(table, [env(table, *acts)])


def test_list_tables_and_count_rows_leave_out_internal_missing_and_invalid(wh: DuckDBWarehouse, settings: Settings) -> None:
    _three_tables(wh)
    wh._connection().execute('CREATE TABLE "odd name" (x INT)')  # not made by the pipeline
    assert wh.list_tables() == ["A_t", "b_t", "c_t"]  # no _ingest_* tables, sorted
    asked = ["b_t", "a_t", "c_t", "missing", "_ingest_applied", 'b_t" UNION SELECT 1 --', "odd name"]
    assert wh.count_rows(asked) == {"b_t": 2, "a_t": 1, "c_t": 0}  # DuckDB names ignore case
    assert wh.count_rows([]) == {}
    wh.close()
    reader = open_read_only(settings)  # the file read-only, as `python -m app query` does
    assert isinstance(reader, DuckDBFileReader)
    assert reader.list_tables() == ["A_t", "b_t", "c_t"]
    assert reader.count_rows(["c_t", "b_t", "nope"]) == {"c_t": 0, "b_t": 2}
    assert reader.table_schema("b_t") == {"id": "integer"}


def test_count_rows_past_one_query(wh: DuckDBWarehouse) -> None:
    names = [f"t{i:02d}" for i in range(60)]  # more than one UNION ALL statement
    for i, name in enumerate(names):
        wh.apply(name, [env(name, *[ins(name, [("id", "integer")], [k]) for k in range(i % 3)] or [ins(name, [("id", "integer")], [9])])])
    assert wh.count_rows(names) == {name: (i % 3) or 1 for i, name in enumerate(names)}


def test_file_reader_holds_no_lock_and_reports_a_missing_file(settings: Settings) -> None:
    reader = DuckDBFileReader(settings)
    assert (reader.list_tables(), reader.count_rows(["t"]), reader.table_schema("t")) == ([], {}, None)
    with pytest.raises(WarehouseQueryError, match="no DuckDB warehouse"):
        reader.query("SELECT 1")
    writer = DuckDBWarehouse(settings)  # the reader took no lock
    try:
        assert writer.apply("t", [env("t", ins("t", [("id", "integer")], [1]))]).rows_inserted == 1
        with pytest.raises(TerminalWarehouseError, match="read-only"):
            reader.apply("t", [env("t", ins("t", [("id", "integer")], [2]))])
    finally:
        writer.close()
    assert reader.query('SELECT id FROM "t"') == (["id"], [(1,)])


# --------------------------------------------------------------------------- many tables at once


def test_apply_many_commits_the_tables_that_apply_and_isolates_the_one_that_fails(wh):
    cols = [("v", "integer")]
    # A table changed by hand so that an apply to it fails inside the shared transaction.
    wh._connection().execute('CREATE TABLE picky (v BIGINT CHECK (v > 0))')
    batches = [
        ("first", [env("first", ins("first", cols, [1]), dedup_id="b1:first:0")]),
        ("picky", [env("picky", ins("picky", cols, [-1]), dedup_id="b1:picky:0")]),
        ("last", [env("last", ins("last", cols, [3]), dedup_id="b1:last:0")]),
    ]
    outcomes = wh.apply_many(batches)
    assert isinstance(outcomes[1], TerminalWarehouseError)
    assert [o.rows_inserted for o in (outcomes[0], outcomes[2])] == [1, 1]
    assert wh.query("SELECT v FROM first")[1] == [(1,)] and wh.query("SELECT v FROM last")[1] == [(3,)]
    assert wh.query("SELECT count(*) FROM picky")[1] == [(0,)]
    # the failed table's id was not recorded: a redelivery applies it (here: fails again), the others skip
    again = wh.apply_many(batches)
    assert isinstance(again[1], TerminalWarehouseError)
    assert [o.skipped_duplicates for o in (again[0], again[2])] == [1, 1]


def test_apply_many_keeps_each_tables_order_and_applies_a_redelivered_table_once(wh):
    cols = [("v", "integer")]
    first = wh.apply_many([
        ("a", [env("a", ins("a", cols, [1]), dedup_id="m1"), env("a", dele("a", cols, [1]), dedup_id="m2")]),
        ("b", [env("b", ins("b", cols, [1]), dedup_id="m3")]),
    ])
    second = wh.apply_many([
        ("b", [env("b", dele("b", cols, [1]), dedup_id="m4"), env("b", ins("b", cols, [2]), dedup_id="m5")]),
        ("a", [env("a", ins("a", cols, [1]), dedup_id="m1"), env("a", ins("a", cols, [7]), dedup_id="m6")]),
    ])
    assert all(not isinstance(o, Exception) for o in first + second)
    assert wh.query("SELECT v FROM a ORDER BY v")[1] == [(7,)]  # m1 seen before: the deleted row stays deleted
    assert wh.query("SELECT v FROM b ORDER BY v")[1] == [(2,)]
    assert second[1].skipped_duplicates == 1


def test_the_schema_cache_is_bounded_and_a_dropped_schema_is_read_again(tmp_path):
    wh = DuckDBWarehouse(Settings(data_dir=tmp_path, table_cache_size=2))
    try:
        cols = [("v", "integer")]
        outcomes = wh.apply_many([(t, [env(t, ins(t, cols, [1]))]) for t in ("t1", "t2", "t3")])
        assert all(not isinstance(o, Exception) for o in outcomes)
        assert len(wh._schemas) == 2
        more = [("v", "integer"), ("w", "string")]  # t1's schema was dropped: read again, then a column added
        wh.apply_many([(t, [env(t, ins(t, more, [2, "x"]))]) for t in ("t1", "t3")])
        assert wh.table_schema("t1") == {"v": "integer", "w": "string"}
        assert wh.query("SELECT v, w FROM t1 ORDER BY v")[1] == [(1, None), (2, "x")]
    finally:
        wh.close()


class _RecordingConnection:
    """The warehouse's connection, recording each statement it runs."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con, self.statements = con, []

    def execute(self, sql: str, *args: Any) -> Any:
        self.statements.append(sql)
        return self._con.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def test_tables_new_to_the_file_cost_no_catalog_query_and_known_ones_are_read_once(tmp_path):
    wh = DuckDBWarehouse(Settings(data_dir=tmp_path, table_cache_size=10))
    try:
        wh._connection()
        wh._con = recording = _RecordingConnection(wh._con)
        cols = [("v", "integer")]
        assert all(not isinstance(o, Exception) for o in wh.apply_many([(t, [env(t, ins(t, cols, [1]))]) for t in ("a", "b", "c")]))
        assert not [sql for sql in recording.statements if "information_schema" in sql]
        wh._schemas.clear()  # as if evicted: the existing tables' schemas are read, in one query
        recording.statements.clear()
        assert all(not isinstance(o, Exception) for o in wh.apply_many([(t, [env(t, ins(t, cols, [2]))]) for t in ("a", "b", "c")]))
        assert len([sql for sql in recording.statements if "information_schema" in sql]) == 1
        assert wh.query("SELECT count(*) FROM a")[1] == [(2,)]
    finally:
        wh.close()


def test_a_stream_over_many_small_tables_does_not_fill_the_memory_limit(tmp_path):
    # DuckDB keeps each table's rows written since the last checkpoint in memory it cannot
    # evict (~90 KB a table at its own block size): 400 tables overflow 16 MB unless the file
    # is reopened.
    settings = Settings(
        data_dir=tmp_path, duckdb_memory_limit="16MB", duckdb_reopen_after_tables=50, duckdb_block_size=262144
    )
    wh = DuckDBWarehouse(settings)
    try:
        cols = [("v", "integer"), ("s", "string")]
        tables = [f"t{i}" for i in range(400)]
        for start in range(0, len(tables), 10):
            outcomes = wh.apply_many([(t, [env(t, ins(t, cols, [1, "x"]))]) for t in tables[start : start + 10]])
            assert all(not isinstance(o, Exception) for o in outcomes), outcomes
        assert wh.count_rows(tables) == {t: 1 for t in tables}
        wh._con = recording = _RecordingConnection(wh._con)  # the caches outlive a reopen
        wh.apply_many([(t, [env(t, ins(t, cols, [2, "y"]))]) for t in tables[:3]])
        assert not [sql for sql in recording.statements if "information_schema" in sql]
    finally:
        wh.close()


def test_an_apply_that_ran_out_of_memory_reopens_the_file_and_the_stream_goes_on(tmp_path):
    # DuckDB's own block size keeps the most per table, so 600 tables reach the limit.
    settings = Settings(
        data_dir=tmp_path, duckdb_memory_limit="16MB", duckdb_reopen_after_tables=100_000, duckdb_block_size=262144
    )
    wh = DuckDBWarehouse(settings)
    try:
        cols = [("v", "integer"), ("s", "string")]
        tables = [f"t{i}" for i in range(600)]
        failures = 0
        for start in range(0, len(tables), 10):
            for _ in range(3):  # the subscriber retries a transient error
                outcomes = wh.apply_many([(t, [env(t, ins(t, cols, [1, "x"]))]) for t in tables[start : start + 10]])
                if not any(isinstance(o, Exception) for o in outcomes):
                    break
                assert all(isinstance(o, TransientWarehouseError) for o in outcomes)
                failures += 1
            else:
                pytest.fail(f"stuck at {tables[start]}: {outcomes[0]}")
        assert failures >= 1  # the limit was reached (else this test shows nothing)
        assert wh.count_rows(tables) == {t: 1 for t in tables}
    finally:
        wh.close()


def test_inserts_staged_together_land_in_their_own_tables_in_order(wh: DuckDBWarehouse) -> None:
    cols = [("id", "integer"), ("s", "string")]
    other = [("id", "integer"), ("ts", "timestamp")]
    wh._connection()
    wh._con = recording = _RecordingConnection(wh._con)
    outcomes = wh.apply_many([
        ("a", [env("a", ins("a", cols, [1, "a1"]), ins("a", cols, [2, "a2"]), dele("a", [("id", "integer")], [1]),
                   ins("a", cols, [1, "a3"]))]),  # two runs of inserts around a delete, both staged
        ("b", [env("b", ins("b", cols, [1, "b1"]))]),
        ("c", [env("c", ins("c", other, [1, "2024-01-01T00:00:00Z"]))]),  # columns of its own: inserted alone
    ])
    assert [o.rows_inserted for o in outcomes] == [3, 1, 1]
    assert len([sql for sql in recording.statements if sql.startswith("CREATE TEMP TABLE")]) == 1
    assert wh.query('SELECT id, s FROM "a" ORDER BY s')[1] == [(2, "a2"), (1, "a3")]
    assert wh.query('SELECT id, s FROM "b"')[1] == [(1, "b1")]
    assert wh.query('SELECT id FROM "c"')[1] == [(1,)]
    assert wh.query("SELECT count(*) FROM duckdb_tables() WHERE temporary")[1] == [(0,)]  # dropped before COMMIT


# --- keys (upserts) ---


def _constraints(wh: DuckDBWarehouse, table: str) -> list[tuple]:
    return wh.query(
        "SELECT constraint_type, constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
        [table],
    )[1]


def test_a_table_created_by_an_upsert_declares_its_key_as_primary_key(wh: DuckDBWarehouse) -> None:
    cols = [("a", "integer"), ("b", "string"), ("v", "integer")]
    wh.apply("k", [env("k", ups("k", cols, [1, "x", 1], ["a", "b"]))])
    assert _constraints(wh, "k") == [("PRIMARY KEY", ["a", "b"])]
    wh.apply("k", [env("k", ups("k", [*cols, ("w", "date")], [1, "x", 2, "2024-01-01"], ["a", "b"]))])  # ALTER with a key
    assert wh.query('SELECT a, b, v, CAST(w AS VARCHAR) FROM "k"')[1] == [(1, "x", 2, "2024-01-01")]


def test_a_table_that_existed_records_its_key_without_a_constraint_and_keeps_it_on_reopen(settings: Settings) -> None:
    cols = [("id", "integer"), ("v", "string")]
    first = DuckDBWarehouse(settings)
    try:
        first.apply("t", [env("t", ins("t", cols, [1, "a"]), ins("t", cols, [1, "b"]), ups("t", cols, [2, "c"], ["id"]))])
        assert _constraints(first, "t") == []  # rows of one key may have existed before the key
    finally:
        first.close()
    again = DuckDBWarehouse(settings)  # the key is read back from the file
    try:
        result = again.apply("t", [env("t", ins("t", cols, [1, "one"]), ups("t", cols, [2, "x"], ["v"]))])
        assert [r.reason for r in result.rejections] == ["table t has the key (id); an upsert naming another key (v) is refused"]
        assert sorted(again.query('SELECT id, v FROM "t"')[1]) == [(1, "one"), (2, "c")]
    finally:
        again.close()


def test_null_keys_in_a_run_reject_those_rows_only(wh: DuckDBWarehouse) -> None:
    cols = [("id", "integer"), ("v", "string")]
    wh.apply("n", [env("n", ups("n", cols, [0, "z"], ["id"]))])
    acts = [ins("n", cols, [i if i % 3 else None, str(i)]) for i in range(1, 8)]  # inserts on a keyed table
    result = wh.apply("n", [Envelope("d:n:0", "n", runs=runs_of(acts))])
    assert [r.index for r in result.rejections] == [2, 5]
    assert all(r.reason == "key column 'id' is null" and r.activity.col_values[1] == str(r.index + 1) for r in result.rejections)
    assert sorted(wh.query('SELECT id FROM "n"')[1]) == [(0,), (1,), (2,), (4,), (5,), (7,)]


def _block_size(path: Path) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]


def test_a_new_file_gets_the_configured_block_size(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, duckdb_block_size=32768)
    DuckDBWarehouse(settings).close()
    assert _block_size(settings.duckdb_file) == 32768


def test_a_file_in_duckdbs_default_format_stays_readable_and_writable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    duckdb.connect(str(settings.duckdb_file)).close()  # DuckDB's defaults: 256 KB blocks, old format
    default_size = _block_size(settings.duckdb_file)
    assert default_size != settings.duckdb_block_size  # else this test shows nothing
    for rows, value in ((1, [1, "x"]), (2, [2, "y"])):  # written, closed, then opened again
        wh = DuckDBWarehouse(settings)
        try:
            outcomes = wh.apply_many([("t", [env("t", ins("t", [("v", "integer"), ("s", "string")], value))])])
            assert not any(isinstance(o, Exception) for o in outcomes), outcomes
            assert wh.count_rows(["t"]) == {"t": rows}
        finally:
            wh.close()
        assert _block_size(settings.duckdb_file) == default_size


def test_settings_refuse_a_block_size_duckdb_cannot_use() -> None:
    with pytest.raises(ValueError):
        Settings(duckdb_block_size=20000)
    with pytest.raises(ValueError):
        Settings(duckdb_storage_version="1.2")


def test_a_stream_over_fewer_tables_than_the_reopen_bound_never_reopens(tmp_path):
    # the bound counts distinct tables written, not applies: three tables applied 40 times each
    wh = DuckDBWarehouse(Settings(data_dir=tmp_path, duckdb_reopen_after_tables=4))
    try:
        cols = [("v", "integer")]
        tables = ["a", "b", "c"]
        wh.apply_many([(t, [env(t, ins(t, cols, [0]))]) for t in tables])
        con = wh._con
        for i in range(1, 40):
            assert all(not isinstance(o, Exception) for o in wh.apply_many([(t, [env(t, ins(t, cols, [i]))]) for t in tables]))
        assert wh._con is con
        wh.apply_many([("d", [env("d", ins("d", cols, [1]))])])  # the fourth distinct table
        assert wh._con is not con and wh.count_rows(tables + ["d"]) == {"a": 40, "b": 40, "c": 40, "d": 1}
    finally:
        wh.close()

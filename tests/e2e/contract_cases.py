"""Tables under contract, end to end: one table of cases, run on any running pipeline.

Each case writes the tables file (the processes reload it on the next request), sends
its requests through the API, and checks what a data engineer sees: the API's answer,
the rows that landed in the warehouse (typed, trimmed, hashed), the columns that do not
exist, and the `_ingest_quarantine` rows (table, rule, column, batch id, key id, the
activity as JSON). Every case uses tables of its own, so one API + subscriber pair
serves them all (`ContractRunner`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from app.contracts.pii import REDACTED
from app.keys import write_keys_file
from app.keys.entries import new_key
from app.schema.identifiers import QUARANTINE_TABLE
from tests.support.processes import Pipeline, wait_until

HMAC_SECRET = "e2e-secret"
KEY_ID = "e2e-writer"
EMAIL, SSN, PHONE = "raw-mail@example.com", "raw-ssn-078-05-1120", "raw-phone-555-0100"

SECTIONS = """
[tables.cols_evolve]
columns = {id = "integer"}
contract = {columns = "evolve", types = "freeze"}

[tables.cols_freeze]
columns = {id = "integer"}
contract = {columns = "freeze", types = "freeze"}

[tables.cols_row]
columns = {id = "integer"}
contract = {columns = "discard_row", types = "freeze"}

[tables.cols_value]
columns = {id = "integer"}
contract = {columns = "discard_value", types = "freeze"}

[tables.types_evolve]
columns = {id = "integer", n = "integer"}
contract = {columns = "freeze", types = "evolve"}

[tables.types_freeze]
columns = {id = "integer", n = "integer"}
contract = {columns = "freeze", types = "freeze"}

[tables.types_row]
columns = {id = "integer", n = "integer"}
contract = {columns = "freeze", types = "discard_row"}

[tables.types_value]
columns = {id = "integer", n = "integer"}
contract = {columns = "freeze", types = "discard_value"}

[tables.types_warehouse_row]
columns = {id = "integer"}
contract = {columns = "evolve", types = "discard_row"}

[tables.prices]
columns = {id = "integer", amount = "numeric"}
contract = "freeze"

[tables.widen_evolve]
columns = {id = "integer"}
contract = "evolve"

[tables."known_*"]
columns = {id = "integer", mode = "string"}
contract = "freeze"

[tables.people]
columns = {id = "integer", email = "string", ssn = "string", phone = "string"}
pii = {email = "hmac", ssn = "drop", phone = "redact"}
contract = {columns = "freeze", types = "freeze"}

[tables.people_audit]
columns = {id = "integer", email = "string", ssn = "string", phone = "string"}
pii = {email = "hmac", ssn = "drop", phone = "redact"}
contract = "discard_row"
"""


def tables_file_text(tables_mode: str, new_tables: str) -> str:
    return f'[defaults]\ncontract = {{tables = "{tables_mode}"}}\nnew_tables = "{new_tables}"\n' + SECTIONS


def act(table: str, names: list[str], types: list[str], values: list[Any], op: str = "insert") -> dict:
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def digest(value: str) -> str:
    return "v2:" + hmac.new(HMAC_SECRET.encode(), value.encode(), hashlib.sha256).hexdigest()


def digest_or_none(value: str | None) -> str | None:
    return None if value is None else digest(value)


def redacted_or_none(value: str | None) -> str | None:
    return None if value is None else REDACTED


def after_pii(activity: dict) -> tuple[list[str], list[Any]]:
    """The column names and values an activity of a `people*` table is stored with."""
    if not activity["table"].startswith("people"):
        return activity["col_names"], activity["col_values"]
    kept = [(n, v) for n, v in zip(activity["col_names"], activity["col_values"]) if not (n in PII and PII[n] is None)]
    return [n for n, _ in kept], [PII[n](v) if n in PII else v for n, v in kept]


PII = {"email": digest_or_none, "phone": redacted_or_none, "ssn": None}  # None: dropped


@dataclass(frozen=True)
class Step:
    """One request and what its answer, and the quarantine, must say."""

    activities: list[dict]
    status: int = 200
    refused: tuple[str, str] | None = None  # (loc, text in the message) of the first detail of a 422
    quarantined: tuple[tuple[int, str, str | None], ...] = ()  # answer: (index, rule, column)
    dropped: tuple[tuple[str, str, int], ...] = ()  # answer: (table, column, activities)
    # quarantine rows the subscriber writes (the warehouse found the conflict): (index, rule, column)
    quarantined_later: tuple[tuple[int, str, str | None], ...] = ()
    settle: tuple[str, int] | None = None  # (table, rows) to wait for before the next step


@dataclass(frozen=True)
class Case:
    id: str
    steps: list[Step]
    table: str  # where rows land
    columns: tuple[str, ...] = ()
    rows: list[tuple] = field(default_factory=list)  # ordered by the first column
    absent_columns: tuple[str, ...] = ()
    absent_tables: tuple[str, ...] = ()
    types: dict[str, str] = field(default_factory=dict)  # column -> activity type the warehouse reports
    tables_mode: str = "discard_row"  # [defaults] contract.tables
    new_tables: str = "refuse"


ID = (["id"], ["integer"])
CASES: list[Case] = [
    # columns: an undeclared column
    Case("columns-evolve", [Step([act("cols_evolve", ["id", "extra"], ["integer", "string"], [1, "new"])])],
         "cols_evolve", ("id", "extra"), [(1, "new")], types={"id": "integer", "extra": "string"}),
    Case("columns-freeze", [
        Step([act("cols_freeze", *ID, [1]), act("cols_freeze", ["id", "extra"], ["integer", "string"], [2, "x"])],
             status=422, refused=("user_activities[1].col_names[1]", "contract columns = freeze")),
        Step([act("cols_freeze", *ID, [3])]),
    ], "cols_freeze", ("id",), [(3,)], absent_columns=("extra",)),
    Case("columns-discard_row", [
        Step([act("cols_row", ["id", "extra"], ["integer", "string"], [1, "x"]), act("cols_row", *ID, [2])],
             quarantined=((0, "columns", "extra"),)),
    ], "cols_row", ("id",), [(2,)], absent_columns=("extra",)),
    Case("columns-discard_value", [
        Step([act("cols_value", ["id", "extra"], ["integer", "string"], [1, "x"]), act("cols_value", *ID, [2])],
             dropped=(("cols_value", "extra", 1),), settle=("cols_value", 2)),
        # a delete is never trimmed (dropping a condition would delete more): quarantined
        Step([act("cols_value", ["id", "extra"], ["integer", "string"], [1, "x"], op="delete")],
             quarantined=((0, "columns", "extra"),)),
    ], "cols_value", ("id",), [(1,), (2,)], absent_columns=("extra",)),
    # types: a declared column sent with another type
    Case("types-evolve", [  # evolve keeps the declared type: refused as under freeze
        Step([act("types_evolve", ["id", "n"], ["integer", "string"], [1, "seven"])],
             status=422, refused=("user_activities[0].col_types[1]", "contract types = freeze")),
        Step([act("types_evolve", ["id", "n"], ["integer", "integer"], [2, 7])]),
    ], "types_evolve", ("id", "n"), [(2, 7)], types={"id": "integer", "n": "integer"}),
    Case("types-freeze", [
        Step([act("types_freeze", ["id", "n"], ["integer", "integer"], [1, 1]),
              act("types_freeze", ["id", "n"], ["integer", "string"], [2, "two"])],
             status=422, refused=("user_activities[1].col_types[1]", "contract types = freeze")),
        Step([act("types_freeze", ["id", "n"], ["integer", "integer"], [3, 3])]),
    ], "types_freeze", ("id", "n"), [(3, 3)]),
    Case("types-discard_row", [
        Step([act("types_row", ["id", "n"], ["integer", "integer"], [1, 1]),
              act("types_row", ["id", "n"], ["integer", "string"], [2, "two"])],
             quarantined=((1, "types", "n"),)),
    ], "types_row", ("id", "n"), [(1, 1)]),
    Case("types-discard_value", [  # the value is dropped: the row lands with the column NULL
        Step([act("types_value", ["id", "n"], ["integer", "integer"], [1, 1]),
              act("types_value", ["id", "n"], ["integer", "string"], [2, "two"])],
             dropped=(("types_value", "n", 1),)),
    ], "types_value", ("id", "n"), [(1, 1), (2, None)], types={"id": "integer", "n": "integer"}),
    # types the edge cannot see (an undeclared column) meet the warehouse's column type
    Case("types-discard_row-in-the-warehouse", [
        Step([act("types_warehouse_row", ["id", "extra"], ["integer", "integer"], [1, 5])], settle=("types_warehouse_row", 1)),
        Step([act("types_warehouse_row", ["id", "extra"], ["integer", "integer"], [3, 6]),
              act("types_warehouse_row", ["id", "extra"], ["integer", "string"], [2, "text"])],
             quarantined_later=((1, "types", "extra"),)),
    ], "types_warehouse_row", ("id", "extra"), [(1, 5), (3, 6)]),
    Case("types-evolve-widens", [  # a wider compatible type widens the column in place
        Step([act("widen_evolve", ["id", "score"], ["integer", "integer"], [1, 7])], settle=("widen_evolve", 1)),
        Step([act("widen_evolve", ["id", "score"], ["integer", "float"], [2, 2.5]),
              act("widen_evolve", ["id", "score"], ["integer", "integer"], [3, 4])]),
    ], "widen_evolve", ("id", "score"), [(1, 7.0), (2, 2.5), (3, 4.0)], types={"id": "integer", "score": "float"}),
    Case("types-narrower-than-declared", [  # an integer for a numeric column is taken as numeric
        Step([act("prices", ["id", "amount"], ["integer", "integer"], [1, 12])], settle=("prices", 1)),
        Step([act("prices", ["id", "amount"], ["integer", "numeric"], [2, "0.1"]),
              act("prices", ["id", "amount"], ["integer", "integer"], [3, 7])]),
    ], "prices", ("id", "amount"), [(1, "12"), (2, "0.1"), (3, "7")], types={"id": "integer", "amount": "numeric"}),
    # tables: an undeclared table under new_tables = "refuse", by the defaults' tables mode
    *[Case(f"tables-{mode}", [
        Step([act(f"stranger_{mode}", *ID, [1]), act(f"known_{mode}", ["id", "mode"], ["integer", "string"], [1, mode])],
             status=422, refused=("user_activities[0].table", "new_tables = refuse")),
        Step([act(f"known_{mode}", ["id", "mode"], ["integer", "string"], [2, mode])]),
    ], f"known_{mode}", ("id", "mode"), [(2, mode)], absent_tables=(f"stranger_{mode}",), tables_mode=mode)
      for mode in ("freeze", "evolve")],  # evolve reads as freeze: the file is the contract
    *[Case(f"tables-{mode}", [
        Step([act(f"stranger_{mode}", *ID, [1]), act(f"known_{mode}", ["id", "mode"], ["integer", "string"], [1, mode])],
             quarantined=((0, "tables", None),)),
    ], f"known_{mode}", ("id", "mode"), [(1, mode)], absent_tables=(f"stranger_{mode}",), tables_mode=mode)
      for mode in ("discard_row", "discard_value")],  # discard_value reads as discard_row
    Case("tables-allow", [Step([act("newcomer", *ID, [1])])], "newcomer", ("id",), [(1,)], new_tables="allow"),
    # PII policies, applied at the edge
    Case("pii-hmac-drop-redact", [
        Step([act("people", ["id", "email", "ssn", "phone"], ["integer", "string", "string", "string"], [1, EMAIL, SSN, PHONE]),
              act("people", ["id", "email", "phone"], ["integer", "string", "string"], [2, None, None])]),
    ], "people", ("id", "email", "phone"), [(1, digest(EMAIL), REDACTED), (2, None, None)], absent_columns=("ssn",)),
    Case("pii-in-quarantine", [  # the quarantine row holds the values as transformed at the edge
        Step([act("people_audit", ["id", "email", "ssn", "phone", "extra"], ["integer", "string", "string", "string", "string"],
                  [1, EMAIL, SSN, PHONE, "x"]),
              act("people_audit", ["id", "email"], ["integer", "string"], [2, EMAIL])],
             quarantined=((0, "columns", "extra"),)),
    ], "people_audit", ("id", "email"), [(2, digest(EMAIL))]),
]


class ContractRunner:
    """Runs `CASES` on one running pipeline; `qualify` turns a table name into the SQL name."""

    def __init__(self, pipeline: Pipeline, tables_file: Path, secret: str, qualify: Callable[[str], str],
                 timeout: float = 60.0) -> None:
        self.p, self.tables_file, self.secret, self.qualify, self.timeout = pipeline, tables_file, secret, qualify, timeout

    def run(self, case: Case) -> None:
        self.tables_file.write_text(tables_file_text(case.tables_mode, case.new_tables))
        quarantine: list[tuple[str, tuple[int, str, str | None], dict]] = []  # (batch id, expected, activity)
        for step in case.steps:
            answer = self.p.post({"user_activities": step.activities}, headers={"Authorization": f"Bearer {self.secret}"})
            assert answer.status_code == step.status, answer.text
            body = answer.json()
            if step.status == 422:
                detail = body["details"][0]
                assert detail["loc"] == step.refused[0] and step.refused[1] in detail["message"], detail
                continue
            self._check_answer(step, body)
            for index, rule, column in (*step.quarantined, *step.quarantined_later):
                quarantine.append((body["batch_id"], (index, rule, column), step.activities[index]))
            if step.settle is not None:
                table, n = step.settle
                wait_until(lambda: self._count(table) == n, timeout=self.timeout, interval=0.2, what=f"{n} rows in {table}")
        rows = wait_until(lambda: (got := self._rows(case)) == case.rows and got, timeout=self.timeout, interval=0.2,
                          what=f"{case.table} rows {case.rows} (have {self._safe_rows(case)})")
        assert rows == case.rows
        self._check_columns(case)
        self._check_quarantine(case, quarantine)

    def _check_answer(self, step: Step, body: dict) -> None:
        assert body["error"] is False and body["batch_id"]
        got = [(q["index"], q["rule"], q["column"]) for q in body.get("quarantine", [])]
        assert got == list(step.quarantined) and body.get("quarantined", 0) == len(step.quarantined), body
        dropped = [(d["table"], d["column"], d["activities"]) for d in body.get("dropped_columns", [])]
        assert dropped == list(step.dropped), body

    def _count(self, table: str) -> int:
        return self.p.query(f"SELECT count(*) FROM {self.qualify(table)}")[0][0]

    def _rows(self, case: Case) -> list[tuple]:
        cols = ", ".join(case.columns)
        return [tuple(r) for r in self.p.query(f"SELECT {cols} FROM {self.qualify(case.table)} ORDER BY {case.columns[0]}")]

    def _safe_rows(self, case: Case) -> Any:
        try:
            return self._rows(case)
        except Exception as exc:  # the table may not exist yet
            return repr(exc)

    def _schema(self, table: str) -> dict[str, str] | None:
        import httpx

        return httpx.get(f"{self.p.admin_url}/tables/{table}", timeout=30).json()["columns"]

    def _check_columns(self, case: Case) -> None:
        schema = self._schema(case.table)
        assert schema is not None
        assert not set(case.absent_columns) & set(schema), schema
        for column, typ in case.types.items():
            assert schema[column] == typ, schema
        for table in case.absent_tables:
            assert self._schema(table) is None, table

    def _check_quarantine(self, case: Case, expected: list[tuple[str, tuple[int, str, str | None], dict]]) -> None:
        tables = sorted({a["table"] for _, _, a in expected})
        if not expected:
            if self._schema(QUARANTINE_TABLE) is not None:
                assert self._quarantine_rows(case.table) == [], "nothing of this case is quarantined"
            return

        def landed() -> list[tuple] | None:
            rows = [r for t in tables for r in self._quarantine_rows(t)]
            return rows if len(rows) >= len(expected) else None

        rows = wait_until(landed, timeout=self.timeout, interval=0.2, what=f"{len(expected)} quarantine rows")
        got = sorted((r[4], (r[3], r[1], r[2]), r[0]) for r in rows)
        want = sorted((batch, exp, a["table"]) for batch, exp, a in expected)
        assert got == want, rows
        for row in rows:
            table_name, _, _, index, batch_id, key_id, activity, reason = row
            sent = next(a for b, (i, _, _), a in expected if b == batch_id and i == index)
            record = json.loads(activity) if isinstance(activity, (str, bytes)) else activity
            assert (record["col_names"], record["col_values"]) == after_pii(sent), record
            assert not {EMAIL, SSN, PHONE} & set(map(str, record["col_values"])), record
            assert key_id == KEY_ID, row
            assert reason, row

    def _quarantine_rows(self, table: str) -> list[tuple]:
        sql = (f"SELECT table_name, rule, column_name, activity_index, batch_id, key_id, activity, reason "
               f"FROM {self.qualify(QUARANTINE_TABLE)} WHERE table_name = ?")
        return self.p.query(sql, [table])


def keys_file(directory: Path) -> tuple[Path, str]:
    key, secret = new_key(KEY_ID, ["*"], ["insert", "delete"])
    path = directory / "keys.toml"
    write_keys_file(path, [key])
    return path, secret


def contract_env(directory: Path) -> tuple[dict[str, str], str]:
    """The environment both processes need for the cases, and the API key's secret."""
    keys, secret = keys_file(directory)
    tables = directory / "tables.toml"
    tables.write_text(tables_file_text("discard_row", "refuse"))
    env = {"TABLES_FILE": str(tables), "TABLES_FILE_CHECK_SECONDS": "0", "PII_HMAC_KEYS": f"v2:{HMAC_SECRET}",
           "API_KEYS_FILE": str(keys)}
    return env, secret

"""Estimate of the bytes Google would bill on demand for the query jobs of a bench run.

bqemulator reports 0 bytes processed, so the bench estimates what BigQuery's on-demand
pricing would bill (https://cloud.google.com/bigquery/pricing#on_demand_pricing) from the
statements the jobs ran (jobs.list) and the tables as they are at the end of the run:

- DDL (CREATE, ALTER, DROP) is not billed by bytes.
- A query bills the bytes of the columns it references in the tables it reads, at least
  10 MB per table referenced.
- A DML statement bills q + t
  (https://cloud.google.com/bigquery/docs/reference/standard-sql/dml-syntax#on-demand_query_size_calculation):
  q the columns it references in the partitions it scans, t every column of each
  partition it modifies (a DELETE: the partitions it deletes from), at least 10 MB per
  table. The bench's rows are all ingested today, so today's partition is the table.
- Column sizes: Google's data size calculation
  (https://cloud.google.com/bigquery/pricing#data_type_sizes): INT64, FLOAT64, DATE,
  DATETIME, TIME, TIMESTAMP 8 bytes; NUMERIC 16; BIGNUMERIC 32; BOOL 1; STRING and BYTES
  2 + their length; JSON its text; NULL 0.

An estimate: it uses each table's size at the end of the run (a DELETE earlier in the run
saw a smaller partition, so this errs high) and the column names a statement mentions.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MIN_BILLED_PER_TABLE = 10 * 1024 * 1024
DDL = ("CREATE", "ALTER", "DROP")
DML = ("DELETE", "UPDATE", "MERGE", "INSERT")
FIXED_SIZES = {
    "INTEGER": 8, "INT64": 8, "FLOAT": 8, "FLOAT64": 8, "DATE": 8, "DATETIME": 8, "TIME": 8, "TIMESTAMP": 8,
    "NUMERIC": 16, "BIGNUMERIC": 32, "BOOLEAN": 1, "BOOL": 1, "INTERVAL": 16,
}  # fmt: skip


def value_bytes(field_type: str, value: Any) -> int:
    """Logical bytes of one value, by Google's data size calculation."""
    if value is None:
        return 0
    if field_type in FIXED_SIZES:
        return FIXED_SIZES[field_type]
    if field_type == "BYTES":
        return 2 + len(value if isinstance(value, bytes) else base64.b64decode(value))
    if field_type == "JSON":
        return len((value if isinstance(value, str) else json.dumps(value)).encode())
    return 2 + len(str(value).encode())  # STRING, and GEOGRAPHY's text as an approximation


@dataclass
class TableSize:
    columns: dict[str, int] = field(default_factory=dict)  # column -> logical bytes

    @property
    def total(self) -> int:
        return sum(self.columns.values())

    def referenced(self, sql: str) -> int:
        return sum(n for c, n in self.columns.items() if re.search(rf"\b{re.escape(c)}\b", sql, re.IGNORECASE))


def table_sizes(client: Any, dataset: str) -> dict[str, TableSize]:
    """Logical bytes per column of every table of `dataset`, read through `client`."""
    sizes: dict[str, TableSize] = {}
    for item in client.list_tables(dataset):
        table = client.get_table(item.reference)
        types = {f.name: f.field_type for f in table.schema}
        size = TableSize({name: 0 for name in types})
        for row in client.list_rows(table):
            for name, value in row.items():
                size.columns[name] = size.columns.get(name, 0) + value_bytes(types.get(name, "STRING"), value)
        sizes[table.table_id.lower()] = size
    return sizes


def job_estimate(sql: str, statement: str, dataset: str, sizes: dict[str, TableSize]) -> int:
    """Bytes one query job would bill (see the module's rules)."""
    word = (sql.split(None, 1) or ["?"])[0].upper()
    if word in DDL or statement.startswith(DDL):
        return 0
    found = referenced_tables(sql, dataset)
    target = found[0] if word in DML and found else None  # DELETE FROM / UPDATE / MERGE INTO / INSERT INTO it
    referenced = set(found)
    billed = 0
    for name in referenced:
        size = sizes.get(name, TableSize())
        q = size.referenced(sql)
        t = size.total if name == target and word != "INSERT" else 0
        billed += max(MIN_BILLED_PER_TABLE, q + t)
    return billed


def referenced_tables(sql: str, dataset: str) -> list[str]:
    """Tables of `dataset` the statement names, in order of first mention."""
    found = re.findall(rf"\b{re.escape(dataset)}`?\.`?(\w+)", sql, re.IGNORECASE)
    return list(dict.fromkeys(m.lower() for m in found))


def estimate(client: Any, dataset: str, since_ms: int = 0) -> dict[str, Any]:
    """Estimated bytes billed by the query jobs created since `since_ms` (epoch ms), by statement."""
    sizes = table_sizes(client, dataset)
    by_statement: Counter[str] = Counter()
    jobs: Counter[str] = Counter()
    for job in client.list_jobs(all_users=True):
        sql = getattr(job, "query", None)
        if not sql or not referenced_tables(sql, dataset) or (job.created and job.created.timestamp() * 1000 < since_ms):
            continue
        word = (sql.split(None, 1) or ["?"])[0].upper()
        by_statement[word] += job_estimate(sql, getattr(job, "statement_type", None) or "", dataset, sizes)
        jobs[word] += 1
    return {"bytes": sum(by_statement.values()), "bytes_by_statement": dict(by_statement), "jobs_by_statement": dict(jobs),
            "table_bytes": {name: s.total for name, s in sizes.items()}}

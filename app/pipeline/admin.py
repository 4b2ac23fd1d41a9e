"""The subscriber's small admin HTTP port: health, readiness, metrics, stats, tables, queries.

The DuckDB file admits one writing process, and the subscriber is that process; so
`python -m app query` and the API's status page read through here while it runs.
Bound to loopback by default: `/query` runs SQL (inside a transaction that is always
rolled back) and must not be exposed.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson

from app import metrics
from app.pipeline.render import render_rows
from app.schema.identifiers import IDENTIFIER
from app.warehouse.base import WarehouseQueryError

if TYPE_CHECKING:
    from app.pipeline.subscriber import Subscriber

log = logging.getLogger("app.subscriber.admin")
MAX_QUERY_BYTES = 64 * 1024
READY_LOCK_WAIT_SECONDS = 1.0


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME)


MAX_TABLES_LISTED = 500


def table_stats(sub: "Subscriber") -> list[dict[str, Any]]:
    """Per user table (the first `MAX_TABLES_LISTED` by name): exact row count and this
    process's last write (epoch s, None if it wrote none). Internal tables are left out."""
    warehouse = sub.warehouse
    last_write = dict(sub.totals.last_write_by_table)
    with sub.warehouse_lock:
        names = warehouse.list_tables()[:MAX_TABLES_LISTED]
    with sub.warehouse_lock:
        counts = warehouse.count_rows(names)
    return [{"table": name, "rows": counts.get(name), "last_write": last_write.get(name)} for name in names]


class AdminServer:
    def __init__(self, subscriber: "Subscriber", host: str, port: int) -> None:
        self.subscriber = subscriber
        handler = type("Handler", (_Handler,), {"subscriber": subscriber})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="admin-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    subscriber: "Subscriber"

    def log_message(self, format: str, *args: Any) -> None:  # keep stderr for JSON logs
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        sub = self.subscriber
        if self.path == "/healthz":
            self._send(200, _dumps({"status": "ok"}))
        elif self.path == "/readyz":
            broker_ok, broker_reason = sub.broker.ready()
            blocked = sub.blocked
            # An apply may hold the warehouse for a while (a slow or failing call): answer
            # from what the retry loop last saw instead of waiting behind it.
            if blocked is not None:  # the probe alone may be allowed: an apply was refused
                wh_ok, wh_reason = False, f"blocked: {blocked}"
            elif sub.warehouse_lock.acquire(timeout=READY_LOCK_WAIT_SECONDS):
                try:
                    wh_ok, wh_reason = sub.warehouse.ready()
                finally:
                    sub.warehouse_lock.release()
            elif sub.last_transient_error is not None:
                wh_ok, wh_reason = False, f"retrying: {sub.last_transient_error}"
            else:
                wh_ok, wh_reason = True, "ok (applying)"
            ok = broker_ok and wh_ok
            detail: dict[str, Any] = {"ready": ok, "broker": broker_reason, "warehouse": wh_reason}
            tables_file = sub.tables_file_status()
            if tables_file is not None:
                detail["tables_file"] = tables_file  # a refused change is shown, still ready
            # Behind is said, not failed: taking a lagging subscriber out of service makes it lag more.
            detail["tables_behind"] = sub.tables_behind()
            self._send(200 if ok else 503, _dumps(detail))
        elif self.path == "/metrics":
            body, content_type = metrics.render(metrics.SUBSCRIBER, sub.broker)
            self._send(200, body, content_type)
        elif self.path == "/tables":
            try:
                tables = table_stats(sub)
            except Exception as exc:
                self._send(503, _dumps({"error": True, "message": f"warehouse unavailable: {exc}", "details": []}))
                return
            self._send(200, _dumps({"warehouse": sub.warehouse.name, "tables": tables}))
        elif self.path.startswith("/tables/"):
            self._table_schema(self.path.removeprefix("/tables/"))
        elif self.path == "/stats":
            t = sub.totals
            self._send(
                200,
                _dumps(
                    {
                        "messages_acked": t.messages_acked,
                        "rows_inserted": t.rows_inserted,
                        "rows_upserted": t.rows_upserted,
                        "rows_deleted": t.rows_deleted,
                        "duplicates_skipped": t.duplicates_skipped,
                        "dead_lettered": t.dead_lettered,
                        "last_write_by_table": t.last_write_by_table,
                    }
                ),
            )
        else:
            self._send(404, _dumps({"error": True, "message": "not found", "details": []}))

    def _table_schema(self, table: str) -> None:
        """GET /tables/<name>: the table's columns and activity types (null if it does not exist)."""
        if not IDENTIFIER.match(table):
            self._send(400, _dumps({"error": True, "message": f"invalid table name {table!r}", "details": []}))
            return
        try:
            with self.subscriber.warehouse_lock:
                columns = self.subscriber.warehouse.table_schema(table)
        except Exception as exc:
            self._send(503, _dumps({"error": True, "message": f"warehouse unavailable: {exc}", "details": []}))
            return
        self._send(200, _dumps({"table": table, "columns": columns}))

    def _apply_table_options(self) -> None:
        """`tables apply` while this process holds the warehouse: the file in force here."""
        from app.pipeline.table_options import apply_all

        sub = self.subscriber
        config = sub.tables_file.current() if sub.tables_file.path is not None else None
        if config is None:
            self._send(400, _dumps({"error": True, "message": "the subscriber has no tables file (TABLES_FILE)", "details": []}))
            return
        try:
            with sub.warehouse_lock:
                lines = apply_all(sub.warehouse, config)
        except Exception as exc:
            self._send(503, _dumps({"error": True, "message": f"warehouse unavailable: {exc}", "details": []}))
            return
        self._send(200, _dumps({"lines": lines}))

    def do_POST(self) -> None:
        if self.path == "/table-options":
            self._apply_table_options()
            return
        if self.path != "/query":
            self._send(404, _dumps({"error": True, "message": "not found", "details": []}))
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_QUERY_BYTES:
            self._send(413, _dumps({"error": True, "message": "query too large", "details": []}))
            return
        try:
            request = orjson.loads(self.rfile.read(length))
            sql, params = request["sql"], request.get("params") or []
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._send(400, _dumps({"error": True, "message": 'body must be {"sql": ..., "params": [...]}', "details": []}))
            return
        try:
            with self.subscriber.warehouse_lock:
                result = self.subscriber.warehouse.query(sql, params)
        except WarehouseQueryError as exc:
            self._send(400, _dumps({"error": True, "message": str(exc), "details": []}))
            return
        except Exception as exc:  # the warehouse may be down; say so instead of dropping the connection
            self._send(503, _dumps({"error": True, "message": f"warehouse unavailable: {exc}", "details": []}))
            return
        columns, rows = result
        # Rendered here (WKT, base64, "NaN", plain decimals, record text) so nothing is
        # lost in JSON; `types` are the columns' activity types (null: none).
        self._send(200, _dumps({"columns": columns, "types": result.types, "rows": render_rows(rows, result.types)}))

"""`GET /status`: a small server-rendered status page for whoever runs the pipeline.

Plain HTML with an inline SVG chart, no JavaScript, no build step; it reloads itself
every few seconds. It shows:

- activities accepted per second over the last minutes (an in-process ring buffer the
  ingest route feeds, so it covers this API process only),
- the broker backlog and the age of its oldest message,
- per table: row count and last write, asked from the subscriber's admin port
  (`/tables`, `/stats`); "subscriber unreachable" if it does not answer,
- the latest dead letters with their reasons (read from the dead-letter store file),
- version and build commit.

Everything user-derived (table names, reasons) is escaped with `html.escape`.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from app import __version__
from app.admin_client import admin_url

log = logging.getLogger("app.api.status")

REFRESH_SECONDS = 5
CHART_SECONDS = 300  # the chart's window: the last 5 minutes
RING_SECONDS = 600  # the ring buffer keeps 10 minutes
SUBSCRIBER_TIMEOUT_SECONDS = 2.0
DEAD_LETTERS_SHOWN = 10
REASON_CHARS_SHOWN = 300

router = APIRouter()


# --------------------------------------------------------------------------- event rate


class EventRate:
    """Per-second counts of accepted activities over the last `seconds` seconds.

    Recorded by the ingest handler and read by the status page, both on the event loop's
    thread, so no lock (it cost every request one).
    """

    def __init__(self, seconds: int = RING_SECONDS) -> None:
        self.size = seconds
        self._counts = [0] * seconds
        self._stamps = [-1] * seconds  # which second each slot currently holds

    def record(self, n: int, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        slot = second % self.size
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._counts[slot] = 0
        self._counts[slot] += n

    def series(self, window: int = CHART_SECONDS, now: float | None = None) -> list[int]:
        """Counts for the `window` seconds ending with the current one, oldest first."""
        window = min(window, self.size)
        current = int(time.time() if now is None else now)
        out = []
        for second in range(current - window + 1, current + 1):
            slot = second % self.size
            out.append(self._counts[slot] if self._stamps[slot] == second else 0)
        return out


# --------------------------------------------------------------------------- build info


def build_commit(root: Path | None = None) -> str | None:
    """BUILD_COMMIT from the environment, else `git rev-parse --short HEAD`, else None."""
    commit = os.environ.get("BUILD_COMMIT", "").strip()
    if commit:
        return commit
    root = root or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def install_status_page(app: FastAPI) -> None:
    """Give `app` the ring buffer the ingest route feeds, the build info and `GET /status`."""
    app.state.event_rate = EventRate()
    app.state.build_commit = build_commit()
    app.include_router(router)


# --------------------------------------------------------------------------- gathering


@dataclass
class Snapshot:
    rate: list[int]
    backlog: tuple[int, float | None] | None  # (messages, oldest age s); None: not reported
    backlog_error: str | None
    tables: list[dict[str, Any]] | None  # None: unknown (see tables_error)
    tables_error: str | None
    subscriber_stats: dict[str, Any] | None
    dead_letter_total: int | None
    dead_letter_reasons: dict[str, int]
    dead_letters: list[Any]
    dead_letters_error: str | None
    generated_at: float


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=SUBSCRIBER_TIMEOUT_SECONDS) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, orjson.loads(exc.read())
        except orjson.JSONDecodeError:
            return exc.code, {"message": str(exc)}


def _subscriber_view(settings: Any) -> tuple[list[dict[str, Any]] | None, str | None, dict[str, Any] | None]:
    base = admin_url(settings)
    try:
        status, body = _get_json(base + "/tables")
    except (urllib.error.URLError, OSError, ValueError):
        return None, "subscriber unreachable", None
    try:
        _, stats = _get_json(base + "/stats")
    except (urllib.error.URLError, OSError, ValueError):
        stats = None
    if status != 200:
        return None, str(body.get("message") or f"subscriber answered {status}"), stats
    return list(body.get("tables") or []), None, stats


def _backlog(broker: Any) -> tuple[tuple[int, float | None] | None, str | None]:
    try:
        stats = broker.backlog()
    except Exception as exc:
        return None, f"broker unavailable: {exc}"
    if stats is None:
        return None, None
    return (stats.messages, stats.oldest_age_seconds), None


def _dead_letters(path: Path) -> tuple[int | None, dict[str, int], list[Any], str | None]:
    from app.messages.deadletters import DeadLetterStore

    if not Path(path).exists():
        return 0, {}, [], None
    try:
        store = DeadLetterStore(path)
    except Exception as exc:
        return None, {}, [], f"dead-letter store unreadable: {exc}"
    try:
        return store.count(), store.counts_by_reason(), store.list(limit=DEAD_LETTERS_SHOWN), None
    except Exception as exc:
        return None, {}, [], f"dead-letter store unreadable: {exc}"
    finally:
        store.close()


def _quarantine_counts(settings: Any) -> dict[str, int]:
    """Quarantined activities per table, from the subscriber's admin port; empty if unknown."""
    from app.schema.identifiers import QUARANTINE_TABLE

    base = admin_url(settings)
    try:
        status, body = _get_json(f"{base}/tables/{QUARANTINE_TABLE}")
        if status != 200 or body.get("columns") is None:
            return {}
        request = urllib.request.Request(
            base + "/query", data=orjson.dumps({"sql": f"SELECT table_name, count(*) FROM {QUARANTINE_TABLE} GROUP BY 1"}),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=SUBSCRIBER_TIMEOUT_SECONDS) as response:
            rows = orjson.loads(response.read())["rows"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return {}
    return {str(table): int(count) for table, count in rows}


def _with_contracts(state: Any, tables: list[dict[str, Any]] | None) -> None:
    """Tables under contract: each table's mode and quarantine count, when a tables file is set."""
    config = state.tables_file.current()
    if config is None or not tables:
        return
    counts = _quarantine_counts(state.settings)
    for t in tables:
        t["contract"] = config.settings_for(t["table"]).contract.describe()
        t["quarantined"] = counts.get(t["table"], 0)


async def snapshot(request: Request) -> Snapshot:
    state = request.app.state
    settings = state.settings
    (backlog, backlog_error), (tables, tables_error, stats), (dl_total, dl_reasons, dl_list, dl_error) = await asyncio.gather(
        asyncio.to_thread(_backlog, state.broker),
        asyncio.to_thread(_subscriber_view, settings),
        asyncio.to_thread(_dead_letters, settings.dead_letter_file),
    )
    await asyncio.to_thread(_with_contracts, state, tables)
    return Snapshot(
        rate=state.event_rate.series(),
        backlog=backlog,
        backlog_error=backlog_error,
        tables=tables,
        tables_error=tables_error,
        subscriber_stats=stats,
        dead_letter_total=dl_total,
        dead_letter_reasons=dl_reasons,
        dead_letters=dl_list,
        dead_letters_error=dl_error,
        generated_at=time.time(),
    )


# --------------------------------------------------------------------------- rendering

e = html.escape


def _utc(ts: float | None) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _num(n: int | None) -> str:
    return "–" if n is None else f"{n:,}"


def nice_ceiling(value: float) -> int:
    """The smallest of 5, 10, 20, 25, 50, 100, 200, 250, 500, ... that is >= value (fifths are whole)."""
    scale = 1
    while True:
        for m in (5, 10, 20, 25, 50):
            if m * scale >= value:
                return m * scale
        scale *= 10


def chart_svg(series: list[int], width: int = 1180, height: int = 220) -> str:
    """Per-second counts as a filled step area with a y scale and minute ticks."""
    left, right, top, bottom = 56, 10, 12, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    y_max = nice_ceiling(max(series, default=0))
    n = max(1, len(series))
    step = plot_w / n

    def y(v: float) -> float:
        return top + plot_h - (v / y_max) * plot_h

    points = [f"{left:.1f},{top + plot_h:.1f}"]
    for i, v in enumerate(series):
        x0, x1 = left + i * step, left + (i + 1) * step
        points.append(f"{x0:.1f},{y(v):.1f}")
        points.append(f"{x1:.1f},{y(v):.1f}")
    points.append(f"{left + n * step:.1f},{top + plot_h:.1f}")
    parts = [
        f'<svg id="rate-chart" role="img" aria-label="activities accepted per second, last {n} seconds" '
        f'viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fbfcfe" stroke="#d5dbe5"/>',
    ]
    for tick in range(1, 6):
        gy = y(y_max * tick / 5)
        text = f"{y_max * tick // 5:,}"
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{gy:.1f}" y2="{gy:.1f}" stroke="#e6eaf0"/>')
        parts.append(f'<text x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end" class="axis">{text}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + plot_h + 4:.1f}" text-anchor="end" class="axis">0</text>')
    minutes = n // 60
    for m in range(minutes + 1):
        gx = left + plot_w - m * 60 * step
        label = "now" if m == 0 else f"-{m} min"
        parts.append(f'<line x1="{gx:.1f}" x2="{gx:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#8a94a6"/>')
        anchor = "end" if m == 0 else "middle"
        parts.append(f'<text x="{gx:.1f}" y="{height - 6}" text-anchor="{anchor}" class="axis">{label}</text>')
    parts.append(f'<polygon points="{" ".join(points)}" fill="#3b82f6" fill-opacity="0.35" stroke="#2563eb" stroke-width="1.2"/>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f3f5f9;color:#1c2430}
header{background:#1f2a3c;color:#fff;padding:14px 28px;display:flex;justify-content:space-between;align-items:baseline}
header h1{font-size:20px;margin:0;font-weight:600}
header .build{color:#c3cddd;font-size:13px}
main{padding:18px 28px;max-width:1240px}
section{background:#fff;border:1px solid #dfe4ec;border-radius:8px;padding:14px 18px;margin-bottom:16px}
h2{font-size:15px;margin:0 0 10px;color:#334155}
.cards{display:grid;grid-template-columns:repeat(5,1fr);gap:12px;margin-bottom:16px}
.card{background:#fff;border:1px solid #dfe4ec;border-radius:8px;padding:10px 14px}
.card .label{color:#64748b;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:24px;font-weight:600;margin-top:2px}
.card .sub{color:#64748b;font-size:12px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #edf0f5;vertical-align:top}
th{color:#64748b;font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.reason{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px;word-break:break-word}
.warn{color:#b45309;font-weight:600}
.bad{color:#b91c1c;font-weight:600}
.muted{color:#64748b}
svg .axis{font-size:11px;fill:#64748b}
"""


def render(snap: Snapshot, version: str, commit: str | None) -> str:
    now = snap.generated_at
    rate = snap.rate
    last_minute = sum(rate[-60:])
    recent = rate[-11:-1] if len(rate) > 1 else rate  # the 10 complete seconds before this one
    per_second = sum(recent) / max(1, len(recent))

    if snap.backlog_error:
        backlog_value, backlog_sub = '<span class="bad">?</span>', e(snap.backlog_error)
    elif snap.backlog is None:
        backlog_value, backlog_sub = "n/a", "this broker does not report its backlog"
    else:
        backlog_value = _num(snap.backlog[0])
        backlog_sub = f"oldest unacked: {e(_ago(snap.backlog[1]))}" if snap.backlog[0] else "nothing waiting"
    if snap.dead_letter_total is None:
        dl_value = '<span class="bad">?</span>'
    else:
        dl_value = f'<span class="{"warn" if snap.dead_letter_total else ""}">{_num(snap.dead_letter_total)}</span>'
    sub_stats = snap.subscriber_stats or {}
    cards = [
        ("Accepted / s", f"{per_second:,.1f}", "average of the last 10 s"),
        ("Accepted, last 5 min", _num(sum(rate)), f"last minute: {_num(last_minute)}"),
        ("Broker backlog", backlog_value, backlog_sub),
        ("Rows applied", _num(sub_stats.get("rows_inserted")) if snap.subscriber_stats else "–",
         f"deleted: {_num(sub_stats.get('rows_deleted'))}" if snap.subscriber_stats else "subscriber unreachable"),
        ("Dead letters", dl_value, "not replayed yet"),
    ]
    card_html = "".join(
        f'<div class="card" id="card-{i}"><div class="label">{label}</div><div class="value">{value}</div>'
        f'<div class="sub">{sub}</div></div>'
        for i, (label, value, sub) in enumerate(cards)
    )

    if snap.tables_error is not None:
        tables_html = f'<p class="bad" id="tables-error">{e(snap.tables_error)}</p>'
    elif not snap.tables:
        tables_html = '<p class="muted">No tables yet.</p>'
    else:
        contracts = any("contract" in t for t in snap.tables)  # a tables file is set
        rows = "".join(
            f'<tr data-table="{e(t["table"])}"><td>{e(t["table"])}</td>'
            f'<td class="num rows">{_num(t.get("rows"))}</td>'
            f'<td>{e(_utc(t.get("last_write")))}</td>'
            f'<td class="num">{e(_ago(now - t["last_write"]) if t.get("last_write") else "–")}</td>'
            + (f'<td class="contract">{e(t.get("contract") or "")}</td><td class="num quarantined">{_num(t.get("quarantined"))}</td>'
               if contracts else "")
            + "</tr>"
            for t in snap.tables
        )
        contract_heads = '<th>Contract</th><th class="num">Quarantined</th>' if contracts else ""
        tables_html = (
            '<table id="tables"><thead><tr><th>Table</th><th class="num">Rows</th><th>Last write (UTC)</th>'
            f'<th class="num">Ago</th>{contract_heads}</tr></thead><tbody>{rows}</tbody></table>'
            '<p class="muted">Last write: by the running subscriber since it started.</p>'
        )

    if snap.dead_letters_error:
        dl_html = f'<p class="bad">{e(snap.dead_letters_error)}</p>'
    elif not snap.dead_letters:
        dl_html = '<p class="muted">No dead letters.</p>'
    else:
        by_reason = "".join(
            f'<tr><td class="reason">{e(reason[:REASON_CHARS_SHOWN])}</td><td class="num">{_num(n)}</td></tr>'
            for reason, n in sorted(snap.dead_letter_reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        )
        latest = "".join(
            f'<tr data-dead-letter="{d.id}"><td class="num">{d.id}</td><td>{e(_utc(d.created_at))}</td>'
            f'<td>{e(d.table_name or "–")}</td><td>{e(d.kind)}</td><td class="num">{d.attempts}</td>'
            f'<td class="reason" title="{e(d.reason)}">{e(d.reason[:REASON_CHARS_SHOWN])}</td></tr>'
            for d in snap.dead_letters
        )
        dl_html = (
            '<h2>By reason</h2><table id="dead-letter-reasons"><thead><tr><th>Reason</th><th class="num">Count</th></tr>'
            f"</thead><tbody>{by_reason}</tbody></table>"
            f'<h2 style="margin-top:14px">Latest {len(snap.dead_letters)}</h2>'
            '<table id="dead-letters"><thead><tr><th class="num">#</th><th>When (UTC)</th><th>Table</th><th>Kind</th>'
            f'<th class="num">Attempts</th><th>Reason</th></tr></thead><tbody>{latest}</tbody></table>'
            '<p class="muted">Replay after a fix: <code>python -m app dead-letters replay --all</code></p>'
        )

    build = f"v{e(version)}" + (f" · commit {e(commit)}" if commit else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Ingest pipeline status</title><style>{_CSS}</style></head>
<body>
<header><h1>Ingest pipeline status</h1><div class="build" id="build">{build} · {e(_utc(now))} · refreshes every {REFRESH_SECONDS}s</div></header>
<main>
<div class="cards">{card_html}</div>
<section id="rate"><h2>Activities accepted per second, last {len(rate) // 60} minutes (this API process)</h2>{chart_svg(rate)}</section>
<section id="tables-section"><h2>Tables</h2>{tables_html}</section>
<section id="dead-letters-section"><h2>Dead letters</h2>{dl_html}</section>
</main></body></html>"""


@router.get("/status", include_in_schema=False)
async def status_page(request: Request) -> HTMLResponse:
    snap = await snapshot(request)
    page = render(snap, __version__, request.app.state.build_commit)
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})

"""The status page, rendered by a real browser (Debian's headless chromium) against real processes.

The screenshot is kept under test-artifacts/ (gitignored) for a person to look at.
Without chromium the test is skipped, unless CI=true: then it fails loudly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT, Pipeline, wait_until

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed (apt-get install -y chromium); CI=true never skips this test")
    pytest.skip("chromium is not installed (apt-get install -y chromium)")


def browse(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=120,
    )


class _Cells(HTMLParser):
    """Collects the text of each <tr data-table=...> row and of #dead-letters rows."""

    def __init__(self) -> None:
        super().__init__()
        self.table_rows: dict[str, list[str]] = {}
        self.dead_letter_rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._key: tuple[str, str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-table" in a:
            self._row, self._key = [], ("table", a["data-table"])
        elif tag == "tr" and "data-dead-letter" in a:
            self._row, self._key = [], ("dl", a["data-dead-letter"])
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            kind, key = self._key
            if kind == "table":
                self.table_rows[key] = self._row
            else:
                self.dead_letter_rows.append(self._row)
            self._row = self._key = None


def _activity(op, table, names, types, values):
    return {"operation": op, "table": table, "col_names": names, "col_types": types, "col_values": values}


def test_status_page_in_a_browser(tmp_path):
    chromium()  # skip / fail early
    p = Pipeline.create(tmp_path, BUILD_COMMIT="abc1234")
    try:
        p.start("subscriber")
        p.start("api")
        # Three batches, 120 + 75 + 40 = 235 rows into page_views; one type conflict on <b>-named table.
        sizes = (120, 75, 40)
        n = 0
        for size in sizes:
            batch = [_activity("insert", "page_views", ["id", "path"], ["integer", "string"], [n + i, f"/p/{i}"]) for i in range(size)]
            n += size
            assert p.post({"user_activities": batch}).status_code == 200
        conflict = [
            _activity("insert", "signups", ["id", "plan"], ["integer", "string"], [1, "pro"]),
            _activity("insert", "signups", ["id", "plan"], ["integer", "integer"], [2, 3]),
        ]
        assert p.post({"user_activities": conflict}).status_code == 200
        wait_until(lambda: p.query("SELECT count(*) FROM page_views") == [(n,)], what="page_views applied")
        wait_until(lambda: p.stats()["dead_lettered"] == 1, what="dead letter")

        url = p.api_url + "/status"
        assert httpx.get(url, timeout=10).headers["content-type"].startswith("text/html")
        out = browse(url, tmp_path, "--dump-dom")
        assert out.returncode == 0, out.stderr[-2000:]
        dom = out.stdout
        cells = _Cells()
        cells.feed(dom)

        assert cells.table_rows["page_views"][0] == "page_views"
        assert cells.table_rows["page_views"][1].replace(",", "") == str(n)
        assert cells.table_rows["signups"][1] == "1"
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", cells.table_rows["page_views"][2])
        assert len(cells.dead_letter_rows) == 1
        reason = cells.dead_letter_rows[0][5]
        assert reason == "column 'plan' is string in table signups, activity sends integer"
        assert "Accepted, last 5 min" in dom and f"{n + 2:,}" in dom  # 237 accepted by this API process
        assert 'id="rate-chart"' in dom and "<polygon" in dom
        assert "abc1234" in dom and "v0.1.0" in dom
        assert "subscriber unreachable" not in dom

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-page.png"
        shot.unlink(missing_ok=True)
        out = browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1280,1600")
        assert out.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, out.stderr[-2000:]

        # Subscriber gone: the page still renders and says so.
        p.kill("subscriber")
        out = browse(url, tmp_path, "--dump-dom")
        assert out.returncode == 0
        assert "subscriber unreachable" in out.stdout
        assert "column &#x27;plan&#x27; is string" in out.stdout or "column 'plan' is string" in out.stdout
        browse(url, tmp_path, f"--screenshot={ARTIFACTS / 'status-page-subscriber-down.png'}", "--window-size=1280,1600")
    finally:
        p.stop()

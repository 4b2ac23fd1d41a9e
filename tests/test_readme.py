"""The README and docs/ stay true to the code, and every link in them resolves."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from app.schema.types import TYPES
from app.schema.validation import validate_batch
from app.settings import Settings
from app.warehouse.bigquery.types import TypeMapper as BigQueryTypes
from app.warehouse.duckdb import TYPE_MAPPER as DUCKDB_TYPES
from tests.support.processes import ROOT

README = (ROOT / "README.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
TYPES_DOC = (ROOT / "docs" / "types.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 14 * 1024

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> Iterator[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        yield slug if count == 0 else f"{slug}-{count}"


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_every_setting_is_documented():
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", OPERATIONS, flags=re.M))
    expected = {name.upper() for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the docs/operations.md table"
    assert documented - expected == set(), "docs/operations.md documents settings that do not exist"
    assert "docs/operations.md#configuration" in README, "the README points to the settings table"


def test_type_mapping_table_matches_code():
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \| `([^`]+)` \|", TYPES_DOC, flags=re.M)
    table = {name: (duck, bq) for name, duck, bq in rows if name in TYPES}
    assert set(table) == set(TYPES)
    bigquery_types = BigQueryTypes()
    for name in TYPES:
        assert table[name][0].startswith(DUCKDB_TYPES.column_type(name)), name
        assert table[name][1] == bigquery_types.column_type(name), name


def test_readme_summarizes_every_type_once():
    summarized = re.findall(r"^- `(\w+)`: ", README, flags=re.M)
    assert sorted(summarized) == sorted(TYPES)


def test_readme_example_body_is_valid():
    body = json.loads((ROOT / "examples" / "readme.json").read_text())
    assert len(validate_batch(body, max_activities=10)) == 2
    assert "make run" in README and "make test" in README


def test_readme_stays_short():
    assert len(README.encode()) <= README_MAX_BYTES


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in set(anchors(linked.read_text())):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def test_link_check_sees_links_and_headings():
    # The checks above pass vacuously if these helpers find nothing.
    assert "docs/api.md#idempotency" in relative_links(ROOT / "README.md")
    assert "https://cloud.google.com/pubsub/docs/ordering" not in relative_links(ROOT / "docs" / "google-cloud.md")
    assert {"ops-running-it", "quick-start"} <= set(anchors(README))
    assert list(anchors("# A: `b_c` d\n## A: b_c d\n```\n# not a heading\n```\n")) == ["a-b_c-d", "a-b_c-d-1"]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target.partition("#")[0] for target in relative_links(ROOT / "README.md")}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set()

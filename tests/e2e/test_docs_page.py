"""/docs in a real browser (Debian's headless chromium) with every other host unreachable.

Swagger UI must render the operations from assets served by the API itself.
Without chromium the test is skipped, unless CI=true: then it fails loudly.
"""

from __future__ import annotations

from tests.e2e.test_status_page import ARTIFACTS, browse, chromium
from tests.support.processes import Pipeline


def test_docs_render_offline(tmp_path):
    chromium()  # skip / fail early
    p = Pipeline.create(tmp_path)
    try:
        p.start("api")
        # Every host name resolves to nothing except the API's own address: no CDN.
        offline = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--virtual-time-budget=15000")
        out = browse(p.api_url + "/docs", tmp_path, *offline, "--dump-dom")
        assert out.returncode == 0, out.stderr[-2000:]
        dom = out.stdout
        assert 'class="swagger-ui"' in dom, dom[-2000:]
        assert "/api-log/v1/" in dom and "Ingest a batch of user activities" in dom  # the operation, rendered
        assert "Unable to render this definition" not in dom

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "docs-page.png"
        shot.unlink(missing_ok=True)
        out = browse(p.api_url + "/docs", tmp_path, *offline, f"--screenshot={shot}", "--window-size=1280,1400")
        assert out.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, out.stderr[-2000:]
    finally:
        p.stop()

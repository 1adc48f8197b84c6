"""The browser libraries are ours to serve (issue 21): pinned copies in static/vendor/ with their
licences, exactly as .ci/vendor-web recorded them, and no page (the API docs included) loads or
allows anything from another origin.
"""

from __future__ import annotations

import hashlib
import json
import re

from app.api.routes.lab import LAB_PAGES
from app.settings import asset_dir

VENDOR = asset_dir("static") / "vendor"
PAGES = ["/", "/spam", "/lab", *(f"/lab/{name}" for name in LAB_PAGES), "/docs"]


def test_vendored_files_are_the_ones_the_manifest_pins():
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    files = {f["name"]: f for f in manifest["files"]}
    on_disk = {p.name for p in VENDOR.iterdir()} - {"manifest.json"}
    assert on_disk == set(files), "run bash .ci/vendor-web to bring static/vendor/ and its manifest together"
    for name, entry in files.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == entry["sha256"], name
    packages = {p["name"]: p for p in manifest["packages"]}
    assert {"markdown-it", "dompurify", "@highlightjs/cdn-assets", "swagger-ui-dist"} <= set(packages)
    for name, package in packages.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"]), name  # pinned, not a range
        assert re.fullmatch(r"[0-9a-f]{64}", package["tarball_sha256"]), name
        licences = [f for f in files.values() if f["package"] == name and f["from"] == "LICENSE"]
        assert licences and (VENDOR / licences[0]["name"]).stat().st_size > 500, f"{name} has no licence beside it"


def test_no_page_allows_or_loads_another_origin(client):
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "http" not in csp and "*" not in csp, (path, csp)
        urls = re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="([^"]+)"', response.text)
        assert urls, path
        for url in urls:
            assert url.startswith("/static/"), (path, url)
            assert client.get(url).status_code == 200, (path, url)


def test_docs_use_the_vendored_swagger_ui_and_redoc_leads_there(client):
    html = client.get("/docs").text
    assert '/static/vendor/swagger-ui-bundle.js' in html and '/static/vendor/swagger-ui.css' in html
    redoc = client.get("/redoc", follow_redirects=False)
    assert redoc.status_code in (302, 303, 307) and redoc.headers["location"] == "/docs"

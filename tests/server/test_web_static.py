"""The chat page's static side over real HTTP on a tiny random model: served at / and /web/ from the
package itself, same origin only, shadowing no API route; every file of server/web/ is package data."""

from __future__ import annotations

import re
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest_http import KEY_A, LiveServer, make_settings
from .tiny import tiny_engine

ROOT = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Iterator[LiveServer]:
    server = LiveServer(make_settings(tmp_path_factory.mktemp("web"), (KEY_A,)), tiny_engine(tokenizer))
    yield server
    server.stop()


def test_page_is_static_same_origin_and_shadows_nothing(live: LiveServer) -> None:
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in (("chat.js", "javascript"), ("api.js", "javascript"), ("chat.css", "text/css")):
        r = httpx.get(f"{live.url}/web/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert re.findall(r'(?:src|href)="([^"]*)"', page.text) == ["/web/chat.css", "/web/chat.js"]
    missing = httpx.get(f"{live.url}/web/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{live.url}/v1/models").status_code == 401  # the API still wants its key
    assert httpx.get(f"{live.url}/metrics").status_code == 200


def test_package_data_ships_every_web_file() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "server"
    ]
    files = [p.relative_to(ROOT / "server").as_posix() for p in (ROOT / "server" / "web").iterdir()]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)

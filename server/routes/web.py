"""GET /: the built-in chat page; its script and stylesheet under /web/. No API key needed to load the page
(the page asks for one when the API wants it); nothing on it comes from another origin."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Same origin only: no CDN, font or script from elsewhere can load, and the page's key goes nowhere else.
POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["web"])


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": POLICY})


def static_files() -> StaticFiles:
    """The page's assets, mounted at /web."""
    return StaticFiles(directory=WEB_DIR)

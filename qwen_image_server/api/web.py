"""The web playground: `GET /` is a plain HTML/CSS/JS page, its files are under `/static`.

No build step and nothing fetched from elsewhere (the page works offline): the files ship in the
package (`qwen_image_server/static/`). The page talks to the public API only (`/info`,
`/v1/jobs`), with the user's API key when the server has keys, so it needs no route of its own.
Both `/` and `/static/...` are open even with API keys: the page holds no data, and it is what
asks the user for the key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Only this origin: no CDN, no external fonts, images come back as blobs from the API.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)

router = APIRouter(tags=["web"], include_in_schema=False)


@router.get("/", name="playground")
async def playground() -> FileResponse:
    """The playground page (its script and style are under /static)."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Cache-Control": "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def install_web(app: FastAPI) -> None:
    """Add the playground page and mount its static files at /static."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

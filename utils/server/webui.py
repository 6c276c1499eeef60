"""The chat page serve.py answers at `/`: one HTML page, its stylesheet and its script (utils/server/webui/),
served from this folder only, with a strict Content-Security-Policy.

The page talks to the server's own OpenAI endpoints (chat with SSE, transcription, speech, models) and nothing
else: the policy allows scripts, styles and connections to this origin only, and media from data:/blob: URLs
the page makes itself (attachment previews, the spoken answer). No inline script or style is allowed, so a
string that reaches the page cannot run as code. The page needs no API key to load; the /v1 routes it calls do.
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FOLDER = Path(__file__).with_name("webui")

CSP = ("default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' data: blob:; style-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

# URL path -> (file in FOLDER, media type): a fixed list, so no request can name another file
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/webui/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/webui/style.css": ("style.css", "text/css; charset=utf-8")}


def asset_route(path: str, name: str, media_type: str) -> Route:
    """A GET route answering one file of FOLDER; read per request, so an edited page shows on reload."""
    file = FOLDER / name

    async def serve(request: Request) -> Response:
        return Response(file.read_bytes(), media_type=media_type, headers=HEADERS)

    return Route(path, serve, methods=["GET"], name=f"webui:{name}")


def routes() -> list[Route]:
    """The page's routes, added to the app unless serve.py runs with --no_webui."""
    return [asset_route(path, name, media_type) for path, (name, media_type) in ASSETS.items()]

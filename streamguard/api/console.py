"""/console: the operator's web console (CONTRACT §9), static files shipped in
the package (streamguard/console/) and served with a strict
Content-Security-Policy. The page talks to the public /v1 API only, with the
API key the operator types in (kept in the browser tab's session storage)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..errors import NotFound

# Every file the console serves: URL name -> (package file, content type). Nothing
# else under the package is reachable.
ASSETS: dict[str, tuple[str, str]] = {
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
    "vendor/hls.min.js": ("vendor/hls.min.js", "text/javascript; charset=utf-8"),  # hls.js 1.7.4, pinned
    "vendor/hls.js-LICENSE": ("vendor/hls.js-LICENSE", "text/plain; charset=utf-8"),
}
PAGE = ("index.html", "text/html; charset=utf-8")

# Only this origin, no inline script or style, no plugins, no framing. hls.js
# runs its transmuxer in a Worker made from a blob: URL and feeds the <video>
# through MediaSource (blob: media URL).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("streamguard").joinpath("console", name).read_bytes()


def _reply(asset: tuple[str, str]) -> web.Response:
    name, content_type = asset
    return web.Response(body=_read(name), headers={"Content-Type": content_type, **SECURITY_HEADERS})


async def console_page(request: web.Request) -> web.Response:
    """The console's single page."""
    return _reply(PAGE)


async def console_asset(request: web.Request) -> web.Response:
    """The console's script, style sheet and the vendored hls.js."""
    asset = ASSETS.get(request.match_info["name"])
    if asset is None:
        raise NotFound(f"no console file {request.match_info['name']}")
    return _reply(asset)

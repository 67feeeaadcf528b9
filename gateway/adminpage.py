"""The live admin page: static files under /ui/ on the admin listener.

The files (gateway/adminui/, package data) hold no data, so they are served
without the token; the page asks for it and keeps it in a JS variable, sent
as the Authorization header of its /v1 calls. Nothing is fetched from outside
the listener (no CDN: a cluster's admin port may reach nothing else), and the
headers say so to the browser: a Content-Security-Policy of 'self' only, no
inline script, no framing, no sniffing, no caching, no referrer.

The files are read once at start (a few kB); the names served are exactly
the files shipped, so no request path ever reaches the file system.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PREFIX = "/ui/"

TYPES = {".html": "text/html", ".mjs": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# form-action 'none': if the script ever failed to take over the token form,
# the browser still would not submit it (the token would land in a URL).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def load_files() -> dict[str, tuple[bytes, str]]:
    """{name: (body, content type)} for every file shipped in gateway/adminui/."""
    out = {}
    for entry in resources.files("gateway").joinpath("adminui").iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in TYPES:
            out[entry.name] = (entry.read_bytes(), TYPES[suffix])
    if "index.html" not in out:
        raise RuntimeError("gateway/adminui/index.html is missing: the package was built without its data files")
    return out


def add_routes(app: web.Application) -> None:
    files = load_files()

    async def page(request):
        name = request.match_info.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            return web.json_response({"error": f"no such file: {PREFIX}{name[:80]}"}, status=404,
                                     headers=PAGE_HEADERS)
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=PAGE_HEADERS)

    async def root(request):
        raise web.HTTPFound(PREFIX)

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        # Every answer of the admin listener: nothing here is to be sniffed, framed
        # or cached (API answers are live figures, some of them about sessions).
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        if request.path.startswith("/v1/"):
            h.setdefault("Cache-Control", "no-store")

    app.on_response_prepare.append(headers)
    app.router.add_get("/", root)
    app.router.add_get(PREFIX, page)
    app.router.add_get(PREFIX + "{name}", page)

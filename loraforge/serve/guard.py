"""RequestGuard: what another web page could make a browser send to a server on this machine is refused before
any route runs. `loraforge serve` on loopback checks the Host header (DNS rebinding); with the dashboard (--ui,
`loraforge ui`), which starts processes and reads files, requests that change something must also come from its
own page.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse

CHANGING = ("POST", "PUT", "PATCH", "DELETE")
ANY_ADDRESS = ("0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}


def refused(status: int, message: str, code: str) -> JSONResponse:
    """An answer in OpenAI's error shape, as the rest of the API gives."""
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": code}},
                        status_code=status)


def _host_port(value: str, scheme: str) -> tuple[str | None, int | None]:
    """(name, port) of a Host header ('[::1]:8000' -> ('::1', 8000); no port: the scheme's); (None, None) if bad."""
    try:
        parts = urlsplit(f"//{value}")
        return parts.hostname, parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None, None


def loopback(name: str) -> bool:
    """localhost or a loopback IP address (127.x.y.z, ::1; without brackets)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def open_to_network(host: str, port: int, api_key: str | None) -> str | None:
    """The warning for a server that listens beyond this machine without an API key (None otherwise): anyone who
    reaches the port may generate, and load and remove adapters (security soak: `serve --host 0.0.0.0` said
    nothing; the dashboard refuses it, since it also starts processes)."""
    if api_key or loopback(host.strip("[]")):
        return None
    return (f"warning: --host {host} without an API key: anyone who reaches port {port} can generate with this "
            f"model and load or remove adapters; set LORAFORGE_API_KEY (or --api-key KEY) to require one")


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """The Origin header names the server the request reached (scheme, host and port): the page is its own."""
    try:
        parts = urlsplit(origin)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    return parts.scheme == scheme and parts.hostname is not None and (parts.hostname, port) == _host_port(host, scheme)


class RequestGuard:
    """ASGI middleware that refuses, before any route runs, what another web page could make a browser send:
    - a Host header that is not an address the server listens on (DNS rebinding: a site whose name now points at
      127.0.0.1 would read every run): 400. Loopback names and `host` (--host) are fine; with --host 0.0.0.0
      (which needs an API key) any. Mounted without `host`, a server reached on a loopback address takes loopback
      names only;
    - with `cross_site` (the dashboard), a request that changes something (POST, PUT, PATCH, DELETE) from another
      origin: an Origin header that is not this server, or Sec-Fetch-Site other than same-origin / none (CSRF):
      403; a body not declared JSON (a plain HTML form posts text/plain without asking first): 415. The API alone
      leaves these to its clients (`curl -d` sends no JSON content type).
    The API key is checked after it (/ui/api by the dashboard, /v1 and the API docs by serve.api.KeyCheck; /health
    stays open)."""

    def __init__(self, app, host: str | None = None, cross_site: bool = True):
        self.app, self.host, self.cross_site = app, host, cross_site

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (refusal := self.refusal(Request(scope))) is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> JSONResponse | None:
        scheme, host = request.scope.get("scheme", "http"), request.headers.get("host", "")
        if not self.host_ok(request, host):
            port = (request.scope.get("server") or (None, None))[1]
            page = "/ui/" if self.cross_site else "/"
            return refused(400, f"Host header {host!r}: not an address this server listens on; open "
                                f"http://127.0.0.1{f':{port}' if port else ''}{page} (localhost and [::1] work too), "
                                f"or start the server with --host set to the name you use", "bad_host")
        if self.cross_site and request.method in CHANGING:
            origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
            own = f"{scheme}://{host}"
            if origin is not None and not same_origin(origin, scheme, host):
                return refused(403, f"Origin {origin!r}: a request that changes something must come from this "
                                    f"server's own page ({own}/ui/); other sites may not", "cross_origin")
            if site is not None and site not in ("same-origin", "none"):
                return refused(403, f"Sec-Fetch-Site {site!r}: a request that changes something must come from "
                                    f"this server's own page ({own}/ui/); other sites may not", "cross_origin")
            kind = request.headers.get("content-type", "")
            if self.has_body(request) and kind.split(";")[0].strip().lower() != "application/json":
                shown = repr(kind) if kind else "missing"
                return refused(415, f"Content-Type {shown}: send the body as JSON, with the header "
                                    f"'Content-Type: application/json'", "unsupported_media_type")
        return None

    def host_ok(self, request: Request, host: str) -> bool:
        """A loopback name or --host, with any port (an SSH tunnel's local port too): a rebinding site's name is
        neither, while the Host a browser sends always names where it connected. The API alone checks only a
        server on loopback (the unprotected one a page on this machine could reach); one listening on a network
        address is reachable by name from that network anyway."""
        if self.host in ANY_ADDRESS or not (self.cross_site or self.host is None or loopback(self.host.strip("[]"))):
            return True
        name, _ = _host_port(host, request.scope.get("scheme", "http"))
        server = (request.scope.get("server") or ("", None))[0] or ""
        if name is None:
            return False
        if self.host is None and not loopback(server):  # reached beyond loopback: --host needed a key
            return True
        return loopback(name) or (self.host is not None and name == self.host.strip("[]").lower())

    @staticmethod
    def has_body(request: Request) -> bool:
        if "transfer-encoding" in request.headers:
            return True
        try:
            return int(request.headers.get("content-length") or 0) != 0
        except ValueError:
            return True

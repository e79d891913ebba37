"""One HTTP client for OpenAI-compatible servers (the generation backend and the MT-Bench judge).

Standard library only. A request goes to exactly the URL the user gave: a redirect is never followed (the
API key would go to the new address, and urllib turns a redirected POST into a body-less GET); it comes
back as an `HTTPError` with its 3xx code for the caller to report.

Why not the ``openai`` client (measured 2026-12-06, openai 3.63.0, against two stdlib servers on
127.0.0.1): it follows a 307 to another address by default (httpx ``follow_redirects=True``) and re-sends
the request body there; httpx drops the ``Authorization`` header on the cross-origin hop, but the prompt
still goes to a URL the user did not give. ctxaware's rule is that nothing follows a redirect, so the
standard library's opener with redirects refused stays (it also keeps the judge free of a dependency).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from ctxaware.core.errors import CtxawareError


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None  # urllib then raises HTTPError(code): the caller reports it and never follows


NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def check_url(url: str | None, flag: str, example: str) -> str:
    """``url`` must be an http(s) URL with a host; checked before any work (one-line error naming ``flag``)."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CtxawareError(f"{flag} {url!r} is not an http(s) URL with a host; give e.g. {example}")
    return url  # type: ignore[return-value]


def post_json(url: str, body: dict, api_key: str | None = None, timeout: float = 60.0) -> Any:
    """POST ``body`` as JSON to exactly ``url`` and return the parsed reply. Raises `urllib.error.HTTPError`
    (a 3xx included: never followed), `urllib.error.URLError` / `OSError` for the network, `ValueError` for
    a reply that is not JSON, `UnicodeDecodeError` for one that is not UTF-8."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with NO_REDIRECTS.open(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw.decode("utf-8"))


def http_error_text(e: urllib.error.HTTPError, url: str) -> str:
    """One line for an HTTP error, the server's own message when it sent one."""
    if 300 <= e.code < 400:
        return f"HTTP {e.code} redirect to {e.headers.get('Location', '?')} (not followed: requests go only to {url})"
    detail = ""
    try:
        payload = json.loads(e.read().decode("utf-8", "replace") or "{}")
        detail = payload.get("detail") or payload.get("error", {}).get("message", "")  # FastAPI / OpenAI
    except (ValueError, AttributeError, OSError):
        pass
    return f"HTTP {e.code} {e.reason}" + (f": {str(detail)[:200]}" if detail else "")

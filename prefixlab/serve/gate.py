"""The door every HTTP request comes through, before Gradio reads it: one ASGI middleware for
the app and the API server.

- **Host check**: a server without a login answers only requests addressed to this machine
  (Host 127.0.0.1, localhost, [::1], or the host it was told to listen on). A web page on
  another origin whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name as the
  Host, and is refused before it can list or delete runs.
- **Body size**: a JSON request body larger than the limit is refused with 413, whether it
  says its length or streams it; file uploads keep Gradio's own cap.
- **Routes**: only the documented ways in answer. Gradio's unqueued `/gradio_api/run/<name>`
  and `/gradio_api/api/<name>` would run an endpoint beside its queue; they answer 404 with
  the documented route (`/gradio_api/call/<name>`).
- **Arguments of the plain-HTTP route**: a POST to `/gradio_api/call/<endpoint>` must hold
  `{"data": [...]}` with the endpoint's parameters in order; trailing ones may be left out
  and take their defaults. Too few or too many are refused naming the parameters (Gradio's
  own refusal printed its internals and a traceback).
- **Login attempts**: after `login_attempts` wrong passwords from one address within
  `login_window_s`, that address waits out the window (429), so a password cannot be guessed
  at machine speed.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
UPLOAD = re.compile(r"^/gradio_api/upload/?$")
UNQUEUED = re.compile(r"^/gradio_api/(run|api)/(?P<name>[^/]+)/?$")
CALL = re.compile(r"^/gradio_api/call/(v2/)?(?P<name>[^/]+)/?$")
NO_DEFAULT = object()
LOGIN = re.compile(r"^/login/?$")


def host_name(header: str) -> str:
    """The name in a Host header, without its port, lower case ('[::1]:7860' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts(listen_on: str, login: bool) -> frozenset[str] | None:
    """The Host names a server answers: None (any) once a login guards it, else this
    machine's names and the one it listens on (unless that is a wildcard address)."""
    if login:
        return None
    names = set(LOCAL_NAMES)
    if listen_on not in ("0.0.0.0", "::", ""):
        names.add(host_name(listen_on) if not listen_on.startswith("[") else listen_on[1:-1])
        names.add(listen_on.lower())
    return frozenset(names)


class LoginThrottle:
    """Wrong passwords per client address in a sliding window (thread-safe)."""

    def __init__(self, attempts: int = 5, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts, self.window_s, self.clock = attempts, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_s(self, address: str) -> float:
        """Seconds the address must wait before its next try (0: it may try now)."""
        with self._lock:
            failures = self._recent(address)
            if len(failures) < self.attempts:
                return 0.0
            return max(0.0, failures[0] + self.window_s - self.clock())

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self.clock())

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= self.clock() - self.window_s:
            failures.popleft()
        return failures


class Gate:
    """ASGI middleware: Host check, body cap, documented routes only, login throttle."""

    def __init__(self, app, hosts: Iterable[str] | None, body_bytes: int,
                 throttle: LoginThrottle | None = None,
                 endpoints: Mapping[str, Sequence[tuple[str, object]]] | None = None) -> None:
        """`endpoints`: each public endpoint's parameters in order, (name, default), the
        default NO_DEFAULT where a value is required."""
        self.app = app
        self.hosts = None if hosts is None else frozenset(hosts)
        self.body_bytes = body_bytes
        self.throttle = throttle or LoginThrottle()
        self.endpoints = dict(endpoints or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await _refuse(scope, send, 403, (
                f"this server answers requests to {', '.join(sorted(self.hosts))}, not to "
                f"Host {host!r}: open it by one of those names (a page on another site "
                "cannot reach a server without a login)"))
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if unqueued := UNQUEUED.match(path):
            name = unqueued.group("name")
            return await _refuse(scope, send, 404, (
                f"{path} is not part of this API: POST to /gradio_api/call/{name} and read "
                f"/gradio_api/call/{name}/<event_id> (see README), or use gradio_client"))
        if LOGIN.match(path) and scope.get("method") == "POST":
            return await self._login(scope, receive, send)
        if UPLOAD.match(path):  # Gradio caps uploads itself (max_file_size)
            return await self.app(scope, receive, send)
        call = CALL.match(path)
        if call and scope.get("method") == "POST" and call.group("name") in self.endpoints:
            return await self._call(scope, receive, send, headers, call.group("name"))
        return await self._capped(scope, receive, send, headers)

    async def _call(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str],
                    name: str) -> None:
        """Read the whole (capped) body, check the arguments' count, fill trailing defaults,
        and hand Gradio the body it expects."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_bytes:
            await _drain(receive)
            return await _refuse(scope, send, 413, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.body_bytes:
                if message.get("more_body"):
                    await _drain(receive)
                return await _refuse(scope, send, 413, self._too_large(size, streamed=True))
            if not message.get("more_body"):
                break
        params = self.endpoints[name]
        names = ", ".join(p for p, _ in params)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return await _refuse(scope, send, 422, (
                f"send a JSON object {{\"data\": [...]}} holding /{name}'s parameters in "
                f"order: {names}"))
        data = body["data"]
        required = sum(default is NO_DEFAULT for _, default in params)
        if not required <= len(data) <= len(params):
            needed = [p for p, default in params if default is NO_DEFAULT]
            return await _refuse(scope, send, 422, (
                f"/{name} takes {required}..{len(params)} values in data, in order: {names} "
                f"({', '.join(needed)} required); got {len(data)}"))
        body["data"] = data + [default for _, default in params[len(data):]]
        raw = json.dumps(body).encode()
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", [])
                                     if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(raw)).encode())])
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)

    async def _capped(self, scope: Scope, receive: Receive, send: Send,
                      headers: dict[str, str]) -> None:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.body_bytes:
            await _drain(receive)
            return await _refuse(scope, send, 413, self._too_large(int(declared)))
        seen = 0
        refused = False

        async def counted() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.body_bytes and not refused:
                    refused = True
                    await _refuse(scope, send, 413, self._too_large(seen, streamed=True))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:  # the app's answer to a body cut short is not sent
                await send(message)

        await self.app(scope, counted, guarded_send)

    def _too_large(self, size: int, streamed: bool = False) -> str:
        said = f"more than {size:,}" if streamed else f"{size:,}"
        return (f"the request body is {said} bytes; this server takes at most "
                f"{self.body_bytes:,} (PREFIXLAB_MAX_BODY_MB): send fewer or shorter texts, "
                "or upload a file")

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_s(address)
        if wait > 0:
            return await _refuse(scope, send, 429, (
                f"too many wrong passwords from {address}; try again in {wait:.0f} s"),
                retry_after=wait)

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.throttle.failed(address)
            await send(message)

        await self.app(scope, receive, watched)


DRAIN_BYTES = 256 * 2**20


async def _drain(receive: Receive) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES), so the client, still
    sending, reads the refusal instead of a reset connection."""
    dropped = 0
    while dropped < DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _refuse(scope: Scope, send: Send, status: int, message: str,
                  retry_after: float | None = None) -> None:
    """Answer with `status` and {"error": message} (a websocket is closed instead)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(int(retry_after) + 1).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

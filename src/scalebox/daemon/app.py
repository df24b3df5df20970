"""The FastAPI application: routes of the API contract over a VM service.

Every error leaves as ``{"error": "..."}`` with its status: domain errors
(ApiError), unknown routes and methods, validation errors (400, naming the
field), oversized bodies (413) and unexpected failures (500, details only in
the log). Requests are checked in this order: auth, body size, body shape;
only a request that passed all three reaches the VM service, so bad input
changes nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import scalebox
from scalebox import names
from scalebox.config import ServerConfig
from scalebox.daemon.auth import check_bearer
from scalebox.daemon.errors import ApiError, InvalidInput, Unavailable

MAX_BODY_BYTES = 64 * 1024
PUBLIC_PATHS = frozenset({"/health", "/info", "/caddy/check", "/openapi.json"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TemplateLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def size_bytes(self) -> int: ...
    @property
    def created_at(self) -> Any: ...
    @property
    def protected(self) -> bool: ...


class VMLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def name(self) -> str: ...
    def to_api(self, host_ip: str, vm_domain: str) -> dict[str, Any]: ...


class VMServiceLike(Protocol):
    """What the API needs from the VM domain (scalebox.daemon.vms.service.VMService)."""

    def info(self) -> dict[str, Any]: ...
    def list_templates(self) -> Sequence[TemplateLike]: ...
    def delete_template(self, name: str) -> None: ...
    def list_vms(self) -> Sequence[VMLike]: ...
    def has_vm_named(self, name: str) -> bool: ...
    def get_vm(self, id_or_name: str) -> VMLike: ...
    def create_vm(
        self,
        *,
        template: str,
        ssh_public_key: str,
        name: str | None = None,
        vcpu_count: int | None = None,
        mem_size_mib: int | None = None,
        disk_size_gib: int | None = None,
    ) -> VMLike: ...
    def delete_vm(self, id_or_name: str) -> None: ...
    def snapshot_vm(self, id_or_name: str, template_name: str) -> tuple[TemplateLike, VMLike]: ...


def _valid(problem: str | None, value: str) -> str:
    if problem is not None:
        raise ValueError(problem)
    return value


def _whole_number(value: object) -> object:
    """2.0 is 2: in JSON, and to the old daemon (JavaScript has one number type), they are
    the same, and clients that compute sizes send 2.0. 2.5, "2" and true stay refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class CreateVMBody(BaseModel):
    # strict: "2" is not 2 and true is not 1; a client sending the wrong type gets a 400.
    model_config = ConfigDict(strict=True)

    template: str = Field(max_length=names.MAX_TEMPLATE_NAME_LEN)
    ssh_public_key: str = Field(min_length=1, max_length=16 * 1024)
    name: str | None = Field(default=None, max_length=names.MAX_VM_NAME_LEN)
    vcpu_count: WholeNumber | None = Field(default=None, ge=1, le=256)
    mem_size_mib: WholeNumber | None = Field(default=None, ge=64, le=1048576)
    disk_size_gib: WholeNumber | None = Field(default=None, ge=1, le=65536)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return _valid(names.template_name_problem(value), value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _valid(names.vm_name_problem(value), value)

    @field_validator("ssh_public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        # One key or several, one per line (LF or CRLF); the VM service checks each.
        if "\0" in value:
            raise ValueError("expected text such as 'ssh-ed25519 AAAA... user@host'")
        return value.strip()


class SnapshotBody(BaseModel):
    model_config = ConfigDict(strict=True)

    template_name: str = Field(max_length=names.MAX_TEMPLATE_NAME_LEN)

    @field_validator("template_name")
    @classmethod
    def _template_name(cls, value: str) -> str:
        return _valid(names.template_name_problem(value), value)


def _timestamp(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def template_json(template: TemplateLike) -> dict[str, Any]:
    return {
        "name": template.name,
        "size_bytes": template.size_bytes,
        "created_at": _timestamp(template.created_at),
        "protected": template.protected,
    }


def _error(status: int, what: str, hint: str | None = None) -> JSONResponse:
    body = {"error": what} if hint is None else {"error": what, "hint": hint}
    return JSONResponse(body, status_code=status)


def _api_error_response(exc: ApiError) -> JSONResponse:
    answer = _error(exc.status, exc.what, exc.hint)
    if isinstance(exc, Unavailable):  # retryable: say when
        answer.headers["Retry-After"] = str(exc.retry_after)
    return answer


def _os_error_response(exc: OSError, log: logging.Logger) -> JSONResponse:
    """A file the daemon could not write: a full or read-only disk said as such.

    The answer names the cause, not the server's paths; the log names both.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.warning("answered 507: %s", exc)
        return _error(
            507,
            f"the server's disk is full ({reason}); nothing was changed",
            "delete VMs or templates you no longer need, or ask the server's operator to "
            "free disk space",
        )
    if exc.errno == errno.EROFS:
        log.error("answered 500: %s", exc)
        return _error(
            500,
            f"the server's data directory is read-only ({reason}); nothing was changed",
            "ask the server's operator to check its disk (dmesg) and remount it read-write",
        )
    log.error("answered 500: %s", exc, exc_info=exc)
    return _error(
        500,
        f"the server could not read or write a file ({reason})",
        "see the scaleboxd log (journalctl -u scaleboxd)",
    )


def validation_message(errors: Sequence[Any]) -> str:
    """One line naming the first bad field, e.g. 'vcpu_count: Input should be a valid integer'."""
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"body: invalid JSON ({detail})" if detail else "body: invalid JSON"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        message = "field required"
    if not loc or all(part.isdigit() for part in loc):
        if kind == "missing":
            return "body: missing; send a JSON object with Content-Type: application/json"
        if kind in {"model_attributes_type", "dict_type", "model_type"}:
            return "body: expected a JSON object (send Content-Type: application/json)"
        return f"body: {message}"
    return f"{'.'.join(loc)}: {message}"


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
READ = ["GET", "HEAD"]  # the methods of a route that reads


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route takes at the request's path (for a 405's Allow header).

    Starlette's own header names only the first route that matched (GET /vms, not
    POST /vms), so each method is asked of the routes, through their public matches().
    """
    routes = request.app.router.routes

    def taken(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] is Match.FULL for route in routes)

    return [method for method in _METHODS if taken(method)]


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class AuthMiddleware:
    """Checks the bearer token before anything else, so an anonymous request
    never gets its body parsed or learns of a VM or template. PUBLIC_PATHS are
    answered to anyone: /health, /info, /caddy/check, and the OpenAPI document,
    which does say which routes exist."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            check_bearer(header, self.token)
        except ApiError as exc:
            # A 401 names the scheme it wants (RFC 9110 asks for it; some clients read it).
            challenge = ((b"www-authenticate", b"Bearer"),) if exc.status == 401 else ()
            await _send_json(send, exc.status, {"error": exc.what}, challenge)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body up to ``limit`` bytes and answers 413 beyond it."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = {"error": f"request body is larger than {self.limit} bytes"}
        for key, value in scope.get("headers", []):
            if key == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _send_json(send, 413, too_large)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await _send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


MAX_LOGGED_PATH = 200  # characters of a request's path in the access log


def logged_path(scope: Scope) -> str:
    """The path as the client sent it (still percent-encoded), cut short: a path
    with an encoded newline or escape sequence cannot forge a line of the log."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        path = raw.decode("ascii", "backslashreplace")
    else:
        path = str(scope.get("path", "-")).encode("unicode_escape").decode("ascii")
    path = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in path)
    if len(path) > MAX_LOGGED_PATH:
        path = path[:MAX_LOGGED_PATH] + "..."
    return path


class AccessLogMiddleware:
    """One log line per request: method, path (no query, no headers), status, time."""

    def __init__(self, app: ASGIApp, log: logging.Logger) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            self.log.info(
                "%s %s %s %d %.0fms",
                client[0],
                scope.get("method", "-"),
                logged_path(scope),
                status or 500,
                (time.monotonic() - started) * 1000,
            )


def create_app(config: ServerConfig, service: VMServiceLike, log: logging.Logger) -> FastAPI:
    """The API over ``service``; ``config`` gives the token, HOST_IP and VM_DOMAIN."""
    app = FastAPI(
        title="scaleboxd",
        version=scalebox.__version__,
        description="Sandbox VMs for AI agents and CI jobs.",
        docs_url=None,
        # No redirect from /vms/ to /vms: its Location is built from the request's Host
        # header, so a forged Host was sent back, and it said http:// behind TLS.
        redirect_slashes=False,
        redoc_url=None,
        # FastAPI's own OpenTelemetry (since 0.165): off, so that no environment
        # (FASTAPI_OTEL_AUTO_CONFIGURE, a provider set up by some import) makes the
        # daemon export requests, their bodies or errors anywhere; and a request
        # skips the check whether it should.
        telemetry={
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        },
    )
    # Creates, deletes and snapshots are serialised by the VM service itself.

    def vm_json(vm: VMLike) -> dict[str, Any]:
        return vm.to_api(config.host_ip, config.vm_domain)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return _error(404, f"no such route: {request.method} {request.url.path}")
        if exc.status_code == 405:
            answer = _error(405, f"method {request.method} is not allowed on {request.url.path}")
            answer.headers["Allow"] = ", ".join(_allowed_methods(request))
            return answer
        if exc.status_code == 400:  # FastAPI's answer to a body json.loads refused
            return _error(400, "body: could not be parsed as JSON")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(OSError)
    async def _os_error(_request: Request, exc: OSError) -> JSONResponse:
        return _os_error_response(exc, log)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, _exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer and uvicorn logs the traceback
        # once; logging it here too would print it twice.
        return _error(500, "internal server error; see the scaleboxd log (journalctl -u scaleboxd)")

    # On the event loop, not in a worker thread as the handlers that touch VMs: the
    # updater's stability window and load balancers ask it, and it must answer while
    # slow VM requests hold every worker (anyio's 40). Half the CPU of an answer, too.
    # HEAD too, on every GET route (HTTP asks it of every server): load balancers that
    # check with HEAD got a 405. The server sends HEAD's answer without its body.
    @app.api_route("/health", methods=READ)
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": scalebox.__version__}

    @app.api_route("/info", methods=READ)
    def info() -> dict[str, Any]:
        return service.info()

    @app.api_route("/caddy/check", methods=READ, response_class=Response)
    def caddy_check(domain: str = "") -> Response:
        # Host names are told apart regardless of case, and may end in a dot; VM names
        # too. Only the VM list in memory is asked: anyone may call this.
        suffix = f".{config.vm_domain.lower()}"
        domain = domain.lower().removesuffix(".")
        if config.vm_domain and domain.endswith(suffix):
            name = domain.removesuffix(suffix)
            if service.has_vm_named(name):
                return Response(status_code=200)
        return Response(status_code=404)

    # The token is checked by AuthMiddleware; this dependency only documents
    # the scheme in the OpenAPI document.
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API_TOKEN>")
    api = APIRouter(dependencies=[Security(bearer)])

    @api.api_route("/templates", methods=READ)
    def list_templates() -> dict[str, Any]:
        return {"templates": [template_json(t) for t in service.list_templates()]}

    @api.delete("/templates/{name:path}", status_code=204, response_class=Response)
    def delete_template(name: str) -> Response:
        if (problem := names.template_name_problem(name)) is not None:
            raise InvalidInput(problem)
        service.delete_template(name)
        log.info("deleted template %s", name)
        return Response(status_code=204)

    @api.api_route("/vms", methods=READ)
    def list_vms() -> dict[str, Any]:
        return {"vms": [vm_json(vm) for vm in service.list_vms()]}

    @api.post("/vms", status_code=201)
    def create_vm(body: CreateVMBody) -> dict[str, Any]:
        vm = service.create_vm(
            template=body.template,
            ssh_public_key=body.ssh_public_key,
            name=body.name,
            vcpu_count=body.vcpu_count,
            mem_size_mib=body.mem_size_mib,
            disk_size_gib=body.disk_size_gib,
        )
        log.info("created VM %s (%s) from template %s", vm.id, vm.name, body.template)
        return vm_json(vm)

    @api.post("/vms/{ref:path}/snapshot", status_code=201)
    def snapshot_vm(ref: str, body: SnapshotBody) -> dict[str, Any]:
        _check_ref(ref)
        template, vm = service.snapshot_vm(ref, body.template_name)
        log.info("snapshot of VM %s saved as template %s", vm.id, template.name)
        return {
            "template": template.name,
            "source_vm": vm.id,
            "size_bytes": template.size_bytes,
            "created_at": _timestamp(template.created_at),
        }

    @api.api_route("/vms/{ref:path}", methods=READ)
    def get_vm(ref: str) -> dict[str, Any]:
        _check_ref(ref)
        return vm_json(service.get_vm(ref))

    @api.delete("/vms/{ref:path}", status_code=204, response_class=Response)
    def delete_vm(ref: str) -> Response:
        _check_ref(ref)
        service.delete_vm(ref)
        log.info("deleted VM %s", ref)
        return Response(status_code=204)

    app.include_router(api)
    # Outermost first at request time: log, then auth, then body size.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(AuthMiddleware, token=config.api_token)
    app.add_middleware(AccessLogMiddleware, log=log)
    return app


def _check_ref(ref: str) -> None:
    if (problem := names.vm_ref_problem(ref)) is not None:
        raise InvalidInput(problem)

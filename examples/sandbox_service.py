"""A small HTTP service that hands out sandboxes from a warm pool: vmctl inside an event loop it
does not own (Starlette on uvicorn).

    POST   /sandboxes                      -> {"id": ...}     a fresh sandbox from the pool
    POST   /sandboxes/{id}/exec            {"argv": [...], "stdin": "...", "timeout": 30}
                                           -> {"exit_code", "stdout", "stderr", "timed_out"}
    PUT    /sandboxes/{id}/files/{path}    body: the file's bytes (header x-mode: 0644 in octal)
    GET    /sandboxes/{id}/files/{path}    -> the file's bytes
    DELETE /sandboxes/{id}                 the sandbox is destroyed (never handed out again)
    GET    /health                         -> the pool's counts

Each handed-out sandbox is held by one task in the service's task group (the pool's ``acquire``
block stays in the task that entered it); DELETE, an idle limit or the service's shutdown ends
that task, which gives the sandbox back to be destroyed. Run it with::

    pip install 'vmctl[service]'
    python examples/sandbox_service.py --port 8000 --pool 2
"""

from __future__ import annotations

import argparse
import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vmctl import GuestError, Sandbox, SandboxConfig, SandboxPool, VmctlError, guest

IDLE_LIMIT = 600.0  # seconds a sandbox may sit unused before the service takes it back


@dataclass
class Lease:
    sandbox: Sandbox
    done: anyio.Event = field(default_factory=anyio.Event)
    last_used: float = field(default_factory=anyio.current_time)


class Service:
    """The pool and the leases of one running service."""

    def __init__(self, pool: SandboxPool, tg: TaskGroup, idle_limit: float) -> None:
        self.pool = pool
        self.leases: dict[str, Lease] = {}
        self._tg = tg
        self._idle_limit = idle_limit

    async def create(self) -> str:
        """Acquire a sandbox in a task of its own, which holds it until the lease ends."""
        lease_id = secrets.token_hex(6)
        ready: anyio.Event = anyio.Event()
        failure: list[BaseException] = []

        async def hold() -> None:
            try:
                async with self.pool.acquire(timeout=60) as sb:
                    lease = self.leases[lease_id] = Lease(sb)
                    ready.set()
                    while not lease.done.is_set():
                        with anyio.move_on_after(self._idle_limit):
                            await lease.done.wait()
                        if anyio.current_time() - lease.last_used >= self._idle_limit:
                            break
            except VmctlError as exc:
                failure.append(exc)
            finally:
                self.leases.pop(lease_id, None)
                ready.set()

        self._tg.start_soon(hold)
        await ready.wait()
        if failure:
            raise failure[0]
        return lease_id

    def get(self, lease_id: str) -> Lease | None:
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.last_used = anyio.current_time()
        return lease

    def delete(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)  # gone for callers now; its task destroys it
        if lease is None:
            return False
        lease.done.set()
        return True


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _lease(request: Request) -> Lease | None:
    return _service(request).get(request.path_params["id"])


def _not_found() -> JSONResponse:
    return JSONResponse({"error": "no such sandbox"}, status_code=404)


async def create_sandbox(request: Request) -> JSONResponse:
    try:
        lease_id = await _service(request).create()
    except VmctlError as exc:  # the pool had none ready in time (PoolTimeout), or it is closing
        return JSONResponse({"error": str(exc)}, status_code=503)
    return JSONResponse({"id": lease_id}, status_code=201)


async def run_command(request: Request) -> JSONResponse:
    lease = _lease(request)
    if lease is None:
        return _not_found()
    body = await request.json()
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return JSONResponse({"error": "argv: a non-empty list of strings"}, status_code=400)
    try:
        result = await lease.sandbox.exec(argv, stdin=str(body.get("stdin", "")), timeout=body.get("timeout", 30))
    except VmctlError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return JSONResponse({"exit_code": result.exit_code, "timed_out": result.timed_out,
                         "stdout": result.stdout.decode(errors="replace"),
                         "stderr": result.stderr.decode(errors="replace"),
                         "stdout_b64": base64.b64encode(result.stdout).decode()})  # fmt: skip


async def put_file(request: Request) -> Response:
    lease = _lease(request)
    if lease is None:
        return _not_found()
    try:
        mode = int(request.headers.get("x-mode", "644"), 8)
    except ValueError:
        return JSONResponse({"error": "x-mode: an octal file mode like 0644"}, status_code=400)
    try:
        await lease.sandbox.write_file("/" + request.path_params["path"], await request.body(), mode=mode)
    except GuestError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return Response(status_code=204)


async def get_file(request: Request) -> Response:
    lease = _lease(request)
    if lease is None:
        return _not_found()
    try:
        data = await lease.sandbox.read_file("/" + request.path_params["path"])
    except GuestError as exc:
        return JSONResponse({"error": str(exc)}, status_code=404)
    return Response(data, media_type="application/octet-stream")


async def delete_sandbox(request: Request) -> Response:
    return Response(status_code=204 if _service(request).delete(request.path_params["id"]) else 404)


async def health(request: Request) -> JSONResponse:
    stats = _service(request).pool.stats()
    return JSONResponse({"ready": stats.ready, "in_use": stats.in_use, "starting": stats.starting,
                         "leases": len(_service(request).leases)})  # fmt: skip


def create_app(config: SandboxConfig, *, pool_size: int = 2, idle_limit: float = IDLE_LIMIT) -> Starlette:
    """The service for sandboxes of ``config``; its pool lives as long as the app (its lifespan)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with SandboxPool(config, size=pool_size) as pool, anyio.create_task_group() as tg:
            app.state.service = Service(pool, tg, idle_limit)
            yield
            for lease in list(app.state.service.leases.values()):
                lease.done.set()

    routes = [
        Route("/sandboxes", create_sandbox, methods=["POST"]),
        Route("/sandboxes/{id}", delete_sandbox, methods=["DELETE"]),
        Route("/sandboxes/{id}/exec", run_command, methods=["POST"]),
        Route("/sandboxes/{id}/files/{path:path}", put_file, methods=["PUT"]),
        Route("/sandboxes/{id}/files/{path:path}", get_file, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--pool", type=int, default=2, help="sandboxes kept ready")
    args = parser.parse_args()
    assets = anyio.run(guest.ensure_default_assets)
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, memory_mib=256)
    uvicorn.run(create_app(config, pool_size=args.pool), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

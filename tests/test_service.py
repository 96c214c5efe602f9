"""examples/sandbox_service.py driven by a real HTTP client over loopback, with real guests: vmctl
living in an event loop it does not own (uvicorn's), sandboxes handed out from a warm pool."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
import pytest
import uvicorn

from vmctl import SandboxConfig

pytestmark = pytest.mark.qemu

EXAMPLE = Path(__file__).parent.parent / "examples" / "sandbox_service.py"


def load_example():  # noqa: ANN201 - a module loaded from a file
    spec = importlib.util.spec_from_file_location("sandbox_service", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_service"] = module
    spec.loader.exec_module(module)
    return module


async def test_service_hands_out_sandboxes_runs_commands_and_moves_files(make_config: Callable[..., SandboxConfig]) -> None:
    app = load_example().create_app(make_config(), pool_size=1)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))  # loopback only, a free port
    listener.listen()  # requests wait in the backlog until the service (and its pool) has started
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [listener])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
            created = await http.post("/sandboxes")
            assert created.status_code == 201, created.text
            first = created.json()["id"]

            put = await http.put(f"/sandboxes/{first}/files/root/job.sh", content=b"echo hello from $(hostname)\n",
                                 headers={"x-mode": "755"})  # fmt: skip
            assert put.status_code == 204, put.text
            ran = await http.post(f"/sandboxes/{first}/exec", json={"argv": ["/root/job.sh"]})
            assert ran.json()["exit_code"] == 0 and ran.json()["stdout"] == "hello from vmctl\n"
            wrote = await http.post(f"/sandboxes/{first}/exec",
                                    json={"argv": ["sh", "-c", "ls -l /root/job.sh > /root/out.txt"]})  # fmt: skip
            assert wrote.json()["exit_code"] == 0
            got = await http.get(f"/sandboxes/{first}/files/root/out.txt")
            assert got.status_code == 200 and got.content.startswith(b"-rwxr-xr-x")
            missing = await http.get(f"/sandboxes/{first}/files/root/nothing-here")
            assert missing.status_code == 404 and "No such file" in missing.json()["error"]

            second = (await http.post("/sandboxes")).json()["id"]  # another one, from the refilled pool
            assert second != first
            other = await http.post(f"/sandboxes/{second}/exec", json={"argv": ["ls", "/root"]})
            assert other.json()["stdout"] == "", "a sandbox is never handed to a second user"

            assert (await http.delete(f"/sandboxes/{first}")).status_code == 204
            gone = await http.post(f"/sandboxes/{first}/exec", json={"argv": ["true"]})
            assert gone.status_code == 404
            health = (await http.get("/health")).json()
            assert health["leases"] == 1
        server.should_exit = True

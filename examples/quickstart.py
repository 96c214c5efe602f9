"""The first thing to try: boot one sandbox, run a command in it, pause, resume, tear down."""

import anyio

from vmctl import Sandbox, SandboxConfig, SandboxState, guest


async def main() -> None:
    assets = await guest.ensure_default_assets()  # builds once, then reuses a cache
    config = SandboxConfig(kernel=assets.kernel, initrd=assets.initrd, vcpus=1, memory_mib=256)
    async with Sandbox(config) as sb:  # create + start; returns when the guest is ready
        assert sb.state is SandboxState.RUNNING
        result = await sb.exec(["cat", "/proc/version"])  # runs in the guest
        print(f"exit={result.exit_code} stdout={result.stdout.decode().strip()!r}")
        await sb.pause()
        assert sb.state is SandboxState.PAUSED
        await sb.resume()
        assert sb.state is SandboxState.RUNNING
    # leaving the block stopped QEMU and removed everything vmctl created
    print(f"final state: {sb.state}")


if __name__ == "__main__":
    anyio.run(main)

"""What the guest's answers become on the host: command results and the parsed replies of the
agent's queries. Every parser takes untrusted text from the guest: it skips what it cannot read
or refuses an impossible value with :class:`~vmctl.errors.GuestError`, never another exception."""

from __future__ import annotations

from dataclasses import dataclass

from vmctl.errors import GuestCommandFailed, GuestError


@dataclass(frozen=True)
class ExecResult:
    """What a command run in the guest produced."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    duration: float = 0.0

    @property
    def returncode(self) -> int:
        """Alias of ``exit_code``, as in :mod:`subprocess`."""
        return self.exit_code

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode(errors="replace")

    def check(self) -> ExecResult:
        """Return self if the command succeeded, else raise :class:`GuestCommandFailed`."""
        if not self.ok:
            raise GuestCommandFailed(self)
        return self


@dataclass(frozen=True)
class GuestBlockDevice:
    name: str
    size_bytes: int
    serial: str = ""

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


@dataclass(frozen=True)
class GuestMemory:
    total_kib: int
    free_kib: int
    available_kib: int

    @property
    def total_mib(self) -> int:
        return self.total_kib // 1024


def parse_block_devices(text: str) -> list[GuestBlockDevice]:
    out = []
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        sectors, _, serial = rest.partition(" ")
        if name and sectors.isascii() and sectors.isdigit():
            out.append(GuestBlockDevice(name, int(sectors) * 512, serial.strip()))
    return out


MAX_CPUS = 1 << 16


def parse_cpu_list(text: str) -> list[int]:
    """``0-2,4`` -> ``[0, 1, 2, 4]`` (the kernel's cpulist format); :class:`GuestError` if the
    guest sent something else (or more CPUs than any kernel has)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise GuestError(f"guest sent a malformed CPU list: {text[:100]!r}") from None
        if not 0 <= low <= high < MAX_CPUS or len(cpus) + high - low >= MAX_CPUS:
            raise GuestError(f"guest sent an impossible CPU list: {text[:100]!r}")
        cpus.extend(range(low, high + 1))
    return cpus


def parse_memory(text: str) -> GuestMemory:
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isascii() and fields[0].isdigit():
            values[key.strip()] = int(fields[0])
    try:
        return GuestMemory(values["MemTotal"], values["MemFree"], values["MemAvailable"])
    except KeyError as exc:
        raise GuestError(f"guest meminfo lacks {exc}") from None

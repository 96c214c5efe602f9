"""The KVM verdict cache: ``accel="auto"`` probes KVM by booting a guest kernel (up to 15 s where
KVM hangs), once per host, QEMU and probing kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl import host


async def test_two_guest_kernels_are_probed_once_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host that starts guests with two kernels (two guest builds, an old and a new vmctl)
    used to keep one verdict: each switch of kernel re-probed, and that sandbox's start took
    15 s longer. Each kernel's verdict is kept now."""
    monkeypatch.setenv("VMCTL_CACHE_DIR", str(tmp_path / "cache"))
    probed: list[Path] = []

    async def probe(qemu: Path, kernel: Path, timeout: float, key: str) -> host.KvmVerdict:
        probed.append(kernel)
        return host.KvmVerdict(False, "a guest kernel did not boot under KVM", 0.0, key)

    monkeypatch.setattr(host, "_boot_probe", probe)
    monkeypatch.setattr(host, "kvm_device_usable", lambda: True)
    qemu = host.find_qemu(None)
    kernels = [tmp_path / "vmlinux-a", tmp_path / "vmlinux-b"]
    kernels[0].write_bytes(b"a")
    kernels[1].write_bytes(b"bb")
    for kernel in [*kernels, *kernels, kernels[0]]:
        verdict = await host.kvm_boots_guests(qemu, kernel)
        assert not verdict.usable
    assert probed == kernels


async def test_a_verdict_file_from_before_is_still_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file held one verdict (an object) before it held several (a list)."""
    monkeypatch.setenv("VMCTL_CACHE_DIR", str(tmp_path / "cache"))
    verdict = host.KvmVerdict(False, "no", 1.0, "k1")
    host._write_verdict(verdict)
    path = host._verdict_file()
    path.write_text(path.read_text()[1:-1])  # the single object, as an older vmctl wrote it
    assert host._read_verdict("k1") == verdict
    path.write_text("not json")
    assert host._read_verdict("k1") is None

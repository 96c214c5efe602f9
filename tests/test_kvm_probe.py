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


def test_the_cache_keeps_the_newest_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCTL_CACHE_DIR", str(tmp_path / "cache"))
    for n in range(host.VERDICTS_KEPT + 4):
        host._write_verdict(host.KvmVerdict(False, "no", float(n), f"k{n}"))
    assert len(list(host._verdict_dir().iterdir())) == host.VERDICTS_KEPT
    assert host._read_verdict(f"k{host.VERDICTS_KEPT + 3}") is not None
    assert host._read_verdict("k0") is None

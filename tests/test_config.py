"""Every ConfigError rule, TOML loading, custom assets, and what each field puts on QEMU's command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmctl import ConfigError, Param, SandboxConfig
from vmctl import host as host_probes
from vmctl.hypervisors.base import RunPaths
from vmctl.hypervisors.cmdline import build_command, kernel_cmdline


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("kernel", "initrd", "image", "firmware", "state"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"x" * 512)
    return out


def cfg(files: dict[str, Path], **kw: object) -> SandboxConfig:
    values: dict[str, object] = {"kernel": files["kernel"], "initrd": files["initrd"], "memory_mib": 256}
    values.update(kw)
    return SandboxConfig(**values)  # type: ignore[arg-type]


def problems(files: dict[str, Path], **kw: object) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        cfg(files, **kw)
    return {p.field: p.message for p in info.value.problems}


def test_defaults_follow_the_original(files: dict[str, Path]) -> None:
    c = SandboxConfig(kernel=files["kernel"], initrd=files["initrd"])
    assert (c.vcpus, c.memory_mib, c.pci_bridges, c.block_driver, c.machine) == (1, 2048, 1, "virtio-scsi", "q35")
    assert c.accel == "auto"
    here = c.for_host()
    assert here.max_vcpus == max(host_probes.cpu_count(), 1)
    assert here.max_memory_mib == host_probes.total_memory_mib()


def test_a_config_carries_no_figures_of_the_host_it_was_built_on(files: dict[str, Path], monkeypatch) -> None:
    """Built on a Ray driver, run on a node: the limits left unset are the node's, not the driver's."""
    c = SandboxConfig(kernel=files["kernel"], initrd=files["initrd"], vcpus=2)
    assert (c.max_vcpus, c.max_memory_mib) == (None, None)
    assert "max_vcpus" not in c.to_mapping() and "max_memory_mib" not in c.to_mapping()
    monkeypatch.setattr(host_probes, "cpu_count", lambda: 6)
    monkeypatch.setattr(host_probes, "total_memory_mib", lambda: 9000)
    node = SandboxConfig.from_mapping(c.to_mapping()).for_host()
    assert (node.max_vcpus, node.max_memory_mib) == (6, 9000)
    assert c.for_host({"max_vcpus": 3, "max_memory_mib": 4096}).max_vcpus == 3  # a template's own figures win
    assert cfg(files, max_vcpus=4).for_host().max_vcpus == 4  # what the user set stays


def test_kernel_required_and_must_exist(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SandboxConfig(kernel=None, initrd=files["initrd"])  # type: ignore[arg-type]
    assert "kernel" in info.value.fields
    assert "does not exist" in problems(files, kernel=tmp_path / "nope")["kernel"]


def test_image_or_initrd_not_both_not_neither(files: dict[str, Path]) -> None:
    assert "not both" in problems(files, image=files["image"])["image"]
    assert "initrd" in problems(files, initrd=None)
    SandboxConfig(kernel=files["kernel"], image=files["image"])  # image alone is fine


def test_every_problem_is_reported_at_once(files: dict[str, Path]) -> None:
    found = problems(files, vcpus=0, memory_mib=1, accel="hvf", machine="virt", pci_bridges=99)
    assert {"vcpus", "memory_mib", "accel", "machine", "pci_bridges"} <= set(found)


def test_vcpus_against_max_vcpus(files: dict[str, Path]) -> None:
    assert "max_vcpus" in problems(files, vcpus=4, max_vcpus=2)["vcpus"]
    assert "at most" in problems(files, max_vcpus=1000)["max_vcpus"]


def test_memory_sane_against_host(files: dict[str, Path]) -> None:
    host_mib = host_probes.total_memory_mib()
    assert "host has" in problems(files, memory_mib=host_mib + 1024)["memory_mib"]
    assert "at least" in problems(files, memory_mib=16)["memory_mib"]
    assert "less than" in problems(files, max_memory_mib=128)["max_memory_mib"]


def test_types_are_checked(files: dict[str, Path]) -> None:
    found = problems(files, vcpus="two", debug="yes")
    assert "integer" in found["vcpus"] and "true or false" in found["debug"]


def test_template_rules(files: dict[str, Path], tmp_path: Path) -> None:
    found = problems(files, boot_to_be_template=True, boot_from_template=True)
    assert "exclusive" in found["boot_from_template"] and "memory_path" in found
    found = problems(files, boot_from_template=True, memory_path=files["state"])
    assert "devices_state_path" in found
    found = problems(files, boot_from_template=True, memory_path=tmp_path / "gone", devices_state_path=files["state"])
    assert "does not exist" in found["memory_path"]
    cfg(files, boot_to_be_template=True, memory_path=tmp_path / "mem", devices_state_path=tmp_path / "dev")


def test_cache_flags_need_cache_set(files: dict[str, Path]) -> None:
    assert "block_cache_set" in problems(files, block_cache_direct=True)


def test_block_rules(files: dict[str, Path]) -> None:
    assert "microvm" in problems(files, block_driver="virtio-mmio")["block_driver"]
    assert "microvm" in problems(files, machine="microvm", block_driver="virtio-blk")["block_driver"]
    assert cfg(files, machine="microvm").block_driver == "virtio-mmio"
    assert "one of" in problems(files, block_driver="ide")["block_driver"]
    found = problems(files, initrd=None, image=files["image"], disable_block_devices=True)
    assert "disable_block_devices" in found


def test_host_feature_rules(files: dict[str, Path], tmp_path: Path) -> None:
    if not Path("/dev/vhost-vsock").exists():
        assert "vhost_vsock" in problems(files, vsock=True)["vsock"]
    if host_probes.hugepages_total() == 0:
        assert "nr_hugepages" in problems(files, huge_pages=True)["huge_pages"]
    assert "does not exist" in problems(files, entropy_source=tmp_path / "nope")["entropy_source"]


def test_kernel_params_validation_and_forms(files: dict[str, Path]) -> None:
    assert cfg(files, kernel_params={"a": "1", "ro": None}).kernel_params == (Param("a", "1"), Param("ro", ""))
    assert cfg(files, kernel_params=["a=1", "quiet"]).kernel_params == (Param("a", "1"), Param("quiet", ""))
    found = problems(files, kernel_params=["init=/bin/sh; reboot"])
    assert any("spaces" in m for m in found.values())
    found = problems(files, kernel_params=[("bad key", "1")])
    assert any("letters" in m for m in found.values())
    assert "kernel_params" in problems(files, kernel_params="a=1")


def test_hypervisor_params_cannot_take_over_managed_options(files: dict[str, Path]) -> None:
    assert "not allowed" in problems(files, hypervisor_params={"qmp": "tcp:0:4444"})["hypervisor_params[0]"]
    for risky in ("parallel", "trace", "readconfig", "drive", "virtfs", "gdb", "vnc", "action", "device"):
        assert "not allowed" in problems(files, hypervisor_params={risky: "x"})["hypervisor_params[0]"]
    assert "option name" in problems(files, hypervisor_params={"-rtc": "x"})["hypervisor_params[0]"]
    assert "start with '-'" in problems(files, hypervisor_params={"rtc": "-x"})["hypervisor_params[0]"]
    assert cfg(files, hypervisor_params={"rtc": "base=utc"}).qemu_extra_args() == ["-rtc", "base=utc"]


def test_machine_accelerators_and_guest_hooks_are_checked(files: dict[str, Path]) -> None:
    config = cfg(files, machine_accelerators="usb=off, nvdimm")
    assert config.machine_accelerators == ("usb=off", "nvdimm=on")
    assert SandboxConfig.from_mapping(config.to_mapping()) == config
    found = problems(files, machine_accelerators=["acpi=off", "usb=maybe", "memory-backend=x"])
    assert set(found) == {"machine_accelerators[0]", "machine_accelerators[1]", "machine_accelerators[2]"}
    assert "not allowed" in found["machine_accelerators[0]"] and "on or off" in found["machine_accelerators[1]"]
    assert cfg(files, machine="microvm", machine_accelerators=("rtc=off",)).machine_accelerators == ("rtc=off",)
    for bad in ("hooks", "/etc/../hooks", "/a b"):
        assert "guest_hook_path" in problems(files, guest_hook_path=bad)
    assert "hotplug_vfio_on_root_bus" in problems(files, machine="microvm", hotplug_vfio_on_root_bus=True)
    # mistyped neighbours are reported, never a TypeError (found by tests/test_fuzz.py)
    assert "machine" in problems(files, machine=["q35"], machine_accelerators=("usb=off",))
    assert "pci_bridges" in problems(files, pci_bridges=[])


def test_accel_env_override(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMCTL_ACCEL", "tcg")
    assert cfg(files, accel="kvm").effective_accel() == "tcg"
    monkeypatch.setenv("VMCTL_ACCEL", "turbo")
    assert "VMCTL_ACCEL" in problems(files)


def test_custom_assets_take_precedence_and_must_exist(files: dict[str, Path], tmp_path: Path) -> None:
    base = cfg(files)
    other = tmp_path / "other-kernel"
    other.write_bytes(b"k")
    assert base.with_custom_assets(kernel=other).kernel == other
    swapped = base.with_custom_assets(image=files["image"])
    assert swapped.image == files["image"] and swapped.initrd is None
    with pytest.raises(ConfigError) as info:
        base.with_custom_assets(kernel=tmp_path / "missing", bogus="x")
    assert set(info.value.fields) == {"custom_assets.kernel", "custom_assets.bogus"}


def test_immutable(files: dict[str, Path]) -> None:
    c = cfg(files)
    with pytest.raises(AttributeError):
        c.vcpus = 2  # type: ignore[misc]
    assert c.replace(vcpus=2).vcpus == 2 and c.vcpus == 1


def test_toml_file_with_relative_paths(files: dict[str, Path], tmp_path: Path) -> None:
    spec = tmp_path / "sb.toml"
    spec.write_text(
        '[sandbox]\nkernel = "kernel"\ninitrd = "initrd"\nvcpus = 1\nmemory_mib = 300\n'
        'kernel_params = ["vmctl.x=1"]\n[sandbox.hypervisor_params]\nrtc = "base=utc"\n'
    )
    c = SandboxConfig.from_toml(spec)
    assert c.kernel == files["kernel"] and c.memory_mib == 300
    assert c.kernel_params == (Param("vmctl.x", "1"),) and c.hypervisor_params == (Param("rtc", "base=utc"),)


def test_toml_errors_name_the_field(tmp_path: Path, files: dict[str, Path]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[sandbox]\nkernel = "{files["kernel"]}"\ninitrd = "{files["initrd"]}"\nvcpu = 2\n')
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_toml(bad)
    assert info.value.fields == ("vcpu",)
    bad.write_text("[sandbox\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        SandboxConfig.from_toml(bad)
    bad.write_text("[other]\n")
    with pytest.raises(ConfigError, match=r"missing \[sandbox\]"):
        SandboxConfig.from_toml(bad)


# -- what each field puts on the command line -------------------------------------------------


def argv(c: SandboxConfig, tmp_path: Path) -> list[str]:
    resolved = c.replace(accel="tcg", qemu_binary=Path("/bin/true"))
    return build_command(resolved, RunPaths(tmp_path, tmp_path), "t1", {"qmp": 3, "console": 4, "agent": 5})


def opt(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_command_line_basics(files: dict[str, Path], tmp_path: Path) -> None:
    a = argv(cfg(files, vcpus=2, max_vcpus=4, memory_slots=2, max_memory_mib=1024), tmp_path)
    assert a[0] == "/bin/true" and "-S" in a and "-nodefaults" in a
    assert opt(a, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert opt(a, "-smp")[0].startswith("2,maxcpus=4")
    assert opt(a, "-m") == ["size=256M,slots=2,maxmem=1024M"]
    assert "chardev=qmp,mode=control" in opt(a, "-mon")
    assert any("fd=3" in x for x in opt(a, "-chardev"))


def test_command_line_per_field(files: dict[str, Path], tmp_path: Path) -> None:
    a = argv(
        cfg(files, pci_bridges=3, io_threads=True, mem_prealloc=True, mlock=True, firmware=files["firmware"]), tmp_path
    )
    assert sum(x.startswith("pcie-root-port") for x in opt(a, "-device")) == 3
    assert "iothread,id=iothread0" in opt(a, "-object")
    assert "virtio-scsi-pci,id=scsi0,iothread=iothread0" in opt(a, "-device")
    micro = argv(cfg(files, machine="microvm"), tmp_path)
    assert opt(micro, "-machine")[0].startswith("microvm,") and "virtio-serial-device,id=vser0" in opt(micro, "-device")
    assert not any("pci" in x for x in opt(micro, "-device"))
    assert opt(micro, "-m") == ["size=256M"], "no memory hotplug on microvm"
    assert "tsc_early_khz=" in kernel_cmdline(cfg(files, machine="microvm"))
    assert any("prealloc=on" in x for x in opt(a, "-object"))
    assert opt(a, "-overcommit") == ["mem-lock=on"] and opt(a, "-bios") == [str(files["firmware"])]
    pc = argv(cfg(files, machine="pc", pci_bridges=1), tmp_path)
    assert opt(pc, "-machine")[0].startswith("pc,") and any(x.startswith("pci-bridge") for x in opt(pc, "-device"))
    assert not any("scsi" in x for x in opt(argv(cfg(files, disable_block_devices=True), tmp_path), "-device"))


def test_image_root_with_cache_flags(files: dict[str, Path], tmp_path: Path) -> None:
    c = cfg(files, initrd=None, image=files["image"], block_driver="virtio-blk",
            block_cache_set=True, block_cache_direct=True, block_cache_noflush=False)  # fmt: skip
    a = argv(c, tmp_path)
    nodes = [json.loads(x) for x in opt(a, "-blockdev")]
    assert nodes[0]["filename"] == str(files["image"]) and nodes[0]["cache"] == {"direct": True, "no-flush": False}
    assert {"driver": "virtio-blk-pci", "id": "root", "drive": "root-fmt", "serial": "root"} in [
        json.loads(x) for x in opt(a, "-device") if x.startswith("{")
    ]
    assert "root=/dev/vda" in kernel_cmdline(c)


def test_untrusted_paths_cannot_inject_options(tmp_path: Path, files: dict[str, Path]) -> None:
    evil = tmp_path / "a,readonly=off,file=x"
    evil.write_bytes(b"x")
    a = argv(cfg(files, initrd=None, image=evil), tmp_path)
    assert json.loads(opt(a, "-blockdev")[0])["filename"] == str(evil), "JSON options carry paths verbatim"
    assert all(",file=x" not in arg or arg.startswith("{") for arg in a)


def test_kernel_cmdline_user_params_last_and_debug(files: dict[str, Path]) -> None:
    line = kernel_cmdline(cfg(files, debug=True, kernel_params={"console": "hvc0"}))
    assert line.endswith("console=hvc0") and " debug " in f" {line} " and "quiet" not in line
    assert "quiet" in kernel_cmdline(cfg(files))
    assert "no_timer_check" in kernel_cmdline(cfg(files)).split()  # a loaded host must not panic the boot


def test_templates_on_the_command_line(files: dict[str, Path], tmp_path: Path) -> None:
    to_be = cfg(files, boot_to_be_template=True, memory_path=tmp_path / "mem", devices_state_path=tmp_path / "dev")
    assert any(f"mem-path={tmp_path / 'mem'},share=on" in x for x in opt(argv(to_be, tmp_path), "-object"))
    mem = tmp_path / "mem"
    mem.write_bytes(b"")
    clone = cfg(files, boot_from_template=True, memory_path=mem, devices_state_path=files["state"])
    a = argv(clone, tmp_path)
    assert any("share=off" in x for x in opt(a, "-object")) and opt(a, "-incoming") == ["defer"]


def test_runtime_dir_owned_by_someone_else_or_a_symlink_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from vmctl import HostError
    from vmctl.core.paths import make_run_dir

    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "rt-link"
    link.symlink_to(target)
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(link))
    with pytest.raises(HostError, match="symlink"):
        make_run_dir()
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o777)
        os.chown(foreign, 65534, 65534)
        monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(foreign))
        with pytest.raises(HostError, match="uid 65534"):
            make_run_dir()
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    loose.chmod(0o777)
    monkeypatch.setenv("VMCTL_RUNTIME_DIR", str(loose))
    run_dir = make_run_dir()
    assert (loose.stat().st_mode & 0o777) == 0o700 and (run_dir.stat().st_mode & 0o777) == 0o700
    import shutil

    shutil.rmtree(run_dir)


def test_toml_device_paths_are_relative_to_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "data.img").write_bytes(b"\0" * 512)
    spec = tmp_path / "sb.toml"
    spec.write_text('[sandbox]\nkernel = "kernel"\ninitrd = "initrd"\nmemory_mib = 256\n'
                    'devices = [{type = "block", path = "data.img", read_only = true}]\n')  # fmt: skip
    assert SandboxConfig.from_toml(spec).devices[0].path == tmp_path / "data.img"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kernel_params", ["quiet=1\n"]),
        ("kernel_params", ["init\n=/bin/sh"]),
        ("hypervisor_params", {"rtc": "base=utc\n"}),
        ("hypervisor_params", {"rtc\n": "base=utc"}),
    ],
)
def test_a_trailing_newline_never_slips_through_validation(files: dict[str, Path], field: str, value: object) -> None:
    # "$" in a Python regex also matches before a final newline; the patterns must not.
    with pytest.raises(ConfigError) as err:
        SandboxConfig(kernel=files["kernel"], initrd=files["initrd"], **{field: value})  # type: ignore[arg-type]
    assert err.value.fields == (f"{field}[0]",)


def test_from_toml_reports_every_bad_field_at_once(tmp_path) -> None:
    """Both `vcpus = 0` and `memory_mib = "lots"` are reported in one ConfigError.
    Base: a type error in memory_mib skips the size checks, so vcpus is not reported."""
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    path = tmp_path / "sandbox.toml"
    path.write_text(f'[sandbox]\nkernel = "{kernel}"\ninitrd = "{initrd}"\nvcpus = 0\nmemory_mib = "lots"\n')
    with pytest.raises(ConfigError) as info:
        SandboxConfig.from_toml(path)
    assert "memory_mib" in info.value.fields
    assert "vcpus" in info.value.fields, info.value.fields

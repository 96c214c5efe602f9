"""The public API is what vmctl/__init__.py exports, and every export is real."""

from __future__ import annotations

import pytest

import vmctl


def test_all_names_exist_and_are_unique() -> None:
    assert len(vmctl.__all__) == len(set(vmctl.__all__))
    for name in vmctl.__all__:
        assert hasattr(vmctl, name), name


def test_one_error_hierarchy() -> None:
    errors = [getattr(vmctl, n) for n in vmctl.__all__ if isinstance(getattr(vmctl, n), type)
              and issubclass(getattr(vmctl, n), BaseException)]  # fmt: skip
    assert errors and all(issubclass(e, vmctl.VmctlError) for e in errors)
    assert issubclass(vmctl.VmctlTimeout, TimeoutError) and issubclass(vmctl.HotplugTimeout, vmctl.VmctlTimeout)
    assert issubclass(vmctl.GuestUnresponsive, vmctl.VmctlTimeout) and issubclass(vmctl.GuestUnresponsive,
                                                                                vmctl.GuestError)  # fmt: skip


@pytest.mark.parametrize(("old", "new", "name"), [("vmctl.pool", "vmctl.fleets.pool", "SandboxPool"),
                                                  ("vmctl.state", "vmctl.core.state", "SandboxState"),
                                                  ("vmctl.detached", "vmctl.machine.registry", "Record"),
                                                  ("vmctl.agentproto", "vmctl.agent.protocol", "FrameType")])  # fmt: skip
def test_an_old_import_path_still_works_for_one_release_and_says_where_it_went(old: str, new: str, name: str) -> None:
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert name in module.__all__ or name in dir(importlib.import_module(new))

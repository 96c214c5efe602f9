"""The public API is what vmctl/__init__.py exports, and every export is real."""

from __future__ import annotations

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

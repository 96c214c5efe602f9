"""The default guest: Debian's cloud kernel and a busybox initramfs carrying the vmctl agent."""

from vmctl.guest.build import GuestAssets, ensure_default_assets

__all__ = ["GuestAssets", "ensure_default_assets"]

"""Guests: the default one (Debian's cloud kernel and a busybox initramfs carrying the vmctl
agent), and root filesystem images with real software (:func:`build_image`)."""

from vmctl.guest.build import GuestAssets, ensure_default_assets, guest_payload
from vmctl.guest.image import BuiltImage, ImageProgress, build_image

__all__ = ["BuiltImage", "GuestAssets", "ImageProgress", "build_image", "ensure_default_assets", "guest_payload"]

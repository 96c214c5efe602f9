"""The uncompressed kernel inside a bzImage, for direct PVH boot.

Under TCG a bzImage spends about a second before the kernel's clock starts: the firmware loads
it, then its decompressor unpacks the payload, instruction by emulated instruction. The payload
(found from the setup header's ``payload_offset``/``payload_length``) is the kernel's ELF image;
unpacked once on the host, QEMU loads it with ``-kernel vmlinux`` and jumps straight to the entry
point named by its Xen PVH note (``XEN_ELFNOTE_PHYS32_ENTRY``), on q35, pc and microvm alike.

Debian's kernels use LZ4 (legacy frames) or zstd with a large window (the ``zstd`` CLI needs
``--long=31``); gzip, xz and lzma are handled too. Without a way to unpack the payload, or without
the PVH note, :func:`extract_pvh_vmlinux` returns None and the bzImage is used as before.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

XEN_ELFNOTE_PHYS32_ENTRY = 18
_MAGICS = {
    b"\x02\x21\x4c\x18": "lz4",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x5d\x00\x00": "lzma",
}


def payload(bzimage: bytes) -> tuple[str, bytes] | None:
    """The compression format and compressed payload of a bzImage (boot protocol 2.08+)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    data = bzimage[start : start + length]
    for magic, kind in _MAGICS.items():
        if data.startswith(magic):
            return kind, data
    return None


def decompress(kind: str, data: bytes) -> bytes | None:
    """Unpack a kernel payload; None when this host has no tool for ``kind``."""
    if kind == "gzip":
        return gzip.decompress(data)
    if kind in ("xz", "lzma"):  # one stream: what follows it is the kernel's 4-byte size, not another stream
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE).decompress(data)
    if kind == "lz4":
        if shutil.which("lz4"):
            return _run(["lz4", "-d", "-c"], data)
        return lz4_legacy_decompress(data)
    if kind == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found,unused-ignore]

            return bytes(zstandard.ZstdDecompressor(max_window_size=2**31).decompressobj().decompress(data))
        except ImportError:
            pass
        if shutil.which("zstd"):  # the payload's window is larger than the CLI allows by default
            return _run(["zstd", "-d", "-c", "-q", "--long=31", "-M2048MB"], data)
    return None


def _run(argv: list[str], data: bytes) -> bytes | None:
    # the kernel appends its size after the frame(s): tools unpack the frames, then complain
    result = subprocess.run(argv, input=data, capture_output=True, check=False)
    return result.stdout if result.stdout[:4] == b"\x7fELF" else None


def lz4_legacy_decompress(data: bytes) -> bytes:
    """LZ4 legacy frames (what the kernel's ``lz4 -l`` makes), for hosts without the lz4 tool."""
    out = bytearray()
    pos = 4
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if size == 0x184C2102:  # a new frame
            pos += 4
            continue
        if size > len(data) - pos - 4:  # the trailing uncompressed-size word
            break
        _lz4_block(data, pos + 4, pos + 4 + size, out)
        pos += 4 + size
    return bytes(out)


def _lz4_length(src: bytes, i: int, n: int) -> tuple[int, int]:
    """An LZ4 length: a nibble of 15 continues in the following bytes until one is not 255."""
    if n == 15:
        while True:
            b = src[i]
            i += 1
            n += b
            if b != 255:
                break
    return n, i


def _lz4_block(src: bytes, i: int, end: int, out: bytearray) -> None:
    while i < end:
        token = src[i]
        i += 1
        n, i = _lz4_length(src, i, token >> 4)
        out += src[i : i + n]
        i += n
        if i >= end:
            return
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        m, i = _lz4_length(src, i, token & 15)
        m += 4
        startpos = len(out) - offset
        if offset >= m:
            out += out[startpos : startpos + m]
        else:
            while m > 0:
                chunk = out[startpos : startpos + min(m, offset)]
                out += chunk
                m -= len(chunk)
                startpos += len(chunk)


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF carries the Xen PVH entry note QEMU's ``-kernel`` needs."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for n in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + n * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def extract_pvh_vmlinux(bzimage: Path, target: Path) -> bool:
    """Write ``bzimage``'s uncompressed kernel to ``target`` if it can be unpacked and PVH-booted."""
    found = payload(bzimage.read_bytes())
    if found is None:
        return False
    elf = decompress(*found)
    if elf is None or not has_pvh_entry(elf):
        return False
    target.write_bytes(elf)
    return True

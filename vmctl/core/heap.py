"""Keeping garbage collections short in a controller with many long-lived sandboxes.

CPython's cyclic garbage collector walks every container object of the generations it collects,
and a full collection walks them all, with the event loop stopped meanwhile. A thousand QMP
sessions in one loop are about 110 such objects each (qemu.qmp's tasks, queues, futures and
streams), so every full collection there walks well over 100,000 objects: tens of milliseconds
on a fast machine, 60-150 ms measured on a loaded 2-core one (``bench/control_plane.py``).
Objects that live as long as the sandboxes do never become garbage, so walking them again and
again finds nothing.
"""

from __future__ import annotations

import gc


def settle_gc() -> int:
    """Take every object alive now out of the garbage collector's walks; how many were.

    Call it once the long-lived part of the application is up (a fleet or a pool started, the
    sessions connected), from time to time if that part grows a lot. It collects first, so no
    garbage is kept, then moves the survivors to the collector's permanent generation
    (:func:`gc.freeze`): later collections, full ones included, walk only what was made since.
    Frozen objects are still freed by reference counting when they go; only a reference cycle
    among them stays in memory until :func:`gc.unfreeze` (which undoes this), so do not call it
    in a loop that creates and drops many sandboxes.

    Opt-in: vmctl never calls it by itself, since it decides for the whole process.
    """
    gc.collect()
    before = gc.get_freeze_count()
    gc.freeze()
    return gc.get_freeze_count() - before

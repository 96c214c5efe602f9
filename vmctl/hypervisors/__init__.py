"""Hypervisor backends: the async interface (:mod:`.base`), QEMU on q35/pc (:mod:`.qemu`) and
microvm (:mod:`.microvm`), how QEMU is started (:mod:`.process`, :mod:`.cmdline`) and confined
(:mod:`.jail`, :mod:`.cgroups`, :mod:`.handover`). Nothing here imports the layers above."""

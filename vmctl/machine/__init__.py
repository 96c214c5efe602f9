"""What a running machine owns: its device table and hotplug queue, resize, overlays, snapshots and templates, and the registry of detached sandboxes."""

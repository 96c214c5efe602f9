"""Many sandboxes: fleets, specs, warm pools, templates, and the member ledger they share."""

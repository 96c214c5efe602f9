"""The base every layer stands on: the state table, waiting, the QMP door, paths, logging."""

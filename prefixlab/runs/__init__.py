"""Runs: their settings and presets, run folders and the steps that fill them, the registry
(SQLite) and the worker processes that train runs (only a run's worker writes its status),
a run's inspection and the explanation of its decisions (`explanation`: the prefix, its start
and the bare model on one text; words beside TF-IDF's; the model's descriptions) and its
readable prompt (`readable`).

Imports `figures`, `interpret`, `engine`, `data` and the root modules; never `serve`, the
workbench or the UI.
"""

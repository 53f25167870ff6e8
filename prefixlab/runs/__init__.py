"""Runs: their settings and presets, run folders and the steps that fill them, the registry
(SQLite) and the worker processes that train runs (only a run's worker writes its status).

Imports `figures`, `interpret`, `engine`, `data` and the root modules; never `serve`, the
workbench or the UI.
"""

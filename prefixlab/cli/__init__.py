"""The command line, `python -m prefixlab <command>`, on the same functions the app calls.

Rooms: `main` (the parser and the exit codes), one per command group: `training` (validate,
train, resume, rank, worker), `scoring` (evaluate, predict, serve), `exchange` (export,
import-peft, inspect); `options` (options generated from the settings dataclasses) and
`output` (what the commands print).

Imports `workbench` and the wings below it; `ui` only for `serve`, which launches the API app.
"""

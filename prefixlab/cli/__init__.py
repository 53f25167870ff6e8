"""The command line, `python -m prefixlab <command>`, on the same functions the app calls.

Imports `workbench` and the wings below it; never `ui`.
"""

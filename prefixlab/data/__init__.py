"""Data: reading tables, guessing columns, labeled sets and input/target pairs, splits,
writing CSVs.

Imports only the root modules (`errors`, `files`); everything else builds on it.
"""

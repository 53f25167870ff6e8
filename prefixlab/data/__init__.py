"""Data: reading tables, guessing columns, labeled sets and input/target pairs, splits,
writing CSVs.

A labeled CSV goes bytes -> `reading.read_table` -> `labeled.load_labeled_csv` (columns
chosen by `columns`) -> `splits.stratified_split`; `writing.write_csv` is the way back out.
`topics` clusters texts by their words and holds whole clusters out, for splits whose
held-out side has topics training never saw. `pairs` reads input/target CSVs for generation
runs; `messages` holds the phrases their messages share (rows named by number, lists
joined with "and").

Imports only the root modules (`errors`, `files`); everything else builds on it.
"""

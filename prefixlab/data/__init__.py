"""Data: reading tables, guessing columns, labeled sets and input/target pairs, splits,
writing CSVs.

Rooms: `reading` (bytes -> `Table`, `DataError`), `columns` (which column holds what),
`labeled` (`LabeledData`, `load_labeled_csv`), `pairs` (input/target pairs for generation),
`splits` (`stratified_split`), `writing` (`write_csv`, `csv_text`), `messages` (the phrases
their messages share).

Imports only the root modules (`errors`, `files`); everything else builds on it.
"""

"""Interpretation readouts as arrays and dataclasses: the key frame, nearest tokens, the
reference bank, PCA maps, knockouts, and the summary in words.

Imports `engine` and `data`; draws nothing (that is `figures`).
"""

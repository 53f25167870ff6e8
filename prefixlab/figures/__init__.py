"""Plotly figures: data and training charts, and figures of the interpretation readouts.

Imports `interpret` (for its result types) and nothing that trains or serves.
"""

"""Benchmarks, each runnable as `python -m prefixlab.bench.<name>`: speed against PEFT,
serving, generation, data-parallel training, and learning quality.

A leaf wing: it may import any wing below the UI and CLI; nothing imports it.
"""

"""Benchmarks, each runnable as `python -m prefixlab.bench.<name>`: speed against PEFT,
serving, generation, data-parallel training (ddp), and learning quality.

`speed` is the entry point of the speed benchmark; its rooms are `task` (settings and the
sample both contenders share), `contenders` (ours and PEFT), `machine` (matmul peak, memory,
app starts, the shared data folder) and `report` (the table and the `summary:` line).

A leaf wing: it may import any wing below the UI and CLI; nothing imports it.
"""

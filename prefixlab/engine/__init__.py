"""The engine: a frozen causal LM and the prefix that steers it.

Models and the per-family table, the compute dtype (precision), the prefix module,
encoding, the training loop, its schedule (the time budget's plan) and its fast CPU step,
decoding, mixed-prefix batches, label scoring, data-parallel ranks, PEFT interop. Imports
only `data` and the root modules (`errors`, `files`); it knows nothing of run folders,
figures, serving or the UI.
"""

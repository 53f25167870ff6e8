"""Serving many prefixes with one model: the prefix store and the batcher behind the API.

Imports `runs` (run settings on disk), `engine` and `data`.
"""

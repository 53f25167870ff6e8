"""Serving many prefixes with one model: the prefix store and the batcher behind the API, and
who may connect to a server (one host/auth rule and one upload limit for the app and the API).

Imports `runs` (run settings on disk), `engine` and `data`.
"""

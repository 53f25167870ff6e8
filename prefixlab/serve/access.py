"""Who may connect, and how large an upload may be: one rule for the app (`python app.py`)
and the API server (`python -m prefixlab serve`).

A server that listens only on this machine needs no login. One that listens on another
interface, or behind a public share link, exposes the runs and data to others: it must be
given a user and password, or it refuses to start.
"""

from __future__ import annotations

from prefixlab.errors import ConfigError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_UPLOAD = "50mb"  # the largest file a browser or API client may send (Gradio's notation)


def credentials(auth: str | None, host: str, share: bool = False) -> tuple[str, str] | None:
    """The (user, password) to demand, or None for a server only this machine can reach.

    `auth` is "user:password" (the password may hold colons). ConfigError for a malformed
    one, or for listening beyond this machine (or sharing) without one.
    """
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ConfigError("--auth must look like user:password")
        return user, password
    if share or host not in LOCAL_HOSTS:
        where = "a public share link" if share else host
        raise ConfigError(f"listening on {where} exposes your runs and data to others; give "
                          "--auth user:password (or PREFIXLAB_AUTH) to require a login")
    return None

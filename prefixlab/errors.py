"""User errors: one base class, so the CLI and the app tell a mistake a user can fix from a bug.

Each module keeps its own error type next to the code that raises it (DataError in
data/reading.py, PrefixFileError in engine/prefix.py, ...); they all derive from
PrefixLabError. ConfigError lives here because the nested settings (TrainConfig,
PrefixConfig, Template) raise it and RunConfig, which sits above them, collects their
problems.
"""

from __future__ import annotations

from collections.abc import Sequence


class PrefixLabError(Exception):
    """Something a user can fix (a file, a setting, a request); the message says what and how."""


class ConfigError(PrefixLabError, ValueError):
    """Settings that cannot be used. `problems` lists every one; the message joins them."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __reduce__(self):  # rebuild from the list, so the error survives a process boundary
        return type(self), (self.problems,)


USER_ERRORS: tuple[type[BaseException], ...] = (
    PrefixLabError, FileExistsError, FileNotFoundError, PermissionError,
)
"""What the CLI and the app report as one line, never a traceback: our own errors, and the
file system's refusals that name a path the user can fix."""

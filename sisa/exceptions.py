"""The exceptions sisa raises.

Every error derives from :class:`SisaError`, and each subclass also inherits the builtin it stands in for, so
``except KeyError`` keeps working for callers who do not know sisa (``UnknownRecordError(SisaError, KeyError)``).
The CLI turns any ``SisaError`` into a one-line message on stderr and a non-zero exit code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class SisaError(Exception):
    """Base class of every error raised by sisa."""

    exit_code = 1


def _bullets(problems: Iterable[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


class ConfigError(SisaError, ValueError):
    """The configuration is invalid. Lists every problem at once."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid configuration: {self.problems[0]}")
        else:
            super().__init__(
                f"invalid configuration ({len(self.problems)} problems):\n{_bullets(self.problems)}"
            )


class UsageError(SisaError, ValueError):
    """A call's arguments are wrong (not the configuration). Lists every problem at once, each naming the
    library parameter it is about; the CLI shows the matching flag instead (:meth:`render`)."""

    exit_code = 2

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = list(problems)  # (parameter, what was expected and what came)
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each parameter shown as ``names`` calls it (e.g. a CLI flag), else by its own name."""
        names = names or {}
        lines = [f"{names.get(param, param)}: {text}" for param, text in self.problems]
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems:\n{_bullets(lines)}"


class DataError(SisaError, ValueError):
    """An input table is unusable (duplicate/missing IDs, NaN labels, non-numeric features...)."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"{source}: {self.problems[0]}")
        else:
            super().__init__(f"{source}: {len(self.problems)} problems:\n{_bullets(self.problems)}")


class UnknownRecordError(SisaError, KeyError):
    """Some requested record (or subject) IDs are not in the run's index. Nothing was changed."""

    exit_code = 3

    def __init__(self, ids: list, kind: str = "record"):
        self.ids = list(ids)
        self.kind = kind
        shown = ", ".join(repr(i) for i in self.ids[:20])
        more = f" (and {len(self.ids) - 20} more)" if len(self.ids) > 20 else ""
        super().__init__(f"unknown {kind} IDs, nothing was changed: {shown}{more}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RunStateError(SisaError, RuntimeError):
    """The run directory is missing, incomplete or in a state that does not allow the operation."""


class RunLockedError(RunStateError):
    """Another process holds the run's writer lock."""

    exit_code = 4


class IntegrityError(SisaError, RuntimeError):
    """A file in the run directory failed its checksum or is truncated. Never silently used."""

    exit_code = 5

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(
            f"integrity check failed for {self.path}: {reason} (run `sisa repair` to rebuild it)"
        )


class UnrepairableError(IntegrityError):
    """A corrupted file the run cannot rebuild from its own contents (shard data, index): only a backup can."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        SisaError.__init__(
            self,
            f"{self.path}: {reason}; it cannot be rebuilt from the run alone: restore it from a backup, "
            "or train a new run from the original data with `sisa train`",
        )


class IncompatibleCheckpointError(SisaError, RuntimeError):
    """Checkpoints made under different device / torch build / executor cannot be compared bit for bit."""


class AuthError(SisaError, PermissionError):
    """A request lacked the credentials an operation needs (serving)."""


class ClusterError(SisaError, RuntimeError):
    """A Dask cluster cannot train this run: workers cannot import sisa, or they do not share the run folder."""


class ReturningRecordError(SisaError, ValueError):
    """Rows of an addition carry a record ID, subject ID or content that a deletion forgot (matched by keyed hash in
    the tombstones). Names rows by their position in the batch only, never by ID. Nothing was changed."""

    exit_code = 2

    def __init__(self, rows: Mapping[int, list[str]]):
        self.rows = {int(i): list(w) for i, w in rows.items()}
        parts = [f"{i} ({', '.join(w)})" for i, w in list(self.rows.items())[:20]]
        more = f" and {len(self.rows) - 20} more" if len(self.rows) > 20 else ""
        super().__init__(
            f"rows {', '.join(parts)}{more} of the batch match records deleted from this run "
            "(by keyed hash; nothing was changed): re-adding them would resurrect a forgotten person; "
            "if they came back and consented again, add them with allow_returning=True (CLI: --allow-returning)"
        )

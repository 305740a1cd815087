"""One served run: its serving state and its deletion worker, side by side (neither owns the other)."""

from __future__ import annotations

from pathlib import Path

from .schema import ServerSettings
from .state import ServingState
from .worker import DeletionWorker


class Server:
    """What the HTTP app serves: :class:`ServingState` answers predictions, :class:`DeletionWorker` applies
    deletions and tells the state which shards to exclude and when they are back."""

    def __init__(
        self,
        root: str | Path,
        settings: ServerSettings | None = None,
        runtime: list[str] | tuple[str, ...] = (),
    ):
        self.state = ServingState(root, settings, runtime)
        self.worker = DeletionWorker(self.state.run, self.state, self.state.settings.delete_wait_s)

    def status(self) -> dict:
        return {**self.state.status(), "deletions_queued": self.worker.queued()}

    def deletion(self, request_id: str, kind: str = "delete") -> dict:
        return self.state.deletion(request_id, self.worker.errors.get(request_id), kind)

    def close(self) -> None:
        self.worker.stop()

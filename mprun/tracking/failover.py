"""tracking.on_unreachable: what happens when the store cannot be used, at the start or mid-run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from mprun.errors import StoreUnusable, TrackingLost
from mprun.tracking.config import Unreachable
from mprun.tracking.uris import shown

log = logging.getLogger("mprun.tracking")
T = TypeVar("T")


class Failover:
    """tracking.on_unreachable: what happens when the store cannot be used, at the start or mid-run."""

    def __init__(self, policy: Unreachable, local_uri: str) -> None:
        self.policy = Unreachable(policy)
        self.local_uri = local_uri  # the local sqlite store that `local` moves to
        self.intended: str | None = None  # once on the local store: the store (and run) it was meant for
        self.lost = False  # the store went away and the policy is fail: nothing more is sent

    def open(self, uri: str, connect: Callable[[str], T]) -> T:
        """connect(uri); when that store cannot be used and the policy is local, connect(the local store)."""
        try:
            return connect(uri)
        except StoreUnusable as e:  # not a mistake about what is in a store that works (an experiment id, a run id)
            if self.policy is Unreachable.fail or uri == self.local_uri:
                raise
            log.warning("%s\ntracking.on_unreachable=local: logging to %s instead", e, self.local_uri)
            self.intended = shown(uri)
            return connect(self.local_uri)

    def move(self, uri: str, run_id: str | None, error: BaseException) -> str:
        """The store at uri stopped answering while run_id was open: raise TrackingLost (fail, or the run is on the
        local store already), or return the local store's uri to continue in (local)."""
        why = f"{type(error).__name__}: {str(error)[:200]}"
        lost = f"MLflow store {shown(uri)} stopped accepting writes mid-run ({why})"
        if self.policy is Unreachable.fail or self.intended:
            self.lost = True
            raise TrackingLost(
                f"{lost}. Resume from the run's last checkpoint with trainer.resume=<run dir>, "
                "or set tracking.on_unreachable=local to keep training and log locally"
            ) from error
        log.warning("%s\ntracking.on_unreachable=local: continuing in a new run in %s", lost, self.local_uri)
        self.intended = f"{shown(uri)} run {run_id}"
        return self.local_uri

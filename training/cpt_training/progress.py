"""``progress.json``: the trainer's heartbeat for the operator.

Rank 0 writes it at most every ``min_interval_s`` (15 s) and immediately at each checkpoint
commit and at the end, so the operator's status (step, loss, tokens/s, MFU, last committed step)
lags by seconds without turning S3 into a per-step log. Every write replaces the whole object
(one PUT in S3, an atomic rename locally): a reader never sees half a file.

Fields (camelCase, the operator's ``observe_progress`` reads them)::

    attempt, step, maxSteps, loss, tokensPerSec, mfu (fraction of peak, null without a peak),
    lr, updatedAt (RFC 3339 UTC), lastCommittedStep (null before the first commit), done,
    tokensPerSource ({source name: training tokens drawn from it so far}; absent until known),
    eval ({step, sources: {name: {loss, perplexity}}}: the latest held-out evaluation, if any)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cpt_training import storage

if TYPE_CHECKING:
    from cpt_training.metrics import StepMetrics

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
MIN_INTERVAL_S = 15.0


def progress_file_uri(progress_uri: str | None, checkpoint_uri: str) -> str:
    """Where progress.json goes: ``progress_uri`` (a ``.json`` file or a directory), else
    ``<checkpoint root>/progress.json`` (the layout the operator reads)."""
    base = progress_uri or checkpoint_uri
    if base.endswith(".json"):
        return base
    return storage.join_uri(base, PROGRESS_FILE)


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ProgressWriter:
    """Throttled writer of progress.json (use on rank 0 only)."""

    def __init__(
        self,
        uri: str,
        *,
        attempt: int,
        max_steps: int,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        writer: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.uri = uri
        self.attempt = attempt
        self.max_steps = max_steps
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._write = writer or storage.write_json
        self._last_write: float | None = None
        self.state: dict[str, Any] = {
            "attempt": attempt,
            "step": 0,
            "maxSteps": max_steps,
            "loss": None,
            "tokensPerSec": None,
            "mfu": None,
            "lr": None,
            "updatedAt": None,
            "lastCommittedStep": None,
            "done": False,
        }

    def update(
        self,
        *,
        step: int,
        loss: float | None = None,
        tokens_per_sec: float | None = None,
        mfu: float | None = None,
        lr: float | None = None,
        tokens_per_source: dict[str, int] | None = None,
        force: bool = False,
    ) -> bool:
        """Record the latest numbers; write if forced or the interval has passed."""
        if tokens_per_source is not None:
            self.state["tokensPerSource"] = dict(tokens_per_source)
        self.state.update(
            step=step,
            loss=_finite(loss),
            tokensPerSec=_finite(tokens_per_sec),
            mfu=_finite(mfu),
            lr=_finite(lr),
        )
        return self._maybe_write(force)

    def measured(self, m: StepMetrics, tokens_per_source: dict[str, int] | None = None) -> bool:
        """A logged step's metrics (both trainers): :meth:`update` with its numbers."""
        return self.update(
            step=m.step,
            loss=m.loss,
            tokens_per_sec=m.tokens_per_sec,
            mfu=m.mfu,
            lr=m.lr,
            tokens_per_source=tokens_per_source,
        )

    def evaluated(self, step: int, losses: dict[str, float | None]) -> None:
        """Held-out loss per source at ``step``: always written."""
        self.state["eval"] = {
            "step": step,
            "sources": {
                name: {
                    "loss": _finite(loss),
                    "perplexity": None
                    if loss is None or not math.isfinite(loss) or loss > 700
                    else math.exp(loss),
                }
                for name, loss in losses.items()
            },
        }
        self._maybe_write(True)

    def committed(self, step: int, seconds: float | None = None) -> None:
        """A checkpoint at ``step`` is committed (its save took ``seconds``): always
        written."""
        prev = self.state["lastCommittedStep"]
        if prev is None or step > prev:
            self.state["lastCommittedStep"] = step
        if seconds is not None:
            self.state["lastCommitSeconds"] = _finite(seconds)
        self._maybe_write(True)

    def flush(self) -> None:
        """Write the latest state now."""
        self._maybe_write(True)

    def stopped(self, step: int) -> None:
        """Stopped on request (SIGTERM) with ``step`` committed: always written."""
        self.state["stoppedAtStep"] = step
        self._maybe_write(True)

    def done(self) -> None:
        self.state["done"] = True
        self._maybe_write(True)

    def _maybe_write(self, force: bool) -> bool:
        now = self._clock()
        if (
            not force
            and self._last_write is not None
            and now - self._last_write < self.min_interval_s
        ):
            return False
        self.state["updatedAt"] = _now()
        try:
            self._write(self.uri, dict(self.state))
        except Exception as exc:
            # Progress is advisory: a flaky S3 PUT must not kill a training run.
            log.warning("could not write %s: %s", self.uri, exc)
            return False
        self._last_write = now
        return True

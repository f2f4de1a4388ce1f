"""Stopping cleanly when asked to: SIGTERM (a spot interruption, a node drain, a Kueue or
scheduler preemption, the run's deadline) ends the current step, saves and commits a
checkpoint, and leaves with :data:`EXIT_PREEMPTED`, so at most one step of work is lost and
the operator can tell a preemption from a failure.

Under torchrun the kubelet's SIGTERM reaches the agent (the container's first process), which
forwards it to its workers and waits ``--shutdown-timeout`` seconds (``PET_SHUTDOWN_TIMEOUT``,
set by the operator from the pod's grace period) before killing them. Only the ranks of the
signalled node see the signal; every rank stops at the same step because the request is
agreed on after each step (one small host-side gather on the checkpoint syncer's gloo group,
no device synchronisation). The agent itself exits 1 after a signal and loses the workers'
codes, so ``cpt-torchrun`` (:mod:`cpt_training.launch`) wraps it and turns "the workers
committed their stop checkpoint" (the marker file written here) into the distinct exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""sysexits' EX_TEMPFAIL: stopped on request with a committed checkpoint; try again later.
The operator's recovery rules read it from the pod (reconcile/recovery.py)."""

STOP_MARKER_ENV = "CPT_STOP_MARKER"
"""Path of the node-local file a worker writes once its stop checkpoint is committed; set by
``cpt-torchrun`` for its workers."""


class _Gather(Protocol):
    def all_gather_object(self, obj: Any) -> list[Any]: ...


class StopRequest:
    """Whether this process was asked to stop, and the agreement of all ranks on it."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._logged = False

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        """Catch `signals` (main thread only; elsewhere the default action stays)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum  # only a flag here: the loop does the work between steps

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask to stop from code (tests, a deadline known to the trainer)."""
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self, collective: _Gather) -> bool:
        """True on every rank once any rank was asked to stop (all ranks, same steps)."""
        flags = collective.all_gather_object(self.signal)
        asked = [s for s in flags if s is not None]
        if asked and not self._logged:
            self._logged = True
            name = signal.Signals(asked[0]).name
            log.warning("stop requested (%s): finishing this step and saving a checkpoint", name)
        return bool(asked)


def stopped_exit(
    step: int, committed: Any, failures: list[Any], *, local_main: bool, progress: Any = None
) -> int:
    """The end of a stop on request at `step`, for either trainer: EXIT_PREEMPTED once the
    newest commit (`committed`, a CommittedCheckpoint or None) is that step, recorded in
    progress.json and in the node's stop marker; an error when it never committed (the pod
    then fails as usual, and the next attempt resumes from the last commit before it)."""
    if committed is None or committed.step < step:
        raise RuntimeError(
            f"stopped on request at step {step} but its checkpoint was not committed: "
            f"{failures[-1:] or 'unknown reason'}"
        )
    log.warning("stopped on request at step %d; checkpoint %s committed", step, committed.uri)
    if progress is not None:
        progress.stopped(step)
    if local_main:
        mark_stopped(step)
    return EXIT_PREEMPTED


def mark_stopped(step: int, marker: str | None = None) -> None:
    """Record for ``cpt-torchrun`` that this node's workers committed their stop checkpoint."""
    path = marker or os.environ.get(STOP_MARKER_ENV)
    if not path:
        return
    try:
        Path(path).write_text(f"{step}\n", encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the stop marker %s: %s", path, exc)

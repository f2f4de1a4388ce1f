"""``cpt-torchrun``: torchrun, with the exit code of a clean stop kept.

torchrun's agent exits 1 both when it was signalled (it forwards the signal to its workers and
re-raises) and when a worker exited non-zero, so the pod could not tell "stopped on SIGTERM
with a committed checkpoint" from a crash. This wrapper runs torchrun in-process with a
node-local stop marker path in the workers' environment (``CPT_STOP_MARKER``); when torchrun
ends with an error and the marker exists, the workers committed their stop checkpoint and the
process exits ``EXIT_PREEMPTED`` (75). Everything
else (arguments, rendezvous, exit codes of real failures) is torchrun's own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cpt_training.preemption import EXIT_PREEMPTED, STOP_MARKER_ENV


def _marker_path() -> Path:
    given = os.environ.get(STOP_MARKER_ENV)
    if given:
        return Path(given)
    return Path(tempfile.gettempdir()) / f"cpt-stopped-{os.getpid()}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv`; 0, :data:`EXIT_PREEMPTED`, or torchrun's own failure."""
    from torch.distributed import run as torchrun

    marker = _marker_path()
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()  # a leftover of an earlier run in the same scratch dir
    os.environ[STOP_MARKER_ENV] = str(marker)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        torchrun.main(args)
    except BaseException:
        if marker.exists():
            sys.stderr.write(
                f"cpt-torchrun: workers stopped on request after committing step "
                f"{marker.read_text(encoding='utf-8').strip()}; exit {EXIT_PREEMPTED}\n"
            )
            return EXIT_PREEMPTED
        raise
    return 0


def entry() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entry()

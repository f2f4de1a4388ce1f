"""A compiled S3 protocol server on loopback: versitygw (posix backend) built by build.sh.

Used by the checkpoint transfer benchmark (bench/ckpt_sync_bench.py) and by integration tests
that run the real data path against a second S3 implementation (tests/fixtures/s3.py). Clients
reach it only through the standard AWS environment (:attr:`VersityServer.env`).

Why these flags: ``--data-integrity-etag`` derives ETags from the data-integrity checksum
instead of an MD5 of every byte. No S3 client we measure reads a multipart ETag as an MD5, and
on a 2-core machine the server shares the CPU with the client: MD5 alone was about 45% of the
server's time per uploaded byte, time the client under test would lose.

    python hack/s3server/s3server.py build      # print the binary (building it if needed)
    python hack/s3server/s3server.py serve DIR  # serve DIR on a free loopback port until ^C
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
NAME = "versitygw v1.8.0 (posix backend, loopback)"
"""How results and logs name this server; keep in step with go.mod."""


class ServerUnavailable(RuntimeError):
    """The server binary is missing and could not be built, or the server did not start."""


def cache_dir() -> Path:
    base = os.environ.get("CPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cpt"
    )
    return Path(base)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def find_binary(*, build: bool = True) -> Path:
    """The versitygw binary: ``CPT_S3SERVER_BIN`` if set, else build.sh's cached build (run
    under a lock, so parallel test sessions build once). A cold build takes minutes."""
    override = os.environ.get("CPT_S3SERVER_BIN")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise ServerUnavailable(f"CPT_S3SERVER_BIN={path} is not an executable")
        return path
    if not build:
        raise ServerUnavailable("the S3 server binary is not built (run hack/s3server/build.sh)")
    if shutil.which("bash") is None:
        raise ServerUnavailable("bash is not on PATH")
    # build.sh answers at once when the cached build exists (it needs `go` only to build).
    with _flock(cache_dir() / "s3server-build.lock"):
        proc = subprocess.run(
            ["bash", str(HERE / "build.sh")], stdout=subprocess.PIPE, text=True, check=False
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        hint = "" if shutil.which("go") else " (`go` is not on PATH)"
        raise ServerUnavailable(f"hack/s3server/build.sh failed (exit {proc.returncode}){hint}")
    path = Path(lines[-1])
    if not os.access(path, os.X_OK):
        raise ServerUnavailable(f"build.sh printed {path}, which is not an executable")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VersityServer:
    """versitygw serving ``root`` (one sub-directory per bucket) on a free loopback port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        log_path: str | os.PathLike[str] | None = None,
        binary: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.log_path = Path(log_path) if log_path else self.root.parent / "versitygw.log"
        self.binary = binary
        self.extra_args = list(extra_args or [])
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self, timeout: float = 60.0) -> VersityServer:
        binary = self.binary or find_binary(build=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VGW_", "ROOT_"))}
        env["ROOT_ACCESS_KEY"] = ACCESS_KEY
        env["ROOT_SECRET_KEY"] = SECRET_KEY
        cmd = [
            str(binary),
            "--port",
            f"127.0.0.1:{self.port}",
            "--region",
            REGION,
            "--quiet",
            "posix",
            "--data-integrity-etag",
            *self.extra_args,
            str(self.root),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"versitygw exited with {self.proc.returncode}; see {self.log_path}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(
                    f"versitygw did not listen on 127.0.0.1:{self.port}; see {self.log_path}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cpu_seconds(self) -> float | None:
        """User + system CPU the server process used so far (Linux), for benchmarks."""
        if self.proc is None:
            return None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> VersityServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "build":
        print(find_binary(build=True))
        return 0
    if len(argv) == 2 and argv[0] == "serve":
        with VersityServer(argv[1], log_path=Path(argv[1]).parent / "versitygw.log") as srv:
            for k, v in srv.env.items():
                print(f"export {k}={v}")
            sys.stdout.flush()
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

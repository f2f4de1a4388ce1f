"""Goal 4 (transfer part): checkpoint upload/download throughput vs ``aws s3 cp --recursive``.

A 2 GB multi-file checkpoint (8 rank files of 256 MB of random bytes plus a small
``.metadata``, the layout of a DCP save of 8 ranks) goes to and from S3 servers on loopback,
each its own process, reached only through ``AWS_ENDPOINT_URL``:

* versitygw (``hack/s3server``: a compiled S3 server, posix backend; the goal rows
  ``ckpt.sync.upload`` / ``ckpt.sync.download``): fast enough that the clients are measured;
* moto in server mode (rows ``ckpt.sync.moto.*``, kept for continuity with earlier results):
  one Python process that buffers every part, so it sets the upload pace for every client.

Against each server, same server per pair, order alternating between repeats:

* ours, upload: ``cpt_training.checkpoint.upload_and_commit`` (managed multipart transfers of
  all files at once, a CRC64NVME checksum of every file, manifest + commit marker);
* ours, download: ``cpt_training.checkpoint.restore`` (finds the newest committed tag,
  downloads, verifies every file against the manifest's checksum);

``--checksum sha256`` makes ours write (and so verify) sha256 manifests, as cpt did before,
for an A/B of the checksum's cost on the same machine.
* baseline: ``aws s3 cp --recursive`` up and down (the awscli of the venv, default settings).

Each transfer runs as a fresh process (ours: ``python -m bench.ckpt_sync_bench --child``), so
both sides pay their start-up; the best repeat counts (the least disturbed by other processes
on a shared machine), all repeats are recorded with the client's and the server's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

sys.path.insert(0, str(common.REPO / "hack" / "s3server"))
import s3server  # type: ignore[import-not-found]

MiB = 1024 * 1024
SERVERS = ("versity", "moto")
CHECKSUMS = ("crc64nvme", "sha256")  # ours: the default, and the pre-CRC manifests


def make_checkpoint(root: Path, files: int, file_mib: int) -> Path:
    """``root/step_100/`` with ``files`` rank files of random bytes (cached)."""
    tag = root / "step_100"
    marker = root / f".complete-{files}x{file_mib}"
    if marker.is_file():
        return tag
    shutil.rmtree(root, ignore_errors=True)
    tag.mkdir(parents=True)
    chunk = 16 * MiB
    for i in range(files):
        with open(tag / f"__{i}_0.distcp", "wb") as f:
            left = file_mib * MiB
            while left:
                n = min(chunk, left)
                f.write(os.urandom(n))
                left -= n
    (tag / ".metadata").write_bytes(os.urandom(64 * 1024))
    marker.write_text("ok")
    return tag


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


class Moto:
    """moto in server mode on loopback, as the test fixture runs it."""

    name = "moto (server mode, loopback)"
    short = "moto S3 server on loopback"

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start")

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def cpu_seconds(self) -> float | None:
        return _proc_cpu(self.proc.pid)


class Versity:
    """versitygw (hack/s3server) serving a fresh directory on loopback."""

    name = s3server.NAME
    short = "versitygw S3 server on loopback"

    def __init__(self, work: Path) -> None:
        root = work / "versity-root"
        shutil.rmtree(root, ignore_errors=True)
        self.server = s3server.VersityServer(root, log_path=work / "versitygw.log").start()
        self.root = root
        self.url = self.server.endpoint_url

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = self.server.env
        return env

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def cpu_seconds(self) -> float | None:
        cpu: float | None = self.server.cpu_seconds()
        return cpu


def _child(args: argparse.Namespace) -> None:
    common.bootstrap()
    from cpt_training.checkpoint import restore, upload_and_commit
    from cpt_training.storage import TransferSettings, use_crt

    t0 = time.perf_counter()
    if args.op == "upload":
        upload_and_commit(args.src, args.dst, step=100, algorithm=args.checksum)
    else:
        ck = restore(args.src, args.dst)
        if ck is None:
            raise SystemExit(f"nothing committed under {args.src}")
    client = "crt" if use_crt(TransferSettings.from_env()) else "classic"
    res = {"inProcessSeconds": time.perf_counter() - t0, "transferClient": client}
    print("RESULT " + json.dumps(res), flush=True)


def _py_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of both clients: ours and the CLI see the same Python path (a
    ``PYTHONPATH`` given to the benchmark, e.g. a scratch awscrt, stays at the end)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    paths = [str(common.REPO), str(common.REPO / "training"), str(common.REPO / "operator")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, client CPU seconds, stdout) of one transfer process."""
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, cwd=common.REPO, capture_output=True, text=True, check=False
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return dt, _children_cpu() - c0, proc.stdout


def aws_exe() -> str:
    exe = Path(sys.executable).with_name("aws")
    return str(exe) if exe.is_file() else (shutil.which("aws") or "aws")


def _awscrt_version(env: dict[str, str]) -> str | None:
    """The awscrt both clients import in ``env`` (it also speeds up the CLI's botocore:
    CRT signing and checksums), None without one."""
    code = "import awscrt; print(awscrt.__version__)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def bench_server(
    server: Any, src: Path, nbytes: int, reps: int, work: Path, checksum: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Every repeat of ours and the CLI, up and down, against one running server."""
    import boto3

    env = _py_env(server.env)
    s3 = boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    runs: dict[str, list[dict[str, Any]]] = {}

    def timed(key: str, cmd: list[str]) -> None:
        load0 = common.load_average()
        s0 = server.cpu_seconds()
        dt, cpu, so = _timed(cmd, env)
        s1 = server.cpu_seconds()
        r = {
            "seconds": dt,
            "MBps": nbytes / 1e6 / dt,
            "clientCpuSeconds": cpu,
            "MBperCpuSecond": nbytes / 1e6 / cpu if cpu else None,
            "serverCpuSeconds": None if s0 is None or s1 is None else s1 - s0,
            "loadAvgBefore": load0,
            "loadAvg": common.load_average(),
            **_child_result(so),
        }
        runs.setdefault(key, []).append(r)
        srv = "" if r["serverCpuSeconds"] is None else f", server cpu {r['serverCpuSeconds']:.1f} s"
        print(
            f"  {key:14s} {r['MBps']:8.1f} MB/s ({dt:.1f} s, client cpu {cpu:.1f} s{srv}, "
            f"load {r['loadAvg']})",
            flush=True,
        )

    def wipe() -> None:
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})

    py = [sys.executable, "-m", "bench.ckpt_sync_bench", "--child", "--checksum", checksum]
    aws = [aws_exe(), "s3", "cp", "--recursive", "--only-show-errors"]
    for rep in range(reps):
        order = ("ours", "cli") if rep % 2 == 0 else ("cli", "ours")
        root = f"s3://{bucket}/ours-{rep}"
        cli_root = f"s3://{bucket}/cli-{rep}/step_100"
        with tempfile.TemporaryDirectory(prefix="ckpt-dl-", dir=work) as tmp:
            up = {
                "ours": [*py, "--op", "upload", "--src", str(src), "--dst", f"{root}/step_100"],
                "cli": [*aws, str(src), cli_root],
            }
            down = {
                "ours": [*py, "--op", "download", "--src", root, "--dst", f"{tmp}/ours"],
                "cli": [*aws, cli_root, f"{tmp}/cli"],
            }
            for who in order:
                timed(f"{who}-upload", up[who])
            for who in order:
                timed(f"{who}-download", down[who])
        wipe()
    return runs, {"awscrt": _awscrt_version(env)}


def bench(
    files: int,
    file_mib: int,
    reps: int,
    servers: tuple[str, ...] = SERVERS,
    checksum: str = CHECKSUMS[0],
) -> list[dict[str, Any]]:
    work = common.WORK / "ckpt-sync"
    work.mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(work / "src", files, file_mib)
    nbytes = sum(p.stat().st_size for p in src.iterdir())
    out: list[dict[str, Any]] = []
    for which in servers:
        print(f"{which}:", flush=True)
        server: Any = Versity(work) if which == "versity" else Moto(work / "moto.log")
        try:
            runs, extra = bench_server(server, src, nbytes, reps, work, checksum)
        finally:
            server.stop()
        out.extend(
            _measurements(which, server, runs, extra, files, file_mib, nbytes, reps, checksum)
        )
    return out


def _measurements(
    which: str,
    server: Any,
    runs: dict[str, list[dict[str, Any]]],
    extra: dict[str, Any],
    files: int,
    file_mib: int,
    nbytes: int,
    reps: int,
    checksum: str,
) -> list[dict[str, Any]]:
    """The goal rows (``ckpt.sync.<op>``) come from the compiled server; moto's rows
    (``ckpt.sync.moto.<op>``) carry no goal: there the server sets the pace."""
    machine = f"{common.cpu_machine()}, {server.short}"
    clients = sorted({r.get("transferClient", "?") for r in runs["ours-upload"]})
    cfg = {
        "checkpointBytes": nbytes,
        "files": files + 1,
        "fileMiB": file_mib,
        "server": server.name,
        "repeats": reps,
        "order": "alternating (ours first on odd repeats)",
        "ourSettings": "TransferSettings defaults (32 concurrent, 16 MiB parts)",
        "ourTransferClient": "/".join(clients),
        "awscrt": extra.get("awscrt") or "not installed",
        "cliSettings": "aws s3 cp defaults (10 concurrent, 8 MiB parts)",
    }
    prefix = "ckpt.sync" if which == "versity" else f"ckpt.sync.{which}"

    def best(key: str) -> dict[str, Any]:
        return max(runs[key], key=lambda r: r["MBps"])

    out = []
    for op, what in (
        ("upload", f"upload_and_commit (multipart, {checksum} per file, manifest + commit)"),
        ("download", f"restore (newest committed tag, download, verify {checksum})"),
    ):
        o, c = best(f"ours-{op}"), best(f"cli-{op}")
        out.append(
            common.measurement(
                f"{prefix}.{op}",
                machine,
                {**cfg, "ours": what},
                "MB/s",
                o["MBps"],
                baseline=(f"aws s3 cp --recursive ({op})", c["MBps"]),
                goal=common.goal(">=", 2.0, "ratio") if which == "versity" else None,
                details={"ours": runs[f"ours-{op}"], "cli": runs[f"cli-{op}"]},
            )
        )
        oc = max(r["MBperCpuSecond"] or 0 for r in runs[f"ours-{op}"])
        cc = max(r["MBperCpuSecond"] or 0 for r in runs[f"cli-{op}"])
        out.append(
            common.measurement(
                f"{prefix}.{op}.client_cpu",
                machine,
                {**cfg, "ours": what},
                "MB per client CPU-second",
                oc,
                baseline=(f"aws s3 cp --recursive ({op})", cc),
                details={"note": "client process CPU (user + sys), server excluded"},
            )
        )
    return out


def _child_result(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return res
    return {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--op", choices=["upload", "download"])
    p.add_argument("--src")
    p.add_argument("--dst")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--file-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, of {', '.join(SERVERS)} (default: both)",
    )
    p.add_argument(
        "--checksum",
        choices=CHECKSUMS,
        default=CHECKSUMS[0],
        help="the file checksum our manifests record and restore verifies (default: %(default)s)",
    )
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    servers = tuple(x for x in args.servers.split(",") if x)
    if not servers or any(x not in SERVERS for x in servers):
        p.error(f"--servers must list some of {', '.join(SERVERS)}, got {args.servers!r}")
    items = bench(args.files, args.file_mib, args.reps, servers, args.checksum)
    for m in items:
        print(f"{m['name']:22s} {m['value']:8.1f} MB/s  ratio {m['ratio']:.2f}")
    if not args.no_write:
        print("wrote", common.write_results("ckpt_sync", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())

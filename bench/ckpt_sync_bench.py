"""Goal 4 (transfer part): checkpoint upload/download throughput vs ``aws s3 cp --recursive``.

A 2 GB multi-file checkpoint (8 rank files of 256 MB of random bytes plus a small
``.metadata``, the layout of a DCP save of 8 ranks) goes to and from a loopback S3 server
(moto in server mode, its own process), reached only through ``AWS_ENDPOINT_URL``:

* ours, upload: ``cpt_training.checkpoint.upload_and_commit`` (managed multipart transfers of
  all files at once, sha256 of every file, manifest + commit marker);
* ours, download: ``cpt_training.checkpoint.restore`` (finds the newest committed tag,
  downloads, verifies every file against the manifest);
* baseline: ``aws s3 cp --recursive`` up and down (the awscli of the venv, default settings).

Each transfer runs as a fresh process (ours: ``python -m bench.ckpt_sync_bench --child``), so
both sides pay their start-up; variants are interleaved and repeated, the best repeat counts
(the least disturbed by other processes on a shared machine), all repeats are recorded.
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

MiB = 1024 * 1024


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


class Moto:
    """moto in server mode on loopback, as the test fixture runs it."""

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


def _child(args: argparse.Namespace) -> None:
    common.bootstrap()
    from cpt_training.checkpoint import restore, upload_and_commit

    t0 = time.perf_counter()
    if args.op == "upload":
        upload_and_commit(args.src, args.dst, step=100)
    else:
        ck = restore(args.src, args.dst)
        if ck is None:
            raise SystemExit(f"nothing committed under {args.src}")
    print("RESULT " + json.dumps({"inProcessSeconds": time.perf_counter() - t0}), flush=True)


def _py_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO), str(common.REPO / "training"), str(common.REPO / "operator")]
    )
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


def bench(files: int, file_mib: int, reps: int) -> list[dict[str, Any]]:
    import boto3

    work = common.WORK / "ckpt-sync"
    work.mkdir(parents=True, exist_ok=True)
    src = make_checkpoint(work / "src", files, file_mib)
    nbytes = sum(p.stat().st_size for p in src.iterdir())
    moto = Moto(work / "moto.log")
    try:
        env = _py_env(moto.env)
        s3 = boto3.client(
            "s3",
            endpoint_url=moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        runs: dict[str, list[dict[str, Any]]] = {}

        def record(
            key: str, seconds: float, cpu: float, extra: dict[str, Any] | None = None
        ) -> None:
            r = {
                "seconds": seconds,
                "MBps": nbytes / 1e6 / seconds,
                "clientCpuSeconds": cpu,
                "MBperCpuSecond": nbytes / 1e6 / cpu if cpu else None,
                "loadAvg": common.load_average(),
                **(extra or {}),
            }
            runs.setdefault(key, []).append(r)
            print(
                f"  {key:14s} {r['MBps']:8.1f} MB/s ({seconds:.1f} s, client cpu {cpu:.1f} s, "
                f"load {r['loadAvg']})",
                flush=True,
            )

        def wipe() -> None:
            paginator = s3.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})

        py = [sys.executable, "-m", "bench.ckpt_sync_bench", "--child"]
        aws = [aws_exe(), "s3", "cp", "--recursive", "--only-show-errors"]
        for rep in range(reps):
            with tempfile.TemporaryDirectory(prefix="ckpt-dl-", dir=work) as tmp:
                root = f"s3://{bucket}/ours-{rep}"
                dt, cpu, so = _timed(
                    [*py, "--op", "upload", "--src", str(src), "--dst", f"{root}/step_100"], env
                )
                record("ours-upload", dt, cpu, _child_result(so))
                dt, cpu, so = _timed(
                    [*py, "--op", "download", "--src", root, "--dst", f"{tmp}/ours"], env
                )
                record("ours-download", dt, cpu, _child_result(so))
                cli_root = f"s3://{bucket}/cli-{rep}/step_100"
                dt, cpu, _ = _timed([*aws, str(src), cli_root], env)
                record("cli-upload", dt, cpu)
                dt, cpu, _ = _timed([*aws, cli_root, f"{tmp}/cli"], env)
                record("cli-download", dt, cpu)
            wipe()
    finally:
        moto.stop()

    machine = common.cpu_machine() + ", moto S3 server on loopback"
    cfg = {
        "checkpointBytes": nbytes,
        "files": files + 1,
        "fileMiB": file_mib,
        "server": "moto (server mode, loopback)",
        "repeats": reps,
        "ourSettings": "TransferSettings defaults (32 concurrent, 16 MiB parts)",
        "cliSettings": "aws s3 cp defaults (10 concurrent, 8 MiB parts)",
    }

    def best(key: str) -> dict[str, Any]:
        return max(runs[key], key=lambda r: r["MBps"])

    out = []
    for op, what in (
        ("upload", "upload_and_commit (multipart, sha256, manifest + commit)"),
        ("download", "restore (newest committed tag, download, verify sha256)"),
    ):
        o, c = best(f"ours-{op}"), best(f"cli-{op}")
        out.append(
            common.measurement(
                f"ckpt.sync.{op}",
                machine,
                {**cfg, "ours": what},
                "MB/s",
                o["MBps"],
                baseline=(f"aws s3 cp --recursive ({op})", c["MBps"]),
                goal=common.goal(">=", 2.0, "ratio"),
                details={"ours": runs[f"ours-{op}"], "cli": runs[f"cli-{op}"]},
            )
        )
        oc = max(r["MBperCpuSecond"] or 0 for r in runs[f"ours-{op}"])
        cc = max(r["MBperCpuSecond"] or 0 for r in runs[f"cli-{op}"])
        out.append(
            common.measurement(
                f"ckpt.sync.{op}.client_cpu",
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
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    items = bench(args.files, args.file_mib, args.reps)
    for m in items:
        print(f"{m['name']:22s} {m['value']:8.1f} MB/s  ratio {m['ratio']:.2f}")
    if not args.no_write:
        print("wrote", common.write_results("ckpt_sync", items))
    return 0


if __name__ == "__main__":
    sys.exit(main())

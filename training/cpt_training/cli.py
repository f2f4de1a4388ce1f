"""``cpt-train <stage>``: the entry point of every stage container.

The stage config comes from ``--config FILE`` (JSON or YAML) or, as the operator passes it, the
``CPT_STAGE_CONFIG`` environment variable (JSON). It is validated against
``cpt_training.config`` before anything else happens; a bad config exits 2 with the offending
fields named and nothing changed. Logging is configured here, once, for the whole process.
Config values are never logged wholesale and environment values never at all (credentials live
there).

Training runs under torchrun as a module::

    torchrun ... -m cpt_training.cli train
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel, ValidationError

from cpt_training import podenv
from cpt_training.config import STAGE_CONFIG_ENV, ConfigError, parse_stage_config

log = logging.getLogger("cpt_training")

STAGES = ("tokenize", "train", "convert-to-nxd", "export-hf", "preflight", "precompile")
EXIT_BAD_CONFIG = 2


def setup_logging() -> None:
    """Once per process: INFO (or ``CPT_LOG_LEVEL``) to stderr, tagged with the rank under
    torchrun, so stdout stays free for the machine-readable lines (metrics, preflight)."""
    level_name = podenv.log_level()
    level = getattr(logging, level_name, logging.INFO)
    rank = os.environ.get("RANK")
    tag = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # Chatty third-party loggers stay at WARNING.
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _load_raw(stage: str, config_file: str | None) -> dict[str, Any]:
    if config_file is not None:
        text = Path(config_file).read_text(encoding="utf-8")
        source = config_file
        if config_file.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    else:
        text_env = os.environ.get(STAGE_CONFIG_ENV)
        if not text_env:
            raise ConfigError(f"no stage config: pass --config FILE or set {STAGE_CONFIG_ENV}")
        source = f"${STAGE_CONFIG_ENV}"
        try:
            data = json.loads(text_env)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object, got {type(data).__name__}")
    declared = data.get("stage")
    if declared is None:
        data = {**data, "stage": stage}
    elif declared != stage:
        raise ConfigError(f"config is for stage {declared!r} but the command is {stage!r}")
    return data


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: field path and message. Input values are left out on purpose."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("config",))
        lines.append(f"  {loc or '<root>'}: {err.get('msg', 'invalid')}")
    return "invalid stage config:\n" + "\n".join(lines)


def load_stage_config(stage: str, config_file: str | None = None) -> BaseModel:
    raw = _load_raw(stage, config_file)
    try:
        return parse_stage_config(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dispatch(stage: str, cfg: Any) -> int:
    """Run one stage; heavy modules (torch, NxD) are imported only for the stage that needs them.

    The stage's typed ``storage`` tuning becomes this process's storage settings first, so
    every storage the stage opens (data, checkpoints, progress) transfers with it (a stage
    config without one runs with the defaults)."""
    from cpt_training.config import StorageTuning
    from cpt_training.storage.settings import configure

    tuning = getattr(cfg, "storage", None)
    if not isinstance(tuning, StorageTuning):
        tuning = StorageTuning()
    configure(tuning.transfer_settings())
    result: Any
    if stage == "tokenize":
        from cpt_training.tokenize import run_tokenize

        result = run_tokenize(cfg)
    elif stage == "train":
        if cfg.backend == "nxd":
            from cpt_training.nxd.train import run as nxd_train

            result = nxd_train(cfg)
        else:
            from cpt_training.native.train import run as native_train

            result = native_train(cfg)
    elif stage == "convert-to-nxd":
        from cpt_training.nxd.convert import run as convert_to_nxd

        result = convert_to_nxd(cfg)
    elif stage == "export-hf":
        from cpt_training.export import run as export_hf

        result = export_hf(cfg)
    elif stage == "preflight":
        from cpt_training.preflight import run as preflight

        result = preflight(cfg)
    elif stage == "precompile":
        from cpt_training.nxd.precompile import run as precompile

        result = precompile(cfg)
    else:  # argparse already restricts the choices
        raise ConfigError(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    return int(result) if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpt-train",
        description="Run one cpt workload stage. The config comes from --config or "
        f"${STAGE_CONFIG_ENV} (JSON).",
    )
    p.add_argument("stage", choices=STAGES, help="the stage to run")
    p.add_argument("--config", metavar="FILE", help="stage config file (JSON or YAML)")
    return p


TERMINATION_LOG = Path("/dev/termination-log")
"""Kubernetes' default ``terminationMessagePath``: what a container writes there becomes its
terminated state's message, which the operator copies into the failed stage's condition."""


def report_bad_config(stage: str, exc: BaseException, termination_log: Path | None = None) -> int:
    """Print a configuration error and leave it as the pod's termination message (when
    running in a pod), so the run's condition names the field and the fix."""
    text = f"cpt-train {stage}: {exc}"
    sys.stderr.write(text + "\n")
    path = TERMINATION_LOG if termination_log is None else termination_log
    if path.exists():
        with contextlib.suppress(OSError):
            path.write_text(text[-4000:])  # the kubelet keeps at most 4 KiB
    return EXIT_BAD_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        cfg = load_stage_config(args.stage, args.config)
    except (ConfigError, OSError) as exc:
        return report_bad_config(args.stage, exc)
    log.info("cpt-train %s starting (pid %d)", args.stage, os.getpid())
    try:
        return dispatch(args.stage, cfg)
    except ConfigError as exc:
        return report_bad_config(args.stage, exc)


def entry() -> NoReturn:
    """The process entry point (``cpt-train``, ``python -m cpt_training.cli``): :func:`main`,
    then flush and leave with ``os._exit``.

    Why not a normal exit: interpreter finalization stops every thread that still wants the
    GIL, and one stopped inside torch's C++ code aborts the whole process ("terminate called
    without an active exception", exit -6) after the stage has done its work. torch keeps
    threads of its own past ``destroy_process_group`` (gloo's workers, once FSDP has used the
    group), so a rank that finished cleanly could still fail its pod now and then. Everything
    a stage writes is closed before :func:`main` returns; only the log and stdio buffers are
    left to flush. An exception still ends the process the usual way (traceback, exit 1)."""
    # A fatal signal (an abort inside torch, a crash in a native library) prints every
    # thread's Python stack to stderr: the only trace such a crash leaves in the pod log.
    faulthandler.enable(all_threads=True)
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()

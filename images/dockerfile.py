"""A small Dockerfile reader for the image tests (tests/*/test_images*.py).

It understands what our Dockerfiles use: line continuations, comments, ``ARG``, ``FROM``, ``WORKDIR``,
``COPY src... dst``, ``RUN`` (shell form), ``USER``, ``ENTRYPOINT`` (exec form), and a
``.dockerignore`` allow/deny list. It is not a general Dockerfile parser.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Instruction:
    cmd: str
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        out.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    return out


def entrypoint(instrs: list[Instruction]) -> list[str]:
    eps = [i for i in instrs if i.cmd == "ENTRYPOINT"]
    if not eps:
        return []
    value = json.loads(eps[-1].args)
    if not isinstance(value, list):
        raise ValueError("ENTRYPOINT must use the exec (JSON) form")
    return [str(v) for v in value]


def build_args(instrs: list[Instruction]) -> dict[str, str]:
    """``ARG NAME=default`` values (the last one wins); an ARG without default maps to ""."""
    out: dict[str, str] = {}
    for i in instrs:
        if i.cmd == "ARG":
            name, _, default = i.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
    return out


def base_images(instrs: list[Instruction]) -> list[str]:
    """Each ``FROM``'s image with ``${ARG}`` / ``$ARG`` replaced by the ARG's default, i.e.
    what a build without ``--build-arg`` uses."""
    args = build_args(instrs)
    out = []
    for i in instrs:
        if i.cmd != "FROM":
            continue
        ref = i.args.split()[0]
        for name, value in args.items():
            ref = ref.replace("${" + name + "}", value).replace("$" + name, value)
        out.append(ref)
    return out


def final_user(instrs: list[Instruction]) -> str | None:
    users = [i.args for i in instrs if i.cmd == "USER"]
    return users[-1] if users else None


def pip_installs(run_args: str) -> list[list[str]]:
    """The ``pip install ...`` commands of one RUN (split on ``&&`` / ``;``), as argv."""
    out = []
    for part in run_args.replace(";", "&&").split("&&"):
        argv = shlex.split(part)
        if len(argv) >= 2 and argv[0] in ("pip", "pip3") and argv[1] == "install":
            out.append(argv)
    return out


def copy_sources(args: str) -> tuple[list[str], str]:
    parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1], parts[-1]


class DockerIgnore:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a pattern matching a
    directory matches everything below it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, str]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = line[1:] if neg else line
            self.rules.append((neg, pat.strip("/")))

    def excluded(self, rel: str) -> bool:
        parts = PurePosixPath(rel).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for neg, pat in self.rules:
            hit = any(
                fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase("/" + p, "/" + pat)
                for p in prefixes
            )
            if hit:
                result = not neg
        return result

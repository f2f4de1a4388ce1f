"""Generate (or check) charts/cpt/values.schema.json from the commented values.yaml.

values.yaml is the single source of truth: each key's comment block becomes its JSON-schema
``description``, its default value gives the type, and an optional ``# @schema {...}`` line adds
constraints (enum, const, pattern, ...) and marks the key as opaque (no descent into it).
Every object the generator builds gets ``additionalProperties: false``, so a misspelt value fails
``helm install`` instead of being ignored.

Usage: ``python hack/chart/values_schema.py [--check]`` (``--check`` exits 1 on drift).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "cpt"
SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"
_KEY_RE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?:\s|$)")
_SCHEMA_TAG = "@schema "

JsonObj = dict[str, Any]


@dataclass
class KeyDoc:
    """What the comment block directly above one key says about it."""

    description: str = ""
    schema: JsonObj | None = None


@dataclass
class _Pending:
    lines: list[str] = field(default_factory=list)
    schema: JsonObj | None = None


class ValuesDocError(ValueError):
    """values.yaml breaks a documentation rule (missing comment, bad @schema line)."""


def parse_key_docs(text: str) -> dict[tuple[str, ...], KeyDoc]:
    """Map each key path to its comment block, tracking nesting by indentation.

    A blank line ends a comment block, so the file header never attaches to the first key.
    Keys inside list items and inside multi-line scalars are not documented separately.
    """
    docs: dict[tuple[str, ...], KeyDoc] = {}
    stack: list[tuple[int, str]] = []
    pending = _Pending()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped:
            pending = _Pending()
            continue
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith(_SCHEMA_TAG):
                try:
                    extra = json.loads(body[len(_SCHEMA_TAG) :])
                except json.JSONDecodeError as exc:
                    raise ValuesDocError(f"line {lineno}: bad @schema JSON: {exc}") from exc
                if not isinstance(extra, dict):
                    raise ValuesDocError(f"line {lineno}: @schema must be a JSON object")
                pending.schema = {**(pending.schema or {}), **extra}
            else:
                pending.lines.append(body)
            continue
        match = _KEY_RE.match(raw)
        if not match:  # a list item or a continuation line: not a documented key
            pending = _Pending()
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(docs[p].schema is not None for p in _prefixes(stack)):
            pending = _Pending()  # inside an opaque (@schema) value: not documented per key
            continue
        stack.append((indent, match["key"]))
        path = tuple(k for _, k in stack)
        docs[path] = KeyDoc(description=" ".join(pending.lines).strip(), schema=pending.schema)
        pending = _Pending()
    return docs


def _prefixes(stack: list[tuple[int, str]]) -> list[tuple[str, ...]]:
    keys = [k for _, k in stack]
    return [tuple(keys[: i + 1]) for i in range(len(keys))]


def _infer(value: Any, path: tuple[str, ...]) -> JsonObj:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": "string"}
    dotted = ".".join(path)
    raise ValuesDocError(
        f"{dotted}: cannot infer a schema from {value!r}; add a `# @schema {{...}}` line above it"
    )


def build_node(value: Any, path: tuple[str, ...], docs: dict[tuple[str, ...], KeyDoc]) -> JsonObj:
    """The schema of one value: the @schema override if any, else inferred (objects: closed)."""
    doc = docs.get(path)
    if path and doc is None:
        raise ValuesDocError(f"{'.'.join(path)}: not found in the values.yaml text")
    node: JsonObj = {}
    if doc is not None and doc.description:
        node["description"] = doc.description
    if doc is not None and doc.schema is not None:
        node.update(doc.schema)
        return node
    if isinstance(value, dict):
        props = {key: build_node(val, (*path, key), docs) for key, val in value.items()}
        node.update({"type": "object", "additionalProperties": False, "properties": props})
        return node
    if isinstance(value, list) or value is None:
        raise ValuesDocError(f"{'.'.join(path)}: lists and nulls need a `# @schema {{...}}` line")
    node.update(_infer(value, path))
    return node


def undocumented_keys(values: JsonObj, docs: dict[tuple[str, ...], KeyDoc]) -> list[str]:
    """Keys the generator descends into that have no prose comment (every key must have one)."""
    missing: list[str] = []

    def walk(obj: JsonObj, path: tuple[str, ...]) -> None:
        for key, val in obj.items():
            sub = (*path, key)
            doc = docs.get(sub)
            if doc is None or not doc.description:
                missing.append(".".join(sub))
            if isinstance(val, dict) and doc is not None and doc.schema is None:
                walk(val, sub)

    walk(values, ())
    return missing


def generate(chart_dir: Path = CHART_DIR) -> JsonObj:
    """Build the whole values.schema.json document from values.yaml."""
    text = (chart_dir / "values.yaml").read_text()
    values = yaml.safe_load(text) or {}
    docs = parse_key_docs(text)
    missing = undocumented_keys(values, docs)
    if missing:
        raise ValuesDocError(f"keys without a comment in values.yaml: {', '.join(missing)}")
    root = build_node(values, (), docs)
    return {"$schema": SCHEMA_DRAFT, "title": "cpt chart values", **root}


def render(schema: JsonObj) -> str:
    """Stable text form (what is committed)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the schema file drifted")
    parser.add_argument("--chart", type=Path, default=CHART_DIR, help="chart directory")
    args = parser.parse_args(argv)
    target = args.chart / "values.schema.json"
    try:
        want = render(generate(args.chart))
    except ValuesDocError as exc:
        print(f"values.yaml: {exc}", file=sys.stderr)
        return 2
    have = target.read_text() if target.exists() else ""
    if args.check:
        if have != want:
            diff = difflib.unified_diff(
                have.splitlines(True), want.splitlines(True), str(target), "generated"
            )
            sys.stderr.writelines(diff)
            print(f"{target} is stale: run python hack/chart/values_schema.py", file=sys.stderr)
            return 1
        return 0
    if have != want:
        target.write_text(want)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

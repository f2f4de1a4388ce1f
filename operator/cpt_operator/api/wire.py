"""What a run file must be before the models see it: the rules the API server applies to the
text itself, so `cpt plan` and `cpt local` accept exactly what `kubectl apply` gets stored.

* UTF-8 only (the API server takes JSON, which is UTF-8): other bytes are named with the file
  and the offset of the first bad byte.
* A key twice in one mapping is an error. Stricter than kubectl on purpose: its YAML-to-JSON
  step silently keeps the last value (even with --validate=strict), as PyYAML would; a file
  that says two things is refused rather than guessed
  (tests/integration/test_admission.py).
* `1e3` is a number, as in kubectl's YAML reader (PyYAML's YAML 1.1 rules make it a string).
* YAML aliases are bounded: a billion-laughs file is a few hundred bytes, and PyYAML shares the
  aliased objects, so the bomb only goes off later, when the spec is validated, copied or
  dumped. The expanded size is counted once, without expanding, and refused past a limit far
  above any real run file.
* Kubernetes resource quantities (`cpu: 500m`, `memory: 64Gi`) are parsed with the API
  server's grammar (``<sign><digits>[.<digits>]<suffix>``), not a permissive pattern: `.` and
  `1e400` are no quantities (the CRD checks the same with CEL's ``isQuantity``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

MAX_EXPANDED_NODES = 100_000
"""Values in a run file once its aliases are expanded (a real run has a few hundred)."""
MAX_ALIASES = 1000

_QUANTITY = re.compile(
    r"(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
MAX_QUANTITY = Decimal(2**63 - 1)
"""The API server keeps a quantity's value in an int64 (bytes, or milli-units for cpu)."""


class WireError(ValueError):
    """The text of a run file is not what the API server would accept."""


def quantity_value(text: str) -> Decimal:
    """The value of a Kubernetes quantity; ValueError naming the problem otherwise."""
    m = _QUANTITY.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 1.5, 64Gi, 100M, 1e3)"
        )
    try:
        value = Decimal(m["num"])
        suffix = m["suffix"] or ""
        if suffix in _BINARY:
            value *= _BINARY[suffix]
        elif suffix in _DECIMAL:
            value = value.scaleb(_DECIMAL[suffix])
        elif suffix:
            value = value.scaleb(int(suffix[1:]))
    except (InvalidOperation, ValueError, OverflowError):
        raise ValueError(f"{text!r} is out of range for a Kubernetes quantity") from None
    if abs(value) > MAX_QUANTITY:
        raise ValueError(f"{text!r} is out of range for a Kubernetes quantity (at most 2^63-1)")
    return value


def check_quantity(text: str) -> str:
    """Pydantic validator: a Kubernetes quantity, not negative (requests and limits)."""
    if quantity_value(text) < 0:
        raise ValueError(f"{text!r} must not be negative")
    return text


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and counts aliases, and reads `1e3` as a number
    as kubectl's YAML 1.2 reader does (PyYAML's 1.1 rules make it a string: `memory: 1e3`
    would pass `cpt plan` and be refused by the API server as a number)."""

    aliases = 0
    yaml_implicit_resolvers = {
        key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise WireError(f"more than {MAX_ALIASES} YAML aliases")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) and key in seen:
                    line = key_node.start_mark.line + 1
                    raise WireError(
                        f"line {line}: duplicate key {key!r} (first on line {seen[key]}); "
                        "kubectl would silently keep the last one"
                    )
                if isinstance(key, str | int | float | bool):
                    seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def expanded_size(value: Any, limit: int = MAX_EXPANDED_NODES) -> int:
    """How many values `value` holds with every shared (aliased) object counted each time it
    appears, computed once per object: linear in the file, not in the expansion."""
    memo: dict[int, int] = {}

    def size(v: Any) -> int:
        key = id(v)
        if key in memo:
            return memo[key]
        if isinstance(v, dict):
            n = 1 + sum(size(k) + size(x) for k, x in v.items())
        elif isinstance(v, list):
            n = 1 + sum(size(x) for x in v)
        else:
            return 1
        memo[key] = n = min(n, limit + 1)
        return n

    return size(value)


def load_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a run file, under the rules above (WireError names the file)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireError(
            f"{path}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
    try:
        docs = list(yaml.load_all(text, Loader=_StrictLoader))
    except WireError as err:
        raise WireError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise WireError(f"{path}: not valid YAML: {err}") from None
    for doc in docs:
        if expanded_size(doc) > MAX_EXPANDED_NODES:
            raise WireError(
                f"{path}: more than {MAX_EXPANDED_NODES} values once its YAML aliases are "
                "expanded (an alias bomb?)"
            )
    return docs

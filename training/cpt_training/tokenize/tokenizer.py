"""Loading the tokenizer (local, ``s3://`` or ``hf://`` dir) as a Rust tokenizer plus EOS id,
without importing transformers/torch unless only a slow tokenizer is there."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt_training.storage import open_storage
from cpt_training.tokenize.layout import TokenizeError


@dataclass(frozen=True)
class LoadedTokenizer:
    """The Rust tokenizer as JSON (cheap to ship to workers), its EOS id and a digest."""

    spec: str
    eos_id: int
    vocab_size: int
    digest: str
    loaded: Any = field(default=None, compare=False, repr=False)
    """The Rust tokenizer :func:`load_tokenizer` already parsed (a 32k vocabulary's JSON
    takes about 50 ms to parse, once per process is enough)."""

    def rust(self) -> Any:
        if self.loaded is not None:
            return self.loaded
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.spec)


_HF_RE = re.compile(r"^hf://(?P<repo>[^@]+?)(?:@(?P<rev>.+))?$")
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
]


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _eos_from_files(local: Path, rust: Any) -> int | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = local / name
        if not p.is_file():
            continue
        content = _token_content(json.loads(p.read_text()).get("eos_token"))
        if content is not None:
            tid = rust.token_to_id(content)
            if tid is not None:
                return int(tid)
    return None


def _from_local_dir(local: Path, where: str) -> tuple[Any, int | None]:
    """(Rust tokenizer, eos id) of a tokenizer dir. ``tokenizer.json`` is read with the
    ``tokenizers`` library directly (no transformers/torch import); a slow-only tokenizer
    (e.g. sentencepiece ``tokenizer.model``) is converted by transformers."""
    if (local / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(local / "tokenizer.json"))
        return rust, _eos_from_files(local, rust)
    if not any((local / n).is_file() for n in _TOKENIZER_FILES):
        raise TokenizeError(f"tokenizerUri {where!r} is not a directory with tokenizer files")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(local))
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizeError(f"tokenizerUri {where!r} has no fast (Rust) tokenizer")
    return backend, tok.eos_token_id


def load_tokenizer(tokenizer_uri: str) -> LoadedTokenizer:
    """Resolve ``tokenizer_uri`` (local dir, ``s3://`` dir, ``hf://org/name[@rev]``) to a
    fast tokenizer with an EOS token."""
    with tempfile.TemporaryDirectory(prefix="cpt-tok-") as tmp:
        m = _HF_RE.match(tokenizer_uri)
        if m:
            from huggingface_hub import snapshot_download

            local = Path(
                snapshot_download(
                    m["repo"],
                    revision=m["rev"],
                    allow_patterns=_TOKENIZER_FILES,
                    token=os.environ.get("HF_TOKEN") or None,
                    local_dir=tmp,
                )
            )
        else:
            st = open_storage(tokenizer_uri)
            found = st.local_path()
            if found is None:
                st.download_dir("", tmp)
                found = Path(tmp)
            local = found
        if not local.is_dir():
            raise TokenizeError(
                f"tokenizerUri {tokenizer_uri!r} is not a directory with tokenizer files"
            )
        rust, eos = _from_local_dir(local, tokenizer_uri)
    if eos is None:
        raise TokenizeError(f"tokenizerUri {tokenizer_uri!r} defines no eos_token")
    spec = rust.to_str()
    return LoadedTokenizer(
        spec=spec,
        eos_id=int(eos),
        vocab_size=int(rust.get_vocab_size(with_added_tokens=True)),
        digest=hashlib.sha256(spec.encode()).hexdigest(),
        loaded=rust,
    )

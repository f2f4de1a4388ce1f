"""Hugging Face dataset sources as the seed run needs them, offline: a local directory laid
out as the Hub lays out a dataset's Parquet conversion (``refs/convert/parquet``: one
directory per config, ``<split>/`` or ``partial-<split>/`` of ``NNNN.parquet``), read by the
real ``datasets`` library and tokenized by the real tokenize stage.

We test these aspects:
- ``revision: refs/convert/parquet`` + ``hfConfig`` reads exactly that config's split
  (``partial-train`` too), not the other configs' files next to it.
- ``dataFiles`` reads exactly the listed files as the split.
- A loading-script dataset stops the stage with exit code 2 and a message naming the field
  and both fixes, also left as the pod's termination message (what the run's condition
  shows).
- Bad combinations are rejected when the spec is validated (before any child exists), naming
  the field: the Parquet conversion without hfConfig, dataFiles with hfConfig or with uri.
- examples/run.yaml reads the seed's dataset through the Parquet conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from cpt_operator.api.models import ContinualPretrainSpec
from cpt_training import cli
from cpt_training import tokenize as tk
from cpt_training.config import PARQUET_CONVERSION, DataSource, TokenizeStage
from fixtures.textgen import make_texts, train_tokenizer

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(make_texts(200, seed=7), vocab_size=300, out_dir=out)
    return out


def write_parquet(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)


@pytest.fixture
def conversion(tmp_path: Path) -> Path:
    """wikicorpus-like conversion: raw_en (large: partial-train), raw_es, and a README."""
    root = tmp_path / "wikicorpus"
    write_parquet(root / "raw_en" / "partial-train" / "0000.parquet", ["en a", "en b"])
    write_parquet(root / "raw_en" / "partial-train" / "0001.parquet", ["en c"])
    write_parquet(root / "raw_es" / "train" / "0000.parquet", ["es a", "es b"])
    (root / "README.md").write_text("---\nlicense: gfdl\n---\n")
    return root


def stage(tok_dir: Path, out: Path, **source: object) -> TokenizeStage:
    return TokenizeStage.model_validate(
        {
            "sources": [source],
            "tokenizer_uri": str(tok_dir),
            "output_uri": str(out),
            "block_size": 4,
        }
    )


def docs(cfg: TokenizeStage) -> list[str]:
    return sorted(d for batch in tk.shard_documents(cfg, 0) for d in batch)


def test_the_parquet_conversion_reads_one_configs_split_including_partial(
    conversion: Path, tok_dir: Path, tmp_path: Path
) -> None:
    cfg = stage(
        tok_dir,
        tmp_path / "out",
        hfDataset=str(conversion),
        hfConfig="raw_en",
        revision=PARQUET_CONVERSION,
    )
    assert docs(cfg) == ["en a", "en b", "en c"]
    result = tk.run_tokenize(cfg.model_copy(update={"shard_index": 0}))
    assert result.docs == 3 and result.blocks > 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["totalBlocks"] > 0


def test_data_files_read_exactly_the_listed_files(
    conversion: Path, tok_dir: Path, tmp_path: Path
) -> None:
    cfg = stage(
        tok_dir,
        tmp_path / "out",
        hfDataset=str(conversion),
        dataFiles=["raw_es/train/*.parquet", "raw_en/partial-train/0001.parquet"],
    )
    assert docs(cfg) == ["en c", "es a", "es b"]


def test_a_loading_script_dataset_fails_with_the_field_and_the_fix(
    tmp_path: Path, tok_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "wikicorpus"
    repo.mkdir()
    (repo / "wikicorpus.py").write_text("# a datasets loading script\n")
    cfg = stage(tok_dir, tmp_path / "out", hfDataset=str(repo), hfConfig="raw_en")
    config_file = tmp_path / "stage.json"
    config_file.write_text(cfg.model_dump_json(by_alias=True))
    term = tmp_path / "termination-log"
    term.write_text("")
    monkeypatch.setattr(cli, "TERMINATION_LOG", term)
    assert cli.main(["tokenize", "--config", str(config_file)]) == cli.EXIT_BAD_CONFIG
    said = term.read_text()
    for text in (
        "spec.data.sources[0].hfDataset",
        "loading-script dataset (wikicorpus.py)",
        f"revision: {PARQUET_CONVERSION}",
        "hfConfig",
        "dataFiles",
    ):
        assert text in said, said


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ({"hfDataset": "wikicorpus", "revision": PARQUET_CONVERSION}, "set hfConfig"),
        (
            {"hfDataset": "wikicorpus", "hfConfig": "raw_en", "dataFiles": ["raw_en/x.parquet"]},
            "drop hfConfig",
        ),
        ({"uri": "s3://b/corpus/", "dataFiles": ["*.parquet"]}, "dataFiles selects files"),
    ],
)
def test_bad_combinations_are_rejected_at_validation_naming_the_field(
    source: dict[str, object], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        DataSource.model_validate(source)
    spec = yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())["spec"]
    spec["data"]["sources"] = [source]
    with pytest.raises(ValidationError) as exc:
        ContinualPretrainSpec.model_validate(spec)
    assert exc.value.errors()[0]["loc"][:3] == ("data", "sources", 0)


def test_the_seed_example_reads_wikicorpus_through_the_parquet_conversion() -> None:
    spec = ContinualPretrainSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "run.yaml").read_text())["spec"]
    )
    (src,) = spec.data.sources
    assert src.hf_dataset == "wikicorpus" and src.hf_config == "raw_en"
    assert src.revision == PARQUET_CONVERSION
    assert src.hf_data_files() == {"train": ["raw_en/*train/*.parquet"]}


def test_data_files_change_the_config_hash_only_when_set(tok_dir: Path, tmp_path: Path) -> None:
    """Data tokenized before dataFiles existed keeps its config hash (a rerun reuses it);
    a source with dataFiles hashes differently from one without."""
    plain = stage(tok_dir, tmp_path / "a", hfDataset="x", hfConfig="y")
    dumped = plain.model_dump(mode="json")["sources"][0]
    assert dumped["data_files"] is None
    # Pinned at format v2 (blocks never span sources); v1 was a7a4c38ed0d44fe0.
    assert tk.config_hash(plain, "d") == "395ad341b6b70f46"
    weighted = stage(tok_dir, tmp_path / "a", hfDataset="x", hfConfig="y", weight=0.3, role="r")
    assert tk.config_hash(weighted, "d") == tk.config_hash(plain, "d"), "sampling, not tokens"
    listed = stage(tok_dir, tmp_path / "a", hfDataset="x", dataFiles=["y/*.parquet"])
    assert tk.config_hash(listed, "d") != tk.config_hash(plain, "d")

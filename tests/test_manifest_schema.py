"""The versioned schema files under manifests/ agree with hdvg/manifest/schema.py, and the
written parts carry the version readers check."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hdvg.manifest.read import TABLES, schema_document, schema_path
from hdvg.manifest.schema import SCHEMA_VERSION, clips_schema, sources_schema
from hdvg.sources import read_sources

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("table", TABLES)
def test_schema_file_matches_schema_py(table):
    path = schema_path(ROOT, table)
    assert path.exists(), f"missing {path}: run `python -m hdvg.manifest.read .`"
    doc = json.loads(path.read_text())
    assert doc == schema_document(table), f"{path} is stale: run `python -m hdvg.manifest.read .`"
    arrow = clips_schema([]) if table == "clips" else sources_schema()
    assert [(c["name"], c["type"]) for c in doc["columns"]] == [
        (f.name, str(f.type)) for f in arrow
    ]


def test_changelog_has_current_version():
    text = (ROOT / "manifests" / "CHANGELOG.md").read_text()
    assert f"## v{SCHEMA_VERSION}" in text


@pytest.mark.parametrize("name", ["sources.txt", "sources.csv", "sources.jsonl"])
def test_example_source_lists_parse(name):
    tasks = read_sources(ROOT / "manifests" / "examples" / name)
    assert len(tasks) >= 3 and all(t.url for t in tasks)


def test_written_parts_carry_the_version(curated):
    for table in TABLES:
        for p in sorted((curated / "manifest" / table).glob("part-*.parquet")):
            meta = pq.read_schema(p).metadata
            assert meta[b"hdvg_schema_version"] == str(SCHEMA_VERSION).encode()

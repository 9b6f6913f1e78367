"""Manifests: the Parquet `clips` and `sources` tables beside the shards, and the tools
auditors use on them."""

from .schema import SCHEMA_VERSION, clips_schema, sources_schema

__all__ = ["SCHEMA_VERSION", "clips_schema", "sources_schema"]

"""Manifest schema (versioned). Score columns are appended per pipeline: each stage
declares its `score_columns`, so every part of one run has the same schema."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

CLIP_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("clip_id", pa.string()),
    ("source_id", pa.string()),
    ("source_url", pa.string()),
    ("clip_index", pa.int32()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),
    ("duration_s", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("fps", pa.float64()),
    ("codec", pa.string()),
    ("cut_method", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("reasons", pa.list_(pa.string())),
    ("error", pa.string()),
    ("decisions", pa.string()),  # JSON: [{stage, column, score, op, threshold, passed, reason}]
    ("caption", pa.string()),
    ("caption_model", pa.string()),
    ("source_clip_id", pa.string()),
    ("source_caption", pa.string()),
    ("shard", pa.string()),
    ("tar_offset", pa.int64()),
    ("size_bytes", pa.int64()),
    ("sha256", pa.string()),
    ("pipeline_version", pa.string()),
    ("config_hash", pa.string()),
    ("schema_version", pa.int32()),
    ("removed_at", pa.string()),
    ("removed_reason", pa.string()),
]

SOURCE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("source_id", pa.string()),
    ("source_url", pa.string()),
    ("order", pa.int64()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("error", pa.string()),
    ("input_id", pa.string()),
    ("input_caption", pa.string()),
    ("size_bytes", pa.int64()),
    ("sha256", pa.string()),
    ("container", pa.string()),
    ("codec", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("coded_width", pa.int32()),
    ("coded_height", pa.int32()),
    ("rotation", pa.int32()),
    ("sar", pa.float64()),
    ("dar", pa.float64()),
    ("fps", pa.float64()),
    ("vfr", pa.bool_()),
    ("duration_s", pa.float64()),
    ("start_time_s", pa.float64()),
    ("bitrate", pa.int64()),
    ("has_audio", pa.bool_()),
    ("n_frames", pa.int64()),
    ("n_scenes", pa.int32()),
    ("n_clips", pa.int32()),
    ("n_accepted", pa.int32()),
    ("timings", pa.string()),  # JSON {stage: seconds}
    ("pipeline_version", pa.string()),
    ("config_hash", pa.string()),
    ("schema_version", pa.int32()),
]


def clips_schema(score_columns: list[str]) -> pa.Schema:
    fixed = {n for n, _ in CLIP_COLUMNS}
    extra = [(c, pa.float64()) for c in score_columns if c not in fixed]
    return pa.schema(CLIP_COLUMNS + extra, metadata={"hdvg_schema_version": str(SCHEMA_VERSION)})


def sources_schema() -> pa.Schema:
    return pa.schema(SOURCE_COLUMNS, metadata={"hdvg_schema_version": str(SCHEMA_VERSION)})

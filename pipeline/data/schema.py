"""The columns of every output chunk: the input's pass-through columns, then the result columns."""

from __future__ import annotations

import pyarrow as pa

RESULT_FIELDS = [
    pa.field("row_index", pa.int64()),
    pa.field("caption", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("n_prompt_tokens", pa.int32()),
    pa.field("n_output_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("frames", pa.int32()),
    pa.field("frame_times", pa.list_(pa.float64())),  # seconds of each frame used (video rows)
    pa.field("prompt", pa.string()),
    pa.field("prompt_name", pa.string()),  # generation.prompts' name, or the index in a list of prompts
    pa.field("model", pa.string()),
    pa.field("flags", pa.list_(pa.string())),  # data/quality.py: repetition, truncated, empty
    pa.field("dedup_of", pa.int64()),  # generation.dedup: the row whose caption this one reused
]
RESULT_NAMES = {f.name for f in RESULT_FIELDS}


def passthrough_name(name: str) -> str:
    """An input column that shares a result column's name is kept under `input_<name>`."""
    return f"input_{name}" if name in RESULT_NAMES else name


# Manifest columns that never reach the output: the media bytes, and a manifest's own row errors
# (they become the `error` column).
def hidden_columns(bytes_column: str | None) -> set[str]:
    return {c for c in (bytes_column, "__error__") if c}


def output_schema(manifest_schema: pa.Schema, bytes_column: str | None) -> pa.Schema:
    """The columns of every chunk: the input columns (less the media bytes, renamed where they clash
    with a result column), then the result columns, as the chunk writer builds them."""
    hidden = hidden_columns(bytes_column)
    fields = [f.with_name(passthrough_name(f.name)) for f in manifest_schema if f.name not in hidden]
    return pa.schema(fields + RESULT_FIELDS)

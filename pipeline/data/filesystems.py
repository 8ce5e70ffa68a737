"""Which filesystem a URI names: pyarrow's own (s3, gs, hdfs, abfs, file), else fsspec's
implementation of its scheme, wrapped for pyarrow, so any fsspec URI (memory, ssh, webhdfs, ...)
reads as a pyarrow filesystem everywhere the pipeline opens files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs


def from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for `uri`; pyarrow's error when neither knows the scheme."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:
        import fsspec  # a dependency of the Hugging Face stack; imported only for the schemes it adds

        if uri.split("://", 1)[0] not in fsspec.available_protocols():
            raise
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path

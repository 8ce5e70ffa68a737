"""The WebDataset scan index (issue 16): opening a tar manifest by scanning every member header
against reading the index a job keeps in its output dir.

    python benchmarks/bench_wds_index.py [--tars 50] [--members 2000] [--work /tmp/llava-batch-wds-index]

`--tars` tars of `--members` small members each (half .jpg, half .txt: `--members / 2` samples) on
the local filesystem, in the page cache after the first pass. Prints one JSON object: seconds to
open the manifest either way. On object storage each header scanned is a ranged read, so the scan
costs far more there; the index is one Parquet file. (An index is only trusted on a filesystem that
reports mtimes: fsspec's in-memory one does not, so it is not measured here.)
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.webdataset import open_webdataset, save_index  # noqa: E402


def write_tars(work: Path, tars: int, members: int) -> list[Path]:
    paths = []
    for t in range(tars):
        path = work / "tars" / f"{t:05d}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with tarfile.open(path, "w") as tar:
                for m in range(members):
                    data = bytes(200)
                    info = tarfile.TarInfo(f"{t:05d}-{m // 2:06d}.{'jpg' if m % 2 == 0 else 'txt'}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def timed(fs, paths: list[str], index: Path | None) -> tuple[float, object]:
    started = time.perf_counter()
    manifest = open_webdataset(fs, paths, index)
    return time.perf_counter() - started, manifest


def measure(fs, paths: list[str], index: Path) -> dict:
    index.unlink(missing_ok=True)
    scan_s, manifest = timed(fs, paths, None)
    save_index(manifest, index)
    index_s, again = timed(fs, paths, index)
    assert again.scanned == 0 and again.files == manifest.files
    return {"rows": manifest.num_rows, "scan_s": round(scan_s, 3), "index_s": round(index_s, 3),
            "index_mib": round(index.stat().st_size / 2**20, 2), "ratio": round(scan_s / index_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tars", type=int, default=50)
    p.add_argument("--members", type=int, default=2000)
    p.add_argument("--work", default="/tmp/llava-batch-wds-index")
    args = p.parse_args()
    work = Path(args.work)
    paths = write_tars(work, args.tars, args.members)
    measure(pafs.LocalFileSystem(), [str(p) for p in paths], work / "index.parquet")  # warm the page cache
    local = measure(pafs.LocalFileSystem(), [str(p) for p in paths], work / "index.parquet")
    print(json.dumps({"tars": args.tars, "members_per_tar": args.members, "local": local}, indent=1))


if __name__ == "__main__":
    main()

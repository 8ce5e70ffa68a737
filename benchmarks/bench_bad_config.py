"""What a refused job costs: wall time and peak RSS of `llava-batch run` on bad jobs, until exit 2.

    python benchmarks/bench_bad_config.py [--repeat 5]

Each case is a fresh `python -m pipeline.cli run JOB` process (what the `llava-batch` script runs),
timed from spawn to exit; its peak RSS comes from the kernel's accounting of that child (wait4).
Cases: an unknown config key, a manifest lacking the id column the job names, a model dir that does
not exist, and a model dir whose safetensors file is truncated (written here as files, no torch).
For scale, the last row is a process that only imports torch and transformers, what every run paid
before the checks moved ahead of those imports. Figures, not assertions: they depend on the machine
and on how busy it is, and the median of --repeat runs is printed next to the slowest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.testing.jobs import job_sections, write_job, write_manifest  # noqa: E402


def broken_model_dir(root: Path) -> Path:
    """The files a llava-hf dir has, with a safetensors file cut short (its header says 4096 bytes)."""
    model = root / "truncated-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (model / name).write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}).encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)
    return model


def jobs(root: Path) -> dict[str, Path]:
    manifest = write_manifest(root / "m.parquet", {"path": ["a.png"]})
    missing = root / "no-such-model"
    cases = {
        "unknown key": (missing, {"generation": {"max_tokens": 5}}),
        "missing manifest column": (missing, {"input": {"id_column": "uid"}}),
        "missing model dir": (missing, {}),
        "truncated safetensors": (broken_model_dir(root), {}),
    }
    out = {}
    for i, (name, (model, change)) in enumerate(cases.items()):
        sections = job_sections(model, manifest, root / f"out{i}")
        for section, values in change.items():
            sections[section].update(values)
        out[name] = write_job(root / f"job{i}.toml", sections)
    return out


def measure(argv: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return wall, usage.ru_maxrss / 1024, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        commands = {name: [sys.executable, "-m", "pipeline.cli", "run", str(job)]
                    for name, job in jobs(Path(tmp)).items()}
        commands["(import torch, transformers)"] = [sys.executable, "-c", "import torch, transformers"]
        print(f"{'case':32} {'exit':>4} {'wall s (median / max)':>22} {'peak RSS MiB (max)':>19}")
        for name, argv in commands.items():
            runs = [measure(argv) for _ in range(args.repeat)]
            walls, peaks, codes = zip(*runs, strict=True)
            code = codes[0] if len(set(codes)) == 1 else "/".join(map(str, sorted(set(codes))))
            print(f"{name:32} {code:>4} {statistics.median(walls):>11.2f} / {max(walls):<8.2f}"
                  f" {max(peaks):>19.0f}")


if __name__ == "__main__":
    main()

"""benchmarks/device_check.py on the CPU (--quick), as an operator runs it: one subprocess, its
three files, every section reporting results or its error, and the fast engine token-exact with
the hf engine in fp32 on all three families."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
SECTIONS = ("environment", "correctness", "speed_model", "mindie", "captions", "roofline", "targets")

# A host without PyAV, imitated: every import finder is told that `av` does not exist.
_WITHOUT_AV = r"""
import importlib.util, sys
class Hide:
    def __init__(self, inner): self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return None
        return self.inner.find_spec(name, path, target) if hasattr(self.inner, "find_spec") else None
    def __getattr__(self, attr):  # find_distributions and the rest: importlib.metadata looks here too
        return getattr(self.inner, attr)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
assert importlib.util.find_spec("av") is None
spec = importlib.util.spec_from_file_location("device_check", {script!r})
device_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_check)
assert device_check.missing_av_note() is not None
import io
import pipeline.job, pipeline.bench.perf  # import the media decoder, which must not need PyAV
from pipeline.data.media import MediaError, decode_media
from pipeline.testing.demo import synthetic_image
assert synthetic_image(0).size == (96, 72)
buf = io.BytesIO()
synthetic_image(0).save(buf, "PNG")
buf.seek(0)
assert decode_media(buf, video_frames=4, max_image_pixels=10**8).kind == "image"
mp4 = io.BytesIO(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
try:
    decode_media(mp4, video_frames=4, max_image_pixels=10**8)
except MediaError as e:
    print("refused:", e)
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, out


@pytest.mark.slow
def test_quick_cpu_run_reports_every_section(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("device_check.json", "device_check.csv", "device_check.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "device_check.json").read_text())
    for name in SECTIONS:
        entry = report[name]
        if entry["status"] == "error":
            assert entry["error"]["type"] and entry["error"]["message"], name
        else:
            assert entry["status"] == "ok", f"{name}: {entry}"
            assert set(entry) - {"status", "seconds"}, f"{name} has no results"
        assert f"device_check: {name}: " in proc.stderr  # its progress line
    header = next(csv.reader(open(out / "device_check.csv")))
    assert header[:2] == ["mode", "batch_size"] and "tokens_per_s" in header
    assert (out / "device_check.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "_work").exists()  # models and media are removed unless --work is given


@pytest.mark.slow
def test_fp32_fast_engine_matches_hf_on_every_family(quick_run):
    _, out = quick_run
    correctness = json.loads((out / "device_check.json").read_text())["correctness"]
    assert correctness["status"] == "ok", correctness
    assert correctness["summary"]["float32_fast_vs_hf"] == {"llava": 1.0, "llava_next": 1.0, "llava_next_video": 1.0}
    for family, result in correctness["families"].items():
        fp32 = result["float32"]["fast_vs_hf"]
        assert fp32["rows_identical"] == 1.0 and fp32["tokens"] > fp32["rows"], family  # captions, not empties


@pytest.mark.slow
def test_without_pyav_the_pipeline_still_imports_and_video_use_is_refused():
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_AV.format(script=str(SCRIPT))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: video decoding needs PyAV" in proc.stdout

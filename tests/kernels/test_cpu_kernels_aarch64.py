"""The kernels compile for the CPU the Ascend hosts run: aarch64 (Kunpeng 920), with Debian's cross
compiler (g++-aarch64-linux-gnu, which .ci/run installs) against this torch's own headers. There the
x86 vector paths must be out of the way and the plain C++ path is what runs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from pipeline.kernels import cpu as cpu_kernels

CROSS = "aarch64-linux-gnu-g++"
EM_AARCH64 = 183  # ELF e_machine
# The Kunpeng 920's core: a cross build cannot ask the machine with -mcpu=native.
KUNPENG = "-mcpu=tsv110"


def cxx_standard() -> str:
    """The C++ standard this torch's headers need (they say so when it is not met)."""
    aten = Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h"
    return "-std=c++20" if "C++20" in aten.read_text() else "-std=c++17"


@pytest.fixture(scope="module")
def cross_compiler() -> str:
    compiler = shutil.which(CROSS)
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail(f"{CROSS} is missing: .ci/run installs g++-aarch64-linux-gnu")
        pytest.skip(f"{CROSS} not installed here (apt-get install g++-aarch64-linux-gnu); CI runs this")
    return compiler


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["native", "scalar"])
def test_the_kernels_compile_for_aarch64(cross_compiler, variant, tmp_path):
    flags = [KUNPENG if f == "-mcpu=native" else f for f in cpu_kernels.cflags(variant, machine="aarch64")]
    assert KUNPENG in flags, "the aarch64 build tunes for the CPU"
    obj = tmp_path / f"cpu_kernels-{variant}.o"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    done = subprocess.run([cross_compiler, cxx_standard(), "-fPIC", *flags, *includes, "-c",
                           str(cpu_kernels.SOURCE), "-o", str(obj)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    header = obj.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64

"""constraints-cuda.txt is what the resolver gives for a CUDA install (issue 21, item 6).

``.ci/constraints-cuda.sh`` runs ``uv pip compile`` against PyPI for Linux x86_64 (metadata only,
no wheel downloaded); the committed file must be exactly its output, and pin the same versions as
constraints.txt for every package both name (only torch's CUDA dependencies are new).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = re.compile(r"dns error|Connect|Failed to fetch|network", re.IGNORECASE)


def pins(path: Path) -> dict[str, str]:
    """name (normalised) -> version of every ``name==version`` line."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).is_file():
        pytest.skip("uv is not installed (make venv installs it)")
    return found


def test_cuda_constraints_agree_with_the_cpu_pins():
    cpu, cuda = pins(ROOT / "constraints.txt"), pins(ROOT / "constraints-cuda.txt")
    assert cuda["torch"] == cpu["torch"]
    assert any(name.startswith("nvidia-cublas") for name in cuda), "no CUDA libraries: not the CUDA build"
    differ = {n: (cpu[n], cuda[n]) for n in cpu.keys() & cuda.keys() if cpu[n] != cuda[n]}
    assert not differ


def test_committed_cuda_constraints_are_what_uv_resolves(tmp_path):
    out = tmp_path / "constraints-cuda.txt"
    proc = subprocess.run([str(ROOT / ".ci/constraints-cuda.sh"), uv(), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode and UNREACHABLE.search(proc.stderr):
        pytest.skip(f"PyPI cannot be reached from here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == (ROOT / "constraints-cuda.txt").read_text(), (
        "constraints-cuda.txt is stale: run .ci/constraints-cuda.sh"
    )

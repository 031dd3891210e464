"""The benchmark script runs end to end (a smoke test: no timing is asserted here;
speed is measured by bench/, never by tests)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--post",
                          "--backends", "numpy", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    text = json.dumps(data)
    for key in ("numpy", "torch eager", "floor"):
        assert key in text, f"{key} missing from the benchmark's JSON"

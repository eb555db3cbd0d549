"""A short churn soak (benchmarks/churn.py): peers SIGTERMed, SIGKILLed and restarted under generating clients."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts peer processes

REPO = Path(__file__).resolve().parent.parent


def test_generations_under_churn_are_exact(tmp_path):
    """With a peer that never churns, every generation must equal transformers' tokens: failover replays exactly."""
    out = tmp_path / "churn.json"
    result = subprocess.run([sys.executable, "-m", "benchmarks.churn", "--minutes", "0.5", "--fault-every", "3", "--seed", "1",
                             "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    counts = report["counts"]
    assert counts["generations"] >= 6 and counts["SIGTERM"] + counts["SIGKILL"] + counts["restart"] >= 3, counts
    assert counts["identical"] == counts["generations"], (counts, report["unjustified_failures"])

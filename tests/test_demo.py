"""script/demo.py end to end (the real server, one edit over HTTP): what it prints is what a person reads."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.cog_server import ROOT, free_port


def test_the_demo_prints_its_lines_and_the_metrics_not_the_servers_records(tiny_dir, tmp_path):
    env = {**os.environ, "FLUX_WEIGHTS": str(tiny_dir)}
    args = ["--steps", "4", "--port", str(free_port()), "--out", str(tmp_path), "--format", "png"]
    run = subprocess.run(
        [sys.executable, "script/demo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = run.stdout + run.stderr
    assert not [line for line in printed.splitlines() if line.startswith("{")], printed[:2000]  # coglet's JSON
    assert "torchvision" not in printed
    assert "Using seed: 42" in run.stdout and "Step 4/4" in run.stdout
    assert re.search(r"^  transformer_calls +4$", run.stdout, re.M), run.stdout
    seconds = re.search(r"^  seconds +(.*)$", run.stdout, re.M).group(1)  # seconds per phase, on one line
    assert re.search(r"(^|, )denoise \d+\.\d{3}(, |$)", seconds) and re.search(r"(^|, )text \d", seconds), seconds
    assert re.search(r"^  predict_time +\d+\.\d{3}\nWrote ", run.stdout, re.M), run.stdout
    assert (tmp_path / "edited.png").stat().st_size > 0
    assert f"Wrote {tmp_path / 'edited.png'}" in run.stdout
    assert "Setup complete" in (tmp_path / "server.log").read_text()  # the server's records are kept there

"""The README's examples run as written on a fresh clone: the library example (the tiny model, `flux` importable
from the environment script/setup makes, from any directory), and `script/serve --tiny` answering the README's
HTTP request."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image

from tests.cog_server import running_server

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_block(heading: str, language: str) -> str:
    """The first ```language block after the line `heading`."""
    section = README.split(f"\n{heading}\n", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def workdir(tmp_path: Path) -> Path:
    """A directory outside the repository that has its examples and .venv, as the README's relative paths expect."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def run_bash(block: str, cwd: Path, port: str) -> str:
    """A README bash block, run as written but against the server on `port`; its output."""
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace("localhost:5000", f"localhost:{port}")],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_library_example_runs_as_written(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code_block("## As a library", "python")],
        cwd=workdir(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seed, calls = out.stdout.split()[:2]
    assert (seed, calls) == ("0", "18")  # go fast: 18 of 28 steps
    assert PIL.Image.open(tmp_path / "out" / "edited-library.png").size == (1248, 832)


def test_serve_tiny_answers_the_readmes_http_requests(tmp_path):
    """The HTTP section's request, and the LoRA section's local try with a LoRA written by flux.tiny."""
    curl, lora = code_block("### HTTP", "bash"), code_block("### LoRA", "bash")
    assert "localhost:5000" in curl and "localhost:5000" in lora
    cwd = workdir(tmp_path / "work")
    with running_server(None, tmp_path / "server", args=("--tiny",)) as server:
        port = server.url.rsplit(":", 1)[1]
        run_bash(curl, cwd, port)
        metrics = ast.literal_eval(run_bash(lora, cwd, port))
        logs = server.log_text()
    edited = PIL.Image.open(cwd / "edited.webp")
    assert edited.format == "WEBP" and edited.size == (1248, 832)
    assert "Serving the tiny RANDOM-weight model" in logs
    assert metrics["loras"] == 1 and metrics["lora_reused"] is False and "lora_load" in metrics["seconds"]


def test_the_readme_and_the_schema_name_the_same_input_formats_and_each_loads(tmp_path):
    """input_image's row in the README and its description in predict.py list the same formats, and each of
    them is read by the server's loader."""
    from flux import images
    from script.openapi_schema import build_schema
    from tests.conftest import make_image

    row = next(line for line in README.splitlines() if line.startswith("| `input_image` |"))
    described = build_schema()["components"]["schemas"]["Input"]["properties"]["input_image"]["description"]
    formats = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}
    assert [f for f in formats if f in row] == [f for f in formats if f in described] == list(formats)
    for name, pil_format in formats.items():
        path = tmp_path / f"input.{name}"
        make_image(64, 48).save(path, format=pil_format)
        assert images.load_image(path).size == (64, 48), name


def test_the_readme_says_megapixels_is_a_string():
    row = next(line for line in README.splitlines() if line.startswith("| `megapixels` |"))
    assert '`"0.25"`' in row and "422" in row

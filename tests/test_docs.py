"""The README and docs/ as a newcomer reads them: every relative link resolves (file and heading), and the examples
run as written on a fresh clone: the library example (the tiny model, `flux` importable from the environment
script/setup makes, from any directory), `script/serve --tiny` answering the README's HTTP request, and the local
LoRA try; the inputs table says what the schema says."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from tests.cog_server import running_server

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()


def code_block(page: str, heading: str, language: str) -> str:
    """The first ```language block after the line `heading` of `page` (relative to the repository)."""
    section = (ROOT / page).read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown page: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250
    for heading in ("## Two commands", "## Serve it and send an edit", "## Inputs", "## Deploy to Replicate"):
        assert f"\n{heading}\n" in README


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {target} (no such heading)"


def test_docs_name_only_files_that_exist():
    """Every docs page is linked from the README, and every `path` a page names in backticks exists."""
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in README, page.name
    for page in PAGES:
        for name in re.findall(
            r"`((?:docs|flux|serving|measure|script|tests|deploy)/[\w./-]+\.(?:py|md|json))`", page.read_text()
        ):
            assert (ROOT / name).exists(), f"{page.name} names {name}"


def workdir(tmp_path: Path) -> Path:
    """A directory outside the repository that has its examples and .venv, as the docs' relative paths expect."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("examples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def run_bash(block: str, cwd: Path, port: str) -> str:
    """A bash block, run as written but against the server on `port`; its output."""
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
        [sys.executable, "-c", code_block("docs/development.md", "## As a library", "python")],
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


def test_serve_tiny_answers_the_docs_http_requests(tmp_path):
    """The README's request, and docs/editing.md's local LoRA try with a LoRA written by flux.tiny."""
    curl = code_block("README.md", "## Serve it and send an edit", "bash")
    lora = code_block("docs/editing.md", "## LoRA", "bash")
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


def test_the_measuring_tools_table_matches_the_package():
    """docs/development.md lists every module of measure/ once, and nothing that is not there."""
    text = (ROOT / "docs" / "development.md").read_text().split("## The measuring tools", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| `")]
    listed = re.findall(r"`(\w+)\.py`", "\n".join(first_cells))
    modules = sorted(p.stem for p in (ROOT / "measure").glob("*.py") if p.stem != "__init__")
    assert sorted(listed) == modules

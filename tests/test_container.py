"""What `cog build` makes of this directory: cog.yaml's torch/CUDA pair is one Cog knows, the keys are ones
Cog does not deprecate, the container's and the CPU environment's requirements agree where they should, and
.dockerignore keeps the weights, virtualenvs, outputs, caches and .git out of the image."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COG_YAML = yaml.safe_load((ROOT / "cog.yaml").read_text())
TABLE = json.loads((ROOT / "deploy" / "cog-torch-compatibility.json").read_text())

# cog.yaml keys of Cog 0.23 (docs/yaml.md; `environment` is in its config schema) that it does not deprecate;
# deprecated ones are `predict` (now `run`), `concurrency` (now @cog.concurrent), build.python_packages and
# build.pre_install (pkg/config/validate.go, checkDeprecatedFields).
TOP_KEYS = {"build", "environment", "image", "run"}
BUILD_KEYS = {"cuda", "gpu", "python_requirements", "python_version", "run", "sdk_version", "system_packages"}


def pins(filename: str) -> dict[str, str]:
    """{normalised package name: pinned version} of a requirements file (its own lines, not -r includes)."""
    out = {}
    for line in (ROOT / filename).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{filename}: {line!r} is not pinned with =="
        out[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return out


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


# ---- pins -----------------------------------------------------------------------------------------------


def test_the_table_rows_say_where_they_come_from():
    assert TABLE["source"].startswith("https://github.com/replicate/cog/blob/")
    assert TABLE["source"].endswith("/pkg/config/torch_compatibility.json")
    for row in TABLE["rows"]:
        # Internal consistency of each row: the wheel index is the row's CUDA build.
        assert row["ExtraIndexURL"].rstrip("/").endswith("cu" + row["CUDA"].replace(".", "")), row
        assert row["Torch"].endswith("+cu" + row["CUDA"].replace(".", "")), row


def test_cog_yaml_and_the_torch_pin_are_a_pair_from_cogs_table():
    build = COG_YAML["build"]
    torch_pin = pins(build["python_requirements"])["torch"]
    rows = [
        row
        for row in TABLE["rows"]
        if row["Torch"].split("+")[0] == torch_pin
        and minor(row["CUDA"]) == minor(str(build["cuda"]))
        and minor(str(build["python_version"])) in row["Pythons"]
    ]
    assert rows, (
        f"torch {torch_pin}, CUDA {build['cuda']}, Python {build['python_version']} is not a row of Cog's table"
    )
    assert build["gpu"] is True


def test_cog_yaml_uses_no_deprecated_keys():
    assert set(COG_YAML) <= TOP_KEYS, set(COG_YAML) - TOP_KEYS
    assert set(COG_YAML["build"]) <= BUILD_KEYS, set(COG_YAML["build"]) - BUILD_KEYS
    module, _, cls = COG_YAML["run"].partition(":")
    assert (ROOT / module).is_file() and f"class {cls}(" in (ROOT / module).read_text()


def test_the_container_runs_the_coglet_the_tests_run():
    dev = pins("requirements-dev.txt")
    assert COG_YAML["build"]["sdk_version"] == dev["cog"] == dev["coglet"]


def test_the_container_installs_a_pinned_pget():
    commands = " ".join(COG_YAML["build"]["run"])
    assert re.search(r"github\.com/replicate/pget/releases/download/v[\d.]+/pget_Linux_x86_64", commands)
    assert "-o /usr/local/bin/pget" in commands and "chmod +x /usr/local/bin/pget" in commands
    assert "curl -fsSL" in commands  # a failed download fails the build instead of installing an error page


def test_container_and_cpu_requirements_share_their_library_pins():
    """Deliberate duplication: Cog reads requirements.txt alone (no -r includes), so the library pins are
    written in both files; only torch (CUDA build vs CPU build) and torchao (GPU only) differ."""
    container, cpu = pins("requirements.txt"), pins("requirements-cpu.txt")
    shared = {k: v for k, v in container.items() if k not in ("torch", "torchao")}
    assert shared == {k: v for k, v in cpu.items() if k != "torch"}
    assert "torchao" in container and "torchao" not in cpu
    assert pins("requirements-gpu.txt")["torchao"] == container["torchao"]


def test_the_cpu_environment_gets_a_cpu_torch_no_older_than_the_containers():
    cpu_torch, container_torch = pins("requirements-cpu.txt")["torch"], pins("requirements.txt")["torch"]
    assert cpu_torch.endswith("+cpu"), "a plain torch pin installs the CUDA build from PyPI"
    as_tuple = lambda v: tuple(int(x) for x in v.split("+")[0].split("."))  # noqa: E731
    assert as_tuple(cpu_torch) >= as_tuple(container_torch)
    assert "requirements-cpu.txt" in (ROOT / "script" / "setup").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements-cpu.txt" in dev and "-r requirements.txt" not in dev


# ---- .dockerignore --------------------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[re.Pattern, bool]]:
    """(regex, excludes) per line of .dockerignore, as Docker reads it: paths relative to the context, a
    leading "/" ignored, `*` within one path segment, `**` across segments, `!` re-includes."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = line.lstrip("!").strip().lstrip("/").rstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + "$"), excludes))
    return rules


def excluded(path: str, rules=None) -> bool:
    """Whether Docker leaves `path` out of the build context: the last rule matching it or one of its
    parent folders decides."""
    rules = dockerignore_rules() if rules is None else rules
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for regex, excludes in rules:
        if any(regex.match(c) for c in candidates):
            verdict = excludes
    return verdict


@pytest.mark.parametrize(
    "path",
    [
        "weights/FLUX.1-Kontext-dev/transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "weights/FLUX.1-Kontext-dev/model_index.json",
        "weights/compile-cache/transformer-0123.bin",
        "weights/.FLUX.1-Kontext-dev.partial-12-345/model/vae/config.json",
        ".venv",
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "venv/bin/python",
        "out/edited.webp",
        "out/weight-archives/flux-kontext-dev.tar",
        ".whl/diffusers-0.42.1-py3-none-any.whl",
        ".git",
        ".git/objects/pack/pack-1.pack",
        "flux/__pycache__/model.cpython-311.pyc",
        "tests/__pycache__/conftest.cpython-311.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/0.17.6/123",
        ".cog/openapi_schema.json",
    ],
)
def test_dockerignore_keeps_out(path):
    assert excluded(path)


def test_dockerignore_keeps_every_tracked_file_in():
    """The image needs the code and cog.yaml; nothing git tracks is weights or a cache."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rules = dockerignore_rules()
    dropped = [path for path in tracked.splitlines() if excluded(path, rules)]
    assert dropped == []
    for needed in ("cog.yaml", "predict.py", "requirements.txt", "flux/weights.py", "weights/README.md"):
        assert not excluded(needed, rules), needed

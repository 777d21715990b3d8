"""What `cog build` makes of this directory: cog.yaml's torch/CUDA pair is one Cog knows, the keys are ones
Cog does not deprecate, its `environment` (and docs/deploy.md's example of it) makes a valid Dockerfile ENV line,
coglet and torchao are pinned to known builds, the container's and the CPU environment's requirements agree where
they should, and .dockerignore keeps the weights, virtualenvs, outputs, caches and .git out of the image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


# A PyPI wheel pinned by URL and hash, the hash's `#` spelled ${HASH_SIGN} (requirements.txt says why).
WHEEL_URL = re.compile(
    r"(\S+) @ https://files\.pythonhosted\.org/packages/\S+/([\w.]+?)-([\d.]+)-\S+\.whl"
    r"\$\{HASH_SIGN\}sha256=[0-9a-f]{64}"
)


def pins(filename: str) -> dict[str, str]:
    """{normalised package name: pinned version} of a requirements file (its own lines, not -r includes): `==`
    pins, or a PyPI wheel pinned by URL and hash."""
    out = {}
    for line in (ROOT / filename).read_text().splitlines():
        if wheel := WHEEL_URL.fullmatch(line.strip()):
            out[re.sub(r"[-_.]+", "-", wheel.group(1).lower())] = wheel.group(3)
            continue
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


def test_the_container_runs_the_cog_and_coglet_the_tests_run(tmp_path):
    """sdk_version pins cog; coglet comes as the newest release unless the build sets COGLET_WHEEL
    (replicate/cog pkg/wheels/wheels.go), which script/cog does. The `cog` run here is a stand-in that prints
    what it was given: the real CLI is not installable on this machine."""
    from script.openapi_schema import COG_VERSION
    from serving.server import TESTED_COGLET

    dev = pins("requirements-dev.txt")
    assert COG_YAML["build"]["sdk_version"] == dev["cog"] == dev["coglet"] == TESTED_COGLET == COG_VERSION
    assert "coglet" not in pins("requirements.txt")  # Cog strips it from there (filterManagedPackages)
    fake = tmp_path / "cog"
    fake.write_text('#!/bin/sh\necho "COGLET_WHEEL=$COGLET_WHEEL args=$*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "COGLET_WHEEL"} | {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    run = subprocess.run([ROOT / "script" / "cog", "build", "-t", "x"], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == f"COGLET_WHEEL=pypi:{dev['coglet']} args=build -t x", run.stderr
    env["COGLET_WHEEL"] = "pypi:9.9.9"  # an explicit choice wins
    run = subprocess.run([ROOT / "script" / "cog", "push"], env=env, capture_output=True, text=True)
    assert run.stdout.strip() == "COGLET_WHEEL=pypi:9.9.9 args=push"


def cog_requirement_lines(text: str) -> list[str]:
    """The lines of a requirements file that `cog build` hands to pip (replicate/cog pkg/requirements/
    requirements.go at 6110c91, ReadRequirements and scanLinesWithContinuations): a line ending in a backslash is
    joined to the next; each line is stripped and cut at its first `#`, whether it starts a comment or not; blank
    lines and `-e .` are dropped. (Lines pinned `name==version` are then rewritten without their options:
    pkg/config/config.go, pythonPackageForArch.)"""
    lines = []
    for line in re.sub(r"\\\r?\n", "", text).splitlines():
        line = line.strip()
        if line.startswith("#") or re.fullmatch(r"-e\s+\.", line):
            continue
        if line := line.split("#", 1)[0].strip():
            lines.append(line)
    return lines


PIP_READS = """
import json, sys
from pip._internal.network.session import PipSession
from pip._internal.req.constructors import install_req_from_parsed_requirement
from pip._internal.req.req_file import parse_requirements

reqs = map(install_req_from_parsed_requirement, parse_requirements(sys.argv[1], session=PipSession()))
print(json.dumps({r.name: {"url": r.link.url if r.link else None, "hash_name": r.link.hash_name if r.link else None,
                           "hash": r.link.hash if r.link else None, "hash_options": r.has_hash_options}
                  for r in reqs}))
"""


def pip_reads(lines: list[str], tmp_path: Path, env: dict[str, str]) -> dict:
    """{name: what pip's InstallRequirement says of its link and hashes} for `lines` as a requirements file, parsed
    by pip itself with environment variables from `env` expanded, as `pip install -r` does. In a process of its own:
    importing pip's internals takes setuptools' distutils shim out of this one (pip/_internal/locations), which
    breaks torch's compile later in the same process."""
    path = tmp_path / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-c", PIP_READS, str(path)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_cogs_reader_cuts_requirement_lines_at_the_first_hash_sign():
    text = "a==1  # a comment\nb @ https://x.example/b.whl#sha256=00\n# only a comment\n-e .\n"
    text += "c==2 \\\n  ; python_version>'3'\n"
    assert cog_requirement_lines(text) == ["a==1", "b @ https://x.example/b.whl", "c==2   ; python_version>'3'"]


def test_torchaos_hash_reaches_pip_through_cog_build(tmp_path):
    """requirements.txt as Cog hands it on, read by pip with cog.yaml's environment (its ENV line comes before the
    install in the Dockerfile Cog writes: pkg/dockerfile/standard_generator.go, GenerateInitialSteps): torchao
    keeps its sha256, as a URL fragment, which pip checks without asking a hash of every other requirement."""
    lines = cog_requirement_lines((ROOT / "requirements.txt").read_text())
    cog_env = dict(entry.split("=", 1) for entry in COG_YAML["environment"])
    reqs = pip_reads(lines, tmp_path, {**os.environ, **cog_env})
    torchao = reqs["torchao"]
    assert torchao["hash_name"] == "sha256" and re.fullmatch(r"[0-9a-f]{64}", torchao["hash"])
    assert torchao["url"].split("#", 1)[0].endswith(".whl")
    assert not any(r["hash_options"] for r in reqs.values())  # no --hash: it would ask one of every line
    # Without the variable (outside `cog build`), the URL is not the wheel's: pip fails instead of not checking.
    without = {k: v for k, v in os.environ.items() if k != "HASH_SIGN"}
    assert "${HASH_SIGN}" in pip_reads(lines, tmp_path, without)["torchao"]["url"]


def test_torchao_is_pypis_wheel_and_its_extensions_are_never_loaded():
    line = next(x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith("torchao"))
    assert WHEEL_URL.fullmatch(line), "torchao must be pinned to one wheel by URL and hash"
    assert "manylinux" in line and "x86_64" in line and "cp310-abi3" in line  # any CPython >= 3.10
    assert "TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1" in COG_YAML["environment"]
    source = (ROOT / "flux" / "optimize.py").read_text()
    assert 'os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")' in source
    assert "kernel_preference=KernelPreference.TORCH" in source


# ---- cog.yaml's environment: one unquoted Dockerfile ENV line --------------------------------------------

# Cog's rules for `environment` (pkg/config/env.go): NAME=VALUE, no name twice, none of these names.
ENV_DENY = ["PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "R8_*", "REPLICATE_*"]
ENV_DENY += ["LIBRARY_PATH", "CUDA_*", "NVIDIA_*", "NV_*", "PGET_*", "HF_ENDPOINT", "HF_HUB_ENABLE_HF_TRANSFER"]
ENV_DENY += ["KUBERNETES_*"]


def cog_env_line(entries: list[str]) -> str:
    """The Dockerfile line Cog writes for cog.yaml's `environment` (pkg/dockerfile/env.go, envLineFromConfig):
    `ENV` and NAME=VALUE pairs sorted by name, joined by spaces, nothing quoted."""
    env = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        assert sep and name, f"environment variable {entry!r} is not in the KEY=VALUE format"
        assert not any(name == d or (d.endswith("*") and name.startswith(d[:-1])) for d in ENV_DENY), name
        assert name not in env, f"environment variable {name!r} is already defined"
        env[name] = value
    return "ENV " + " ".join(f"{name}={env[name]}" for name in sorted(env))


def dockerfile_env(line: str) -> dict[str, str]:
    """What Docker sets from an `ENV k=v ...` line: BuildKit's word splitting (frontend/dockerfile/parser/
    line_parsers.go, parseWords and parseNameVal: every word must hold "="). Values must come through as
    written: a quote, backslash or `$` would be processed (quote removal, escapes, variable expansion)."""
    rest = line.removeprefix("ENV ")
    words, word, quote = [], "", ""
    for ch in rest:
        if quote:
            word += ch
            quote = "" if ch == quote else quote
        elif ch.isspace():
            if word:
                words.append(word)
            word = ""
        else:
            word += ch
            quote = ch if ch in "'\"" else ""
    if word:
        words.append(word)
    env = {}
    for word in words:
        if "=" not in word:
            raise ValueError(f"Syntax error - can't find = in {word!r}. Must be of the form: name=value")
        name, value = word.split("=", 1)
        if any(c in value for c in "'\"\\$"):
            raise ValueError(f"{name}'s value would be changed by Docker's quote, escape or variable processing")
        env[name] = value
    return env


def docs_environment() -> list[str]:
    """The `environment:` example of docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    examples = [yaml.safe_load(b)["environment"] for b in blocks if "environment:" in b]
    assert len(examples) == 1
    return examples[0]


def test_cog_yamls_environment_is_a_valid_env_line():
    entries = COG_YAML["environment"]
    assert dockerfile_env(cog_env_line(entries)) == dict(e.split("=", 1) for e in entries)


def test_the_docs_environment_example_is_a_valid_env_line_with_the_urls_it_lists(monkeypatch):
    from flux.weights import weights_urls

    entries = docs_environment()
    env = dockerfile_env(cog_env_line(entries))
    assert env == dict(e.split("=", 1) for e in entries)
    monkeypatch.setenv("FLUX_WEIGHTS_URL", env["FLUX_WEIGHTS_URL"])
    urls = weights_urls()
    assert len(urls) > 1 and all(u.startswith("https://") and u.endswith(".tar") for u in urls)


def test_a_space_separated_url_list_is_not_a_valid_env_line():
    line = cog_env_line(["FLUX_WEIGHTS_URL=https://a.example/1.tar https://a.example/2.tar"])
    with pytest.raises(ValueError, match="can't find = in 'https://a.example/2.tar'"):
        dockerfile_env(line)
    with pytest.raises(ValueError, match="would be changed"):
        dockerfile_env(cog_env_line(['FLUX_WEIGHTS_URL="https://a.example/1.tar https://a.example/2.tar"']))


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

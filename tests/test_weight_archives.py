"""Weights from URLs: packing, fetching over loopback (Python and a stand-in pget), safe and strict
extraction, and setup's rule that only a complete, verified directory is ever put in place."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flux import safety
from flux import weight_archives as wa
from flux.errors import WeightsError
from flux.weights import resolve_weights_dir
from script.pack_weights import pack
from tests.archive_server import ArchiveServer, Body

ROOT = Path(__file__).resolve().parent.parent
SECRET = "X-Signature=s3cr3t"


def tree(directory: Path) -> dict[str, bytes]:
    """Every visible file under `directory` (hidden folders such as .flux-archive left out) and its bytes."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def source(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with a hidden folder (as `hf download --local-dir` leaves) that must not be packed."""
    directory = tmp_path_factory.mktemp("source") / "model"
    # The model's own components only: the archive tests count on three parts of at most 200 kB, and the
    # safety checkers' folders are packed like any other (the server tests fetch them).
    shutil.copytree(tiny_dir, directory, ignore=shutil.ignore_patterns(*safety.CHECKER_FOLDERS))
    (directory / ".cache" / "huggingface").mkdir(parents=True)
    (directory / ".cache" / "huggingface" / "junk").write_text("not weights")
    return directory


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory) -> bytes:
    (packed,) = pack(source, tmp_path_factory.mktemp("packed"), safety_checker=False)
    assert packed.path.name == "flux-kontext-dev.tar"
    return packed.path.read_bytes()


@pytest.fixture(scope="module")
def parts(source, tmp_path_factory) -> list[bytes]:
    packed = pack(source, tmp_path_factory.mktemp("parts"), max_part_bytes=200_000, safety_checker=False)
    assert [p.path.name for p in packed] == [f"flux-kontext-dev-{i}-of-{len(packed)}.tar" for i in (1, 2, 3)]
    return [p.path.read_bytes() for p in packed]


@pytest.fixture
def server():
    with ArchiveServer() as srv:
        yield srv


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """FLUX_WEIGHTS pointing at an empty place; no hub token; returns a setter for FLUX_WEIGHTS_URL."""
    target = tmp_path / "weights" / "FLUX.1-Kontext-dev"
    monkeypatch.setenv("FLUX_WEIGHTS", str(target))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no pget unless a test puts one there

    def set_urls(*urls: str) -> Path:
        monkeypatch.setenv("FLUX_WEIGHTS_URL", " ".join(urls))
        return target

    return set_urls


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if ".partial-" in p.name)


# ---- packing --------------------------------------------------------------------------------------------


def test_an_archive_round_trips_the_model(source, archive, server, tmp_path):
    url = server.put("/w.tar", archive)
    model = wa.fetch_archives([url], tmp_path / "staging")
    assert tree(model) == tree(source)
    assert "RANDOM_WEIGHTS" in tree(model)  # the test-model marker travels with the weights
    assert not (model / ".cache").exists()
    assert (model / wa.MANIFEST_DIR / "part-001.json").is_file()
    assert wa.missing_entries(model) == []


def test_packing_is_deterministic(source, archive, tmp_path):
    (again,) = pack(source, tmp_path, safety_checker=False)
    assert again.path.read_bytes() == archive


def test_split_archives_merge_back(source, parts, server, tmp_path):
    urls = [server.put(f"/part-{i}.tar", data) for i, data in enumerate(parts, 1)]
    model = wa.fetch_archives(urls, tmp_path / "staging")
    assert tree(model) == tree(source)
    # Each part holds whole files; the transformer's weights may sit in a part of their own.
    names = [set(tarfile.open(fileobj=io.BytesIO(p)).getnames()) for p in parts]
    assert all(not (a & b) - {wa.MANIFEST_DIR} for i, a in enumerate(names) for b in names[i + 1 :])


def test_a_missing_part_is_named(parts, server, tmp_path):
    urls = [server.put(f"/part-{i}.tar", data) for i, data in enumerate(parts, 1)]
    with pytest.raises(WeightsError, match=r"part\(s\) 2 of 3"):
        wa.fetch_archives([urls[0], urls[2]], tmp_path / "staging")


def test_the_same_part_twice_is_refused(parts, server, tmp_path):
    url = server.put("/part-1.tar", parts[0])
    with pytest.raises(WeightsError, match=r"holds \.flux-archive/part-001\.json, which an earlier archive also holds"):
        wa.fetch_archives([url, url], tmp_path / "staging")


def test_compile_artifacts_ship_in_the_archive(source, tmp_path, server):
    with_cache = tmp_path / "with-cache"
    shutil.copytree(source, with_cache)
    (with_cache / "compile-cache").mkdir()
    (with_cache / "compile-cache" / "transformer-abc.bin").write_bytes(b"artifact")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "transformer-def.bin").write_bytes(b"another")
    (packed,) = pack(with_cache, tmp_path / "out", compile_cache=elsewhere, safety_checker=False)
    model = wa.fetch_archives([server.put("/c.tar", packed.path.read_bytes())], tmp_path / "staging")
    assert (model / "compile-cache" / "transformer-abc.bin").read_bytes() == b"artifact"
    assert (model / "compile-cache" / "transformer-def.bin").read_bytes() == b"another"
    # Setup rewrites artifacts after its warm-up: a changed cache does not make the weights look incomplete.
    (model / "compile-cache" / "transformer-abc.bin").write_bytes(b"recompiled, longer")
    (model / "compile-cache" / "transformer-def.bin").unlink()
    assert wa.missing_entries(model) == []
    assert len(wa.missing_entries(model, verify_cache=True)) == 2
    (elsewhere / "transformer-abc.bin").write_bytes(b"clash")
    with pytest.raises(WeightsError, match="compile-cache/transformer-abc.bin"):
        pack(with_cache, tmp_path / "out2", compile_cache=elsewhere, safety_checker=False)


def test_an_incomplete_directory_is_not_packed(source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match="vae/"):
        pack(broken, tmp_path / "out", safety_checker=False)


def test_the_pack_script(source, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["script/pack-weights", str(source), str(out), "--max-part-size", "200KB", "--no-safety-checker"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"flux-kontext-dev-{i}-of-3.tar" for i in (1, 2, 3)]
    urls = ",".join(f"https://HOST/PATH/flux-kontext-dev-{i}-of-3.tar" for i in (1, 2, 3))
    assert f"FLUX_WEIGHTS_URL={urls}" in result.stdout  # commas: what fits in cog.yaml's environment


def test_the_pack_script_needs_the_safety_checker_or_says_how_to_leave_it_out(source, tmp_path):
    """Without the checker's folders and without the hub (the tests are offline), packing fails naming
    them, instead of making archives whose setup would go to the hub at every cold boot."""
    bare = tmp_path / "model"
    shutil.copytree(source, bare)
    result = subprocess.run(
        ["script/pack-weights", str(bare), str(tmp_path / "out")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "safety_checker/, feature_extractor/ are not in" in result.stderr and "--no-safety-checker" in result.stderr


def test_the_safety_checker_is_fetched_into_the_model_and_packed(tiny_dir, source, tmp_path):
    """Missing checker folders are fetched into the model directory (here from a stand-in hub that copies the
    tiny checkers: the tests are offline), then packed with it."""
    bare = tmp_path / "model"
    shutil.copytree(source, bare)

    def stand_in_hub(repo: str, filename: str, folder: Path) -> None:
        name = next(f for f in safety.CHECKER_FOLDERS if folder.name == f)
        folder.mkdir(parents=True, exist_ok=True)
        if (tiny_dir / name / filename).exists():
            shutil.copy(tiny_dir / name / filename, folder / filename)

    (packed,) = pack(bare, tmp_path / "out", download=stand_in_hub)
    with tarfile.open(packed.path) as tar:
        folders = {name.split("/")[0] for name in tar.getnames()}
    assert set(safety.CHECKER_FOLDERS) <= folders
    assert all((bare / f).is_dir() for f in safety.CHECKER_FOLDERS)
    (again,) = pack(tiny_dir, tmp_path / "out2", safety_checker=False)
    with tarfile.open(again.path) as tar:
        assert not {name.split("/")[0] for name in tar.getnames()} & set(safety.CHECKER_FOLDERS)


# ---- damaged, missing and unsafe archives ----------------------------------------------------------------


def _end_of_archive(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset


def _damaged(archive: bytes) -> dict[str, Body]:
    end = _end_of_archive(archive)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest = tar.getmembers()[-1]
    assert manifest.name.startswith(wa.MANIFEST_DIR)
    garbled = bytearray(archive)
    garbled[manifest.offset : manifest.offset + 512] = b"x" * 512  # the last member's header
    return {
        "cut in a file": Body(archive[: len(archive) // 2]),
        "cut between files": Body(archive[:end]),
        "one zero block": Body(archive[: end + 512]),
        "garbled header": Body(bytes(garbled)),
        "junk after the end": Body(archive + b"junk"),
        "connection cut": Body(archive[: len(archive) // 3], declared=len(archive)),
        "not a tar": Body(b"<html>Access denied</html>"),
        "empty": Body(b""),
    }


@pytest.mark.parametrize(
    "case",
    [
        "cut in a file",
        "cut between files",
        "one zero block",
        "garbled header",
        "junk after the end",
        "connection cut",
        "not a tar",
        "empty",
        "404",
    ],
)
def test_a_damaged_or_missing_archive_fails_naming_the_url(case, archive, server, tmp_path):
    bodies = _damaged(archive)
    url = server.url + "/gone.tar" if case == "404" else server.put("/w.tar", bodies[case])
    with pytest.raises(WeightsError) as error:
        wa.fetch_archives([f"{url}?{SECRET}"], tmp_path / "staging")
    message = str(error.value)
    assert url in message, message
    assert "s3cr3t" not in message


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


@pytest.mark.parametrize(
    "members,named",
    [
        ([_file("/tmp/evil")], "/tmp/evil"),
        ([_file("../evil")], "../evil"),
        ([_file("vae/../../evil")], "vae/../../evil"),
        ([_special("vae", tarfile.SYMTYPE, "/etc")], "'vae' is a link"),
        ([_file("a"), _special("b", tarfile.LNKTYPE, "../../etc/passwd")], "'b' is a link"),
        ([_special("fifo", tarfile.FIFOTYPE)], "'fifo' is a special file"),
        ([_file("model_index.json"), _file("model_index.json")], "appears twice"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot", "symlink", "hardlink", "fifo", "duplicate"],
)
def test_unsafe_members_are_refused(members, named, server, tmp_path):
    url = server.put("/evil.tar", _tar(*members))
    (tmp_path / "deep").mkdir()
    with pytest.raises(WeightsError, match=named.replace(".", r"\.")):
        wa.fetch_archives([url], tmp_path / "deep" / "staging")
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


def test_a_plain_tar_of_a_folder_is_accepted(source, server, tmp_path):
    """An archive made with `tar -cf x.tar -C DIR .` (a "./" root entry, no manifest) is fine too."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(source, arcname=".")
    model = wa.fetch_archives([server.put("/plain.tar", buf.getvalue())], tmp_path / "staging")
    assert tree(model) == tree(source)


def test_urls_are_shown_without_credentials():
    assert wa.redact("https://user:pw@host.example:8443/a/b.tar?sig=1#x") == "https://host.example:8443/a/b.tar?…"
    with pytest.raises(WeightsError, match="not an http"):
        wa.check_url("file:///etc/passwd")


# ---- setup: resolve_weights_dir ---------------------------------------------------------------------------


def test_setup_fetches_into_an_empty_place_once(source, archive, server, weights_env):
    target = weights_env(server.put("/w.tar", archive))
    assert resolve_weights_dir() == target
    assert tree(target) == tree(source)
    assert leftovers(target) == []
    assert resolve_weights_dir() == target  # complete now: nothing is fetched again
    assert server.requests["/w.tar"] == 1


def test_a_failed_fetch_leaves_nothing(archive, server, weights_env):
    target = weights_env(server.put("/w.tar", archive[: len(archive) // 2]))
    with pytest.raises(WeightsError, match="/w.tar"):
        resolve_weights_dir()
    assert not target.exists() and leftovers(target) == []


def test_a_fetch_killed_midway_leaves_nothing_trusted(source, archive, server, weights_env):
    slow = server.put("/slow.tar", Body(archive, chunk=16 << 10, delay_per_chunk=0.3))
    target = weights_env(slow)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flux.weights import resolve_weights_dir; resolve_weights_dir()"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(target.parent.glob(".*.partial-*/archive-1/model_index.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "the fetch never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists() and wa.missing_entries(target)
    assert len(leftovers(target)) == 1  # the staging directory of the killed fetch
    # The next setup starts afresh and cleans up after the killed one.
    weights_env(server.put("/w.tar", archive))
    assert resolve_weights_dir() == target
    assert tree(target) == tree(source) and leftovers(target) == []


def test_an_incomplete_directory_is_moved_aside_not_deleted(source, archive, server, weights_env):
    target = weights_env(server.put("/w.tar", archive))
    (target / "vae").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    resolve_weights_dir()
    assert tree(target) == tree(source)
    (aside,) = target.parent.glob(".FLUX.1-Kontext-dev.incomplete-*")
    assert (aside / "notes.txt").read_text() == "mine"


def test_a_truncated_file_in_a_packed_directory_makes_it_incomplete(source, archive, server, weights_env):
    target = weights_env(server.put("/w.tar", archive))
    resolve_weights_dir()
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])
    assert wa.missing_entries(target) == [f"transformer/diffusion_pytorch_model.safetensors (100 of {size} bytes)"]
    resolve_weights_dir()
    assert tree(target) == tree(source) and server.requests["/w.tar"] == 2


def test_two_setups_sharing_a_volume_fetch_once(source, archive, server, weights_env):
    target = weights_env(server.put("/w.tar", Body(archive, chunk=64 << 10, delay_per_chunk=0.1)))
    results, errors = [], []

    def run():
        try:
            results.append(resolve_weights_dir())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [target, target]
    assert server.requests["/w.tar"] == 1


def test_no_source_says_what_to_set(weights_env, monkeypatch):
    monkeypatch.delenv("FLUX_WEIGHTS_URL", raising=False)
    with pytest.raises(WeightsError, match="FLUX_WEIGHTS_URL.*HF_TOKEN"):
        resolve_weights_dir()


def test_the_hub_download_is_staged_too(source, weights_env, monkeypatch):
    target = weights_env()  # no URL
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    calls = []

    def fake_snapshot_download(repo, local_dir, allow_patterns, token):
        calls.append((repo, Path(local_dir).name, token))
        shutil.copytree(source, local_dir, dirs_exist_ok=True)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve_weights_dir() == target
    assert tree(target) == tree(source)
    assert calls == [("black-forest-labs/FLUX.1-Kontext-dev", ".FLUX.1-Kontext-dev.hub-download", "hf_test")]
    assert not target.with_name(".FLUX.1-Kontext-dev.hub-download").exists()


# ---- pget ----------------------------------------------------------------------------------------------

# A stand-in with pget's command line (`pget -x URL DEST`, DEST must not exist) that extracts whatever the
# archive holds, links included, as pget does: what our side does with its result is under test, not pget.
FAKE_PGET = textwrap.dedent(
    """\
    #!{python}
    import os, sys, tarfile, urllib.request
    flag, url, dest = sys.argv[1:]
    assert flag == "-x", sys.argv
    with open(os.environ["FAKE_PGET_LOG"], "a") as log:
        log.write(url + "\\n")
    if os.path.exists(dest):
        sys.exit(f"destination {{dest}} already exists")
    try:
        with urllib.request.urlopen(url) as response, tarfile.open(fileobj=response, mode="r|") as tar:
            tar.extractall(dest, filter="fully_trusted")
    except Exception as e:
        sys.exit(f"error downloading {{url}}: {{e}}")
    """
)


@pytest.fixture
def fake_pget(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pget = bin_dir / "pget"
    pget.write_text(FAKE_PGET.format(python=sys.executable))
    pget.chmod(0o755)
    log = tmp_path / "pget.log"
    log.touch()
    monkeypatch.setenv("FAKE_PGET_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_setup_uses_pget_when_it_is_on_path(source, archive, server, weights_env, fake_pget, caplog):
    url = server.put("/w.tar", archive)
    target = weights_env(url)
    with caplog.at_level(logging.INFO, logger="flux"):
        assert resolve_weights_dir() == target
    assert fake_pget.read_text().split() == [url]
    assert tree(target) == tree(source) and leftovers(target) == []
    assert "pget" in caplog.text


def test_a_pget_failure_names_the_url_without_its_query(server, weights_env, fake_pget):
    url = server.url + "/gone.tar"
    target = weights_env(f"{url}?{SECRET}")
    with pytest.raises(WeightsError) as error:
        resolve_weights_dir()
    assert url in str(error.value) and "s3cr3t" not in str(error.value) and "exit 1" in str(error.value)
    assert not target.exists() and leftovers(target) == []


@pytest.mark.parametrize(
    "members,named",
    [
        ([_file("model_index.json"), _special("vae", tarfile.SYMTYPE, "/etc")], "vae is a link"),
        ([_file("a"), _special("b", tarfile.LNKTYPE, "a")], "is a hard link"),
    ],
    ids=["symlink", "hardlink"],
)
def test_links_that_pget_extracted_are_refused(members, named, server, weights_env, fake_pget):
    target = weights_env(server.put("/evil.tar", _tar(*members)))
    with pytest.raises(WeightsError, match=named):
        resolve_weights_dir()
    assert not target.exists() and leftovers(target) == []

"""The layout's rules: the server loads no measuring tool, imports point one way, the Cog layer stays thin."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from flux import sampling

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_server_loads_no_measuring_tool():
    code = "import predict, sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'measure'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_core_imports_neither_the_tools_nor_the_cog_layer():
    for path in (ROOT / "flux").glob("*.py"):
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & {"measure", "serving", "predict", "cog"}, path.name


def test_loading_imports_neither_the_sampler_nor_the_tiny_model():
    names = imported_modules(ROOT / "flux" / "model.py")
    assert not {n for n in names if n.startswith(("flux.sampling", "flux.tiny", "flux.pipeline"))}


def test_the_serving_loop_takes_what_serving_needs():
    assert len(inspect.signature(sampling.denoise).parameters) <= 7


def test_predict_stays_thin():
    assert len((ROOT / "predict.py").read_text().splitlines()) < 150


def test_the_fidelity_tools_import_one_way():
    """measure.fidelity runs measure.peers (--peers); both take their cases and metrics from measure.cases."""
    fidelity, peers, cases = (imported_modules(ROOT / "measure" / f"{n}.py") for n in ("fidelity", "peers", "cases"))
    assert not {n for n in peers if n.startswith("measure.fidelity")}
    assert not {n for n in cases if n.startswith(("measure.fidelity", "measure.peers"))}
    assert "measure.cases" in peers & fidelity


MODULES = [*ROOT.glob("flux/*.py"), *ROOT.glob("serving/*.py"), *ROOT.glob("measure/*.py"), *ROOT.glob("script/*.py")]


def test_no_python_file_is_over_500_lines():
    """A file that grows past 500 lines is split along its own seam (as ranks/rank_wire, bench/timing)."""
    files = [ROOT / "predict.py", *MODULES, *ROOT.glob("tests/*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}


def test_every_module_says_what_it_is_for():
    """Each module opens with a docstring whose first line is what a newcomer reads first."""
    for path in [ROOT / "predict.py", *MODULES]:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{path.relative_to(ROOT)} has no docstring"

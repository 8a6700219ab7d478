"""One tree per process: `faithful_vit` and `faithful_vit.kernels` come from one checkout; `kernels/` knows only
torch, triton and the standard library."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
WHERE = "import faithful_vit, faithful_vit.kernels as k; print(faithful_vit.__file__); print(k.__file__)"


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def _editable_install_of_this_checkout(tmp_path: Path) -> bool:
    proc = _python("import importlib.util as u; print(u.find_spec('faithful_vit').origin)", tmp_path)
    return proc.returncode == 0 and proc.stdout.strip() == str(REPO / "faithful_vit" / "__init__.py")


def test_a_second_checkout_run_from_its_root_fails_loudly(tmp_path):
    """Running from another checkout's root finds its faithful_vit first, and this checkout's kernels through the
    editable install: the import must stop and say what was mixed and how to fix it."""
    if not _editable_install_of_this_checkout(tmp_path):
        pytest.skip("needs this checkout installed with pip install -e")
    other = tmp_path / "other"
    shutil.copytree(REPO / "faithful_vit", other / "faithful_vit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(KERNELS, other / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    proc = _python(WHERE, other)
    assert proc.returncode != 0, proc.stdout
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: faithful_vit comes from ")
    assert f"{other / 'faithful_vit'} but faithful_vit.kernels from {KERNELS}: two checkouts are mixed" in error
    assert f"pip install -e {other}" in error


def test_this_checkout_and_an_installed_layout_import_one_tree(tmp_path):
    proc = _python(WHERE, REPO)
    assert proc.returncode == 0, proc.stderr
    package, kernels = (Path(line).parent for line in proc.stdout.split())
    assert (package, kernels) == (REPO / "faithful_vit", KERNELS)
    # A wheel's layout: kernels/ inside the package. Drop the editable finder so that only this copy can be found.
    site = tmp_path / "site"
    shutil.copytree(REPO / "faithful_vit", site / "faithful_vit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(KERNELS, site / "faithful_vit" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(site)!r}); {WHERE}"
    )
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    package, kernels = (Path(line).parent for line in proc.stdout.split())
    assert (package, kernels) == (site / "faithful_vit", site / "faithful_vit" / "kernels")


def _imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module, relative level) of every import statement in the file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "triton", "__future__"}
    files = sorted(KERNELS.glob("*.py"))
    assert KERNELS / "check.py" in files and KERNELS / "masked_attention.py" in files
    bad = [
        f"{path.name}: {'.' * level}{module}"
        for path in files
        for module, level in _imported_modules(path)
        if level > 1 or (level == 0 and module.split(".")[0] not in allowed)
    ]
    assert not bad, f"kernels/ may import only torch, triton, the standard library and itself: {bad}"

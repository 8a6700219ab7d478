"""One tree per process: ``faithful_vit`` and ``faithful_vit.kernels`` must come from the same checkout or install.

Imported first by ``faithful_vit/__init__.py``.
"""

import importlib.util
from pathlib import Path


def check_one_tree() -> None:
    """Refuse to run ``faithful_vit`` from one checkout with ``faithful_vit.kernels`` from another.

    ``kernels/`` lies next to ``faithful_vit/`` in a checkout and inside it in an installed wheel. With an editable
    install of checkout A, running from the root of checkout B finds B's ``faithful_vit`` on ``sys.path`` first and
    then A's kernels through the editable finder (B's ``faithful_vit/`` has no ``kernels`` folder). Looking up the
    spec reads no kernel code, so the check costs a few ``stat`` calls.
    """
    package_dir = Path(__file__).resolve().parent
    spec = importlib.util.find_spec("faithful_vit.kernels")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"faithful_vit.kernels: not found for faithful_vit at {package_dir} (expected "
            f"{package_dir.parent / 'kernels'} in a checkout or {package_dir / 'kernels'} when installed); "
            f"reinstall from this checkout: pip install -e {package_dir.parent}"
        )
    kernels_dir = Path(spec.origin).resolve().parent
    if kernels_dir.parent not in (package_dir, package_dir.parent):
        raise ImportError(
            f"faithful_vit comes from {package_dir} but faithful_vit.kernels from {kernels_dir}: two checkouts are "
            f"mixed (the editable install points at {kernels_dir.parent}). Reinstall from the checkout you run: "
            f"pip install -e {package_dir.parent} (or run from outside {package_dir.parent})"
        )


check_one_tree()

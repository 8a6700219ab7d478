"""Run folders: atomic file writes, safe checkpoints and RNG state, refusing to reuse or damage a run, and the rules
of ``--resume``.

Every file of a run (``args.yaml``, metrics, ``test_metrics.json``, ``summary.json``, figures, checkpoints) is
written through :func:`atomic_open`: a temporary file ``.<name>.tmp<pid>`` in the same folder, fsync, then
``os.replace``, so a reader sees the old file or the new one, never a part. A kill can leave the temporary file
behind; :func:`remove_stale_temporaries` deletes those when the run is resumed.

Checkpoints (:func:`save_checkpoint`) hold only tensors and plain data, the RNG states included (:func:`rng_states`),
and are loaded with ``weights_only=True`` (:func:`load_checkpoint`), so a crafted file cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
import yaml

# Flags that only change speed or logging, never a number of the run: they may differ on --resume.
RESUME_SAFE_FLAGS = ("num_workers", "no_progress", "log_interval", "checkpoint_every")
_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: reused without ``--resume``, damaged, or holding an unsafe file."""


def flag_name(key: str) -> str:
    """``batch_size`` -> ``--batch-size``: how the command line spells an ``args.yaml`` key."""
    return "--" + key.replace("_", "-")


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path``, on error it is removed.

    Args:
        path: the file to write; its folder is created.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        **kwargs: passed to :func:`open` (e.g. ``newline=""`` for CSV).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: expected 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as handle:
        handle.write(text)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files that a killed run left in ``run_dir`` (any depth); returns them."""
    stale = sorted(path for path in Path(run_dir).rglob(".*.tmp*") if _TEMPORARY.match(path.name) and path.is_file())
    for path in stale:
        path.unlink()
    return stale


def new_run_dir(output: str | Path, experiment: str) -> Path:
    """The folder ``output/experiment`` of a new run, after checking that it is a plain name and holds no run.

    Raises:
        RunFolderError: ``experiment`` is a path (it would write outside ``output``), or the folder already holds
            files (re-using it would mix two runs: that is what ``--resume`` is for).
    """
    if experiment in ("", ".", "..") or Path(experiment).name != experiment:
        raise RunFolderError(
            f"--experiment: expected a folder name inside --output (no path separator, not '.' or '..'), "
            f"got {experiment!r}"
        )
    run_dir = Path(output) / experiment
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunFolderError(
            f"--experiment: {run_dir} already exists and is not empty; continue that run with --resume {run_dir}, "
            "or choose another --experiment"
        )
    return run_dir


def read_run_args(run_dir: Path, flags: set[str]) -> dict:
    """The flag values in ``run_dir/args.yaml``: a mapping of every flag in ``flags`` and nothing else.

    Raises:
        RunFolderError: no such folder or file, or the file is empty, truncated or not a mapping of exactly those
            flags (resuming it would silently train with defaults).
    """
    run_dir = Path(run_dir)
    path = run_dir / "args.yaml"
    if not run_dir.is_dir():
        raise RunFolderError(f"--resume: no such run folder: {run_dir}")
    if not path.is_file():
        raise RunFolderError(f"--resume: {run_dir} is not a run folder: it has no args.yaml")
    try:
        stored = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]
        raise RunFolderError(f"--resume: {path} is damaged: not valid YAML ({reason})") from None
    if not isinstance(stored, dict):
        got = "an empty file" if stored is None else f"a {type(stored).__name__}"
        raise RunFolderError(f"--resume: {path} is damaged: expected a mapping of every flag to its value, got {got}")
    missing, unknown = sorted(flags - set(stored)), sorted(set(stored) - flags)
    if missing or unknown:
        raise RunFolderError(
            f"--resume: {path} is damaged or from another version: expected every flag of train.py, "
            f"missing {missing}, unknown {unknown}"
        )
    return stored


def check_resume_flags(stored: dict, given: dict) -> None:
    """Refuse a resume whose flags differ from the run's ``args.yaml`` except in :data:`RESUME_SAFE_FLAGS`.

    Args:
        stored: the run's flag values (:func:`read_run_args`).
        given: the flag values of this invocation (``args.yaml`` overridden by ``-c`` and the command line).
    """
    changed = [key for key in sorted(stored) if key not in RESUME_SAFE_FLAGS and given[key] != stored[key]]
    if changed:
        details = ", ".join(f"{flag_name(key)} (run: {stored[key]!r}, given: {given[key]!r})" for key in changed)
        allowed = ", ".join(flag_name(key) for key in RESUME_SAFE_FLAGS)
        raise RunFolderError(
            f"--resume: flags that change the run's results cannot change on resume: {details}; "
            f"only {allowed} may differ (start a new run for the others)"
        )


def read_finished(model_dir: Path) -> tuple[dict, list[dict]] | None:
    """The test metrics and history of a finished (model, seed), or None when it has no ``test_metrics.json``.

    Raises:
        RunFolderError: ``test_metrics.json`` or ``metrics.jsonl`` is missing, truncated or not what it should be.
    """
    done = Path(model_dir) / "test_metrics.json"
    if not done.exists():
        return None
    # Without test_metrics.json, --resume evaluates the model again from its checkpoints.
    retest = f"delete {done} to test this model again"
    test = _read_json_rows(done, "a JSON object of test metrics", retest, lines=False)[0]
    history = _read_json_rows(Path(model_dir) / "metrics.jsonl", "one JSON object per epoch", retest, lines=True)
    return test, history


def _read_json_rows(path: Path, expected: str, remedy: str, *, lines: bool) -> list[dict]:
    """The JSON object in ``path`` (as a one-item list), or its JSON lines; anything else is a damaged run."""
    try:
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if lines else [json.loads(text)]
    except FileNotFoundError:
        raise RunFolderError(f"--resume: {path} is missing: expected {expected}; {remedy}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"--resume: {path} is damaged ({error}): expected {expected}; {remedy}") from None
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise RunFolderError(f"--resume: {path} is damaged: expected {expected}; {remedy}")
    return rows


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors and plain Python data only) to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``: no code in it can run.

    Raises:
        RunFolderError: the file holds anything but tensors and plain data (a pickle that could run code), or it
            is truncated or not a checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        holds = f"the global {found.group(1)}" if found else "objects other than tensors and plain data"
        raise RunFolderError(
            f"{path}: refused to load: it holds {holds}, which unpickling could execute; a checkpoint of this "
            "code holds only tensors and plain data"
        ) from None
    except FileNotFoundError:
        raise RunFolderError(f"{path}: no such checkpoint") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunFolderError(f"{path}: damaged or not a checkpoint ({reason})") from None


def rng_states() -> dict:
    """The Python, NumPy, torch (and CUDA) generator states as tensors and plain data (``weights_only`` loads)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore the generator states that :func:`rng_states` returned."""
    numpy_state = {**states["numpy"], "state": dict(states["numpy"]["state"])}
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    random.setstate(states["python"])
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed the Python, NumPy and torch generators with ``seed + rank`` (each rank its own stream)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)

"""Command-line machinery of train.py, ``python -m faithful_vit.evaluate`` and ``python -m faithful_vit.predict``.

Every usage error is a :class:`UsageError`, which the scripts print as one line and exit with code 2. Only
``argparse`` and ``yaml`` are imported here (the kernels on first use of :func:`backend_context`): ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

BACKENDS = ("auto", "triton", "torch")


class UsageError(ValueError):
    """Bad input from the command line (reported as one line, exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UsageError` line (no usage block), like every other bad input."""

    def error(self, message):
        raise UsageError(message)


# Flag value types. Each takes a command-line string or a value read from a YAML file (--config, --resume's
# args.yaml), so both are checked the same way, and is idempotent: argparse re-applies it to string defaults.


def _integer(value, what: str, minimum: int, maximum: int | None = None) -> int:
    number = None
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    if number is None or number < minimum or (maximum is not None and number > maximum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def _real(value, what: str, accept) -> float:
    number = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or not accept(number):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_int(value) -> int:
    return _integer(value, "a positive integer", 1)


def non_negative_int(value) -> int:
    return _integer(value, "an integer >= 0", 0)


def seed_int(value) -> int:
    return _integer(value, f"an integer in 0..{2**31 - 1}", 0, 2**31 - 1)


def positive_float(value) -> float:
    return _real(value, "a finite number > 0", lambda x: x > 0)


def non_negative_float(value) -> float:
    return _real(value, "a finite number >= 0", lambda x: x >= 0)


def unit_fraction(value) -> float:
    return _real(value, "a number in [0, 1]", lambda x: 0 <= x <= 1)


def threshold_fraction(value) -> float:
    return _real(value, "a number in [0, 1)", lambda x: 0 <= x < 1)


def seed_list(value) -> str:
    """``"0,1,2"`` (or, from YAML, ``2`` or ``[0, 1, 2]``): distinct seeds, kept as the comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        seeds = [seed_int(item.strip() if isinstance(item, str) else item) for item in items]
    except argparse.ArgumentTypeError:
        seeds = None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers >= 0, e.g. 0,1,2, got {value!r}")
    return ",".join(map(str, seeds))


def _keys_missing_a_space(value):
    """``{embed_dim:32}`` is YAML for the key ``"embed_dim:32"`` with no value, which timm would drop silently."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None and isinstance(key, str) and ":" in key:
                yield key
            yield from _keys_missing_a_space(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys_missing_a_space(item)


def check_kwargs(kwargs, flag: str) -> dict:
    """A ``--model-kwargs`` / ``--data-kwargs`` mapping (from the command line or a YAML file), checked."""
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) and key for key in kwargs):
        raise UsageError(f"{flag}: expected a mapping of names to values, got {kwargs!r}")
    for key in _keys_missing_a_space(kwargs):
        raise UsageError(
            f"{flag}: YAML reads {key!r} as a key without a value; put a space after the colon: "
            f"{key.replace(':', ': ', 1)!r}"
        )
    return kwargs


class ParseKwargs(argparse.Action):
    """``--model-kwargs a=1 b=[2,3]``: values are parsed as YAML scalars, lists or mappings."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"argument {option_string}: expected key=value, got {item!r}")
            try:
                kwargs[key] = yaml.safe_load(value)
            except yaml.YAMLError as error:
                parser.error(f"argument {option_string}: {item!r} is not valid YAML ({yaml_problem(error)})")
        setattr(namespace, self.dest, check_kwargs(kwargs, f"argument {option_string}"))


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or type(error).__name__}{where}"


@contextmanager
def usage_error_from(error_type: type[Exception]):
    """Report ``error_type`` (raised by the library, e.g. for a damaged run folder) as a :class:`UsageError`."""
    try:
        yield
    except error_type as error:
        raise UsageError(str(error)) from None


def read_config(path: Path, flag: str, actions: dict) -> dict:
    """Flag values from a YAML file, each checked as its command-line flag would be."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{flag} {path}: not valid YAML: {yaml_problem(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path}: cannot read it: {error}") from None
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise UsageError(f"{flag} {path}: expected a YAML mapping of flag names to values")
    config = {key.replace("-", "_"): value for key, value in config.items() if key not in ("config", "resume")}
    unknown = sorted(set(config) - set(actions))
    if unknown:
        raise UsageError(f"{flag} {path}: unknown keys {unknown}")
    return {key: config_value(actions[key], value, f"{flag} {path}: {key}") for key, value in config.items()}


def config_value(action: argparse.Action, value, where: str):
    if value is None and action.default is None:
        return None
    if isinstance(action, ParseKwargs):
        return check_kwargs(value, where)
    if action.type is not None:
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: {error}") from None
    elif action.nargs == 0 and not isinstance(value, bool):  # store_true and --amp/--no-amp
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    elif action.nargs != 0 and not isinstance(value, str):
        raise UsageError(f"{where}: expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"{where}: expected one of {list(action.choices)}, got {value!r}")
    return value


def parse_with_files(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """Parse twice: ``--resume``'s ``args.yaml`` and ``-c/--config`` set defaults, then the command line wins.

    ``parser`` has a ``--resume RUN_DIR`` flag; ``-c/--config`` is added here. Returns the flags and their YAML text
    (``args.yaml``, without ``--config`` and ``--resume``).

    Every value from a file is checked as its flag would be. On ``--resume``, only flags in
    :data:`faithful_vit.run_folder.RESUME_SAFE_FLAGS` may differ from ``args.yaml``.
    """
    pre = Parser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag values (keys: flag names)")
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    stored = None
    if known.resume:
        from faithful_vit import run_folder  # only on --resume: --help stays fast

        with usage_error_from(run_folder.RunFolderError):
            stored = run_folder.read_run_args(Path(known.resume), set(actions) - {"config", "resume"})
        where = f"--resume {Path(known.resume) / 'args.yaml'}"
        stored = {key: config_value(actions[key], value, f"{where}: {key}") for key, value in stored.items()}
        parser.set_defaults(**stored)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise UsageError(f"--config: no such file: {path}")
        parser.set_defaults(**read_config(path, "--config", actions))
    args = parser.parse_args(argv)
    if stored is not None:
        with usage_error_from(run_folder.RunFolderError):
            run_folder.check_resume_flags(stored, vars(args))
    return args, yaml.safe_dump({k: v for k, v in vars(args).items() if k not in ("config", "resume")})


def add_kwargs_flag(parser, flag: str, help: str, *, inherited: bool = False) -> None:
    """A ``flag KEY=VALUE ...`` option whose values are YAML (:class:`ParseKwargs`), as timm's ``--model-kwargs``.

    ``inherited``: the default is None (the value comes from elsewhere, e.g. a trained run) instead of ``{}``.
    """
    default = None if inherited else {}
    parser.add_argument(flag, nargs="*", default=default, action=ParseKwargs, metavar="KEY=VALUE", help=help)


def add_backend_flag(parser) -> None:
    """``--backend``: the attention kernels, as ``FAITHFUL_VIT_BACKEND`` chooses them."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="attention kernels: our Triton kernels, the PyTorch reference, or auto (Triton where it can run) "
        "(default: $FAITHFUL_VIT_BACKEND, else auto)",
    )


def backend_context(backend: str | None):
    """The attention backend of ``--backend`` for the body of a ``with`` (the environment's where it is None)."""
    if backend is None:
        return nullcontext()
    from faithful_vit.kernels import use_backend

    return use_backend(backend)


def run_command(prog: str, parser: argparse.ArgumentParser, run, argv: list[str] | None, errors: tuple = ()) -> int:
    """Parse ``argv``, run ``run(args)`` under ``--backend``; a usage error or one of ``errors`` is one line on
    stderr and exit code 2 (the library's own errors name what is wrong)."""
    try:
        args = parser.parse_args(argv)
        with backend_context(args.backend):
            run(args)
    except (UsageError, *errors) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0

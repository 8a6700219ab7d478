"""`python -m faithful_vit.kernels.check`: the command line, and that its cases fail when a kernel is wrong.

Tiny cases only (the interpreter on CPU). The NaN cases of masked attention fail on kernels that hide a NaN in a kept
token or leak one from a dropped query; the subsets here leave them out.
"""

import io
import os
import subprocess
import sys

import pytest
import torch

from faithful_vit.kernels import check
from faithful_vit.kernels._attention_core import OPS_AVAILABLE

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = ["masked/*/n1/*/skip", "varlen/*/single2/*", "opcheck/varlen*"]


def _cases(*patterns, mode="quick"):
    cases = check.select(check.build_cases(DEVICE, mode), list(patterns), [])
    assert cases, patterns
    return cases


def test_command_line_passes_on_a_subset_and_prints_one_line_per_case():
    """Without TRITON_INTERPRET in its environment the command turns the interpreter on itself (CPU) or compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = ["--quick", "--seed", "3", "--exclude", "*nan*", *(a for p in SMALL for a in ("--filter", p))]
    proc = subprocess.run(
        [sys.executable, "-m", "faithful_vit.kernels.check", *argv], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    names = [c.name for c in _cases(*SMALL)]
    assert lines[0].startswith(f"faithful_vit.kernels.check: {len(names)} cases, mode quick, seed 3, on ")
    if DEVICE.type == "cpu":
        assert "Triton interpreter" in lines[0]
    assert [line.split()[:2] for line in lines[1:-1]] == [["PASS", name] for name in names]
    assert lines[-1].startswith(f"PASS  {len(names)} of {len(names)} passed")


@pytest.mark.parametrize(
    ("family", "pattern"), [("masked_attention", "masked/*/n1/*/skip"), ("varlen_attention", "varlen/*/single2/*")]
)
def test_a_kernel_off_by_1e_2_fails_its_case_and_exit_status_1(monkeypatch, capsys, family, pattern):
    kernel = getattr(check, family)
    monkeypatch.setattr(check, family, lambda *args, **kwargs: kernel(*args, **kwargs) + 1e-2)
    assert check.main(["--quick", "--seed", "0", "--filter", pattern]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    (name,) = [c.name for c in _cases(pattern)]
    assert lines[1].startswith(f"FAIL  {name}  max err 1.00e-02 (out) > tol ")
    assert lines[-1].startswith("FAIL  0 of 1 passed") and name in lines[-1] and "--seed 0" in lines[-1]


def test_a_kernel_that_raises_fails_its_case_and_the_next_still_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available\nfor execution on the device")

    monkeypatch.setattr(check, "varlen_attention", broken)
    cases = _cases("varlen/*/single2/*", "masked/*/n1/*/skip")
    out = io.StringIO()
    failed = check.run_cases(cases, seed=0, out=out)
    text = out.getvalue().splitlines()
    assert failed == [c.name for c in cases if c.name.startswith("varlen")]
    varlen_line = next(line for line in text if "varlen" in line)
    assert varlen_line.startswith("FAIL") and "RuntimeError: no kernel image is available  [" in varlen_line
    assert next(line for line in text if "masked" in line).startswith("PASS")


def test_nan_cases_pass_on_isolating_kernels_and_fail_when_a_kernel_hides_nan(monkeypatch):
    """Varlen keeps NaN inside its sequence; a kernel that turns NaN into numbers fails the kept-NaN cases, and one
    that lets a NaN cross sequences fails the isolation case."""
    cases = _cases("varlen/*/nan-sequence/*", "varlen/*/nan-kept-k/*")
    assert check.run_cases(cases, seed=0, out=io.StringIO()) == []
    kernel = check.varlen_attention
    monkeypatch.setattr(check, "varlen_attention", lambda *a, **kw: kernel(*a, **kw).nan_to_num())
    assert check.run_cases(cases, seed=0, out=io.StringIO()) == [cases[1].name]
    leak = lambda q, k, v, *a, **kw: kernel(q, k, v, *a, **kw) + (q.sum() + k.sum() + v.sum()) * 0  # noqa: E731
    monkeypatch.setattr(check, "varlen_attention", leak)
    assert check.run_cases(cases, seed=0, out=io.StringIO()) == [c.name for c in cases]


def test_masked_nan_in_dropped_keys_passes():
    cases = _cases("masked/*/nan-dropped-key/skip")
    assert check.run_cases(cases, seed=1, out=io.StringIO()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--quick", "--full"], "not allowed with argument"),
        (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--filter", "no-such-case"], "no case matches"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert check.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err
    assert captured.err.startswith("python -m faithful_vit.kernels.check: error: ")


def test_list_prints_unique_names_of_every_family(capsys):
    assert check.main(["--list", "--full"]) == 0
    names = capsys.readouterr().out.split()
    assert len(names) == len(set(names))
    for prefix in ("masked/", "varlen/", "opcheck/"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert any("/nan-dropped-query/" in n for n in names) and any("/nan-kept-q/" in n for n in names)


def test_filter_and_exclude():
    cases = check.build_cases(DEVICE, "default")
    chosen = check.select(cases, ["varlen/*", "opcheck"], ["*nan*"])
    assert chosen and all(c.name.startswith(("varlen/", "opcheck/")) and "nan" not in c.name for c in chosen)
    assert len(check.select(cases, [], [])) == len(cases)


def test_in_process_the_interpreter_must_fit_the_device(monkeypatch, capsys):
    """`python -m` re-executes itself with TRITON_INTERPRET fixed; called as a function it names the fix instead."""
    monkeypatch.setattr(check, "TRITON_INTERPRET", DEVICE.type != "cpu")
    assert check.main(["--quick", "--filter", "opcheck"]) == 2
    err = capsys.readouterr().err
    want = "set TRITON_INTERPRET=1" if DEVICE.type == "cpu" else "unset TRITON_INTERPRET"
    assert err.count("\n") == 1 and f"{want} before faithful_vit is imported" in err


@pytest.mark.skipif(not OPS_AVAILABLE, reason="torch.library.triton_op is not available")
@pytest.mark.parametrize("family", ["masked", "varlen"])
def test_registered_ops_pass_opcheck(family):
    """opcheck of each family's forward and backward ops: the schemas on the CPU, FakeTensor and AOT dispatch on CUDA
    too (the ops have no autograd formula: the families' autograd Functions differentiate them)."""
    (case,) = _cases(f"opcheck/{family}*")
    assert case.run() == (
        True,
        "fwd, bwd: " + ("schema" if DEVICE.type == "cpu" else "schema, faketensor, aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("mode", check.MODES)
def test_gpu_plan_covers_the_dtypes_head_dims_and_lengths(monkeypatch, mode):
    """The case list for a GPU with bf16 (built, not run): unique names, every dtype, head dims 16 and 128 in bf16,
    sequence lengths 0, 1, 197 and 261."""
    monkeypatch.setattr(check, "supported_dtypes", lambda device, mode: (torch.float32, torch.float16, torch.bfloat16))
    names = [c.name for c in check.build_cases(torch.device("cuda"), mode)]
    assert len(names) == len(set(names))
    for part in ("/fp32/", "/fp16/", "/bf16/d64/", "/n0/", "/n1/", "/n197/", "nan-dropped-query", "opcheck/"):
        assert any(part in n for n in names), part
    if mode != "quick":
        for part in ("/bf16/d16/", "/bf16/d128/", "/n261/"):
            assert any(part in n for n in names), part

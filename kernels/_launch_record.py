"""A stand-in for Triton launches that records each kernel and its arguments instead of running it.

Tools that need the launchers' host logic without a GPU use it: ``scripts/compile_kernels.py`` compiles every recorded
launch for a CUDA target, ``benchmarks/bench_host.py`` times the Python work of a call with the launches removed,
and ``tests/test_dynamic_shapes.py`` traces the launchers under torch.compile.
Two ways to use one :class:`LaunchRecorder`:

* as a launcher's ``launch`` argument: ``launch(kernel)[grid](*args, **kwargs)`` records;
* as a context manager: inside ``with LaunchRecorder() as record:`` every launch of the kernels of both families
  records, whichever way the public functions reach them (directly, or through a ``triton_op`` and
  ``torch.library.wrap_triton``, which call the kernel's ``run``).

With ``bind=True`` each recorded launch also runs the argument binding that Triton's JIT does before every GPU launch
(the specialisation of every argument for the CUDA backend, then the cache key): the part of a launch's host cost that
grows with the number of arguments. The cache lookup and the driver call that follow are not modelled.
"""

from __future__ import annotations

import importlib

import torch
from torch.fx.experimental.symbolic_shapes import guard_scalar
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction, KernelInterface, compute_cache_key, create_function_from_signature

__all__ = ["LaunchRecorder"]

# The modules whose kernels the context manager records.
KERNEL_MODULES = ("faithful_vit.kernels.masked_attention", "faithful_vit.kernels.varlen_attention")
CUDA_TARGET = GPUTarget("cuda", 90, 32)
_SYMBOLIC = (torch.SymInt, torch.SymBool, torch.SymFloat)


class _Binding:
    """Triton's JIT argument binding of one kernel for the CUDA backend (what ``JITFunction.run`` does first)."""

    def __init__(self, kernel: KernelInterface):
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # an interpreter kernel: its fn
        self.binder = create_function_from_signature(jit.signature, jit.params, CUDABackend(CUDA_TARGET))
        self.key_cache: dict = {}

    def __call__(self, args, kwargs) -> None:
        _, specialization, options = self.binder(*args, **kwargs)
        compute_cache_key(self.key_cache, specialization, options)


class LaunchRecorder:
    """Records ``(kernel, grid, args, kwargs)`` for every launch in :attr:`launches` instead of running the kernel.

    Under torch.compile tracing the keyword arguments (the launchers pass the constexprs and launch options by
    keyword) are specialised to plain values as ``torch.library.wrap_triton`` specialises a kernel's constexprs: a
    symbolic size there costs a guard on its value, as it does on a GPU.
    """

    def __init__(self, *, bind: bool = False):
        self.launches: list[tuple[KernelInterface, tuple, tuple, dict]] = []
        self._bindings: dict[int, _Binding] | None = {} if bind else None
        self._patched: list[KernelInterface] = []

    def record(self, kernel: KernelInterface, grid: tuple, args: tuple, kwargs: dict) -> None:
        if type(args[0]) is not torch.Tensor:  # fake or functional tensors: tracing (real calls skip the loop)
            kwargs = {name: guard_scalar(v) if isinstance(v, _SYMBOLIC) else v for name, v in kwargs.items()}
        if self._bindings is not None:
            binding = self._bindings.get(id(kernel))
            if binding is None:
                binding = self._bindings[id(kernel)] = _Binding(kernel)
            binding(args, kwargs)
        self.launches.append((kernel, grid, args, kwargs))

    def __call__(self, kernel: KernelInterface):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.record(kernel, grid, args, kwargs)

        return _Grid()

    def __enter__(self) -> LaunchRecorder:
        for module_name in KERNEL_MODULES:
            for value in vars(importlib.import_module(module_name)).values():
                if isinstance(value, KernelInterface) and all(value is not seen for seen in self._patched):
                    # An instance attribute shadows the class's run, which kernel[grid](...) and wrap_triton both call.
                    value.run = lambda *args, grid, warmup, _kernel=value, **kwargs: self.record(
                        _kernel, grid, args, kwargs
                    )
                    self._patched.append(value)
        return self

    def __exit__(self, *exc) -> None:
        for kernel in self._patched:
            del kernel.run
        self._patched.clear()

"""Compile-or-eager wrapper used by every compiled primitive.

Each hot function is compiled with ``torch.compile(dynamic=True, fullgraph=True)``, without duck sizing and with
size-oblivious reasoning on sizes (no 0/1 specialization), once per combination of its constant arguments
(format, block size, flags): tensor sizes stay symbols, so one graph serves every tensor, whatever its shape (a
size of 1, rows of one block or of whole blocks, odd 4-bit rows included), never compiled per parameter or per
kind of shape. When compilation is unavailable (no C++ compiler, an unsupported platform) the same Python function
runs eagerly after one warning; nothing falls back silently. ``LOWBIT_FN_COMPILE=0`` in the environment forces the
eager path.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any, Callable, Hashable

import torch

__all__ = ["compiled", "compile_enabled"]

_broken: list[BaseException] = []  # the first compile failure; afterwards every primitive runs eagerly
# graphs one variant may hold before dynamo stops compiling it; one is expected (sizes are never specialized)
_LIMIT = 64


def compile_enabled() -> bool:
    """Whether lowbit_fn's primitives run compiled (``False`` after a compile failure or with ``LOWBIT_FN_COMPILE=0``)."""
    return not _broken and os.environ.get("LOWBIT_FN_COMPILE", "1") != "0"


def _is_compile_failure(err: BaseException) -> bool:
    from torch._dynamo import exc as dynamo_exc

    kinds: tuple[type, ...] = (dynamo_exc.BackendCompilerFailed,)
    try:
        from torch._inductor import exc as inductor_exc

        kinds += tuple(
            k for k in (getattr(inductor_exc, n, None) for n in ("InductorError", "CppCompileError", "InvalidCxxCompiler"))
            if isinstance(k, type)
        )
    except ImportError:  # pragma: no cover - inductor missing entirely
        pass
    return isinstance(err, kinds)


def _static_key(value: Any) -> Hashable:
    """What a graph specializes on: tensor dtype/device/rank, list lengths, and non-tensor values (formats,
    configurations, flags, ints, None), which are constants of the graph. Tensor sizes are left out: they stay
    symbolic (``dynamic=True``)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.device.type, value.dim())
    if isinstance(value, (list, tuple)):
        return tuple(_static_key(v) for v in value)
    return value


def _is_input(value: Any) -> bool:
    """Whether an argument is an input of the graph (tensors and lists of them: their sizes stay symbolic) rather
    than a constant baked into it (formats, configurations, flags, ``None``, ints: a block size is a literal in
    the generated code, not a division by a symbol; sizes come from tensors)."""
    return isinstance(value, (torch.Tensor, list))


def _unview(value: Any) -> Any:
    """A view as a plain alias of the same memory (``detach()`` drops the view's base): dynamo guards on a view's
    base sizes, so views of differently shaped tensors would otherwise each compile a graph."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value._base is not None else value
    if isinstance(value, list):
        return [_unview(v) for v in value]
    return value


class compiled:  # noqa: N801 - used as a decorator
    """Decorator: run ``fn`` through ``torch.compile`` when possible, eagerly otherwise.

    Every combination of static arguments (format, dtypes, amsgrad's extra buffers, ...) gets its own copy of the
    function's code object, so each has its own graph cache: sizes are dynamic within it (one graph per
    combination, whatever the shapes), and no combination can push another past dynamo's recompile limit. Inside
    a caller's own ``torch.compile`` region the plain function is called so the caller's graph inlines it.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._variants: dict[Hashable, Callable[..., Any]] = {}
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def _variant(self, args: tuple[Any, ...]) -> Callable[..., Any]:
        key = tuple(_static_key(a) for a in args)
        variant = self._variants.get(key)
        if variant is None:
            fn = self.fn
            clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            baked = {i: a for i, a in enumerate(args) if not _is_input(a)}
            count = len(args)

            def call(*inputs: Any) -> Any:  # the static arguments are constants of the graph, not inputs
                rest = iter(inputs)
                return clone(*[baked[i] if i in baked else next(rest) for i in range(count)])

            # a code object of its own: dynamo keeps its graphs per code object, and variants must not share them
            call = types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, None, call.__closure__)
            variant = self._variants[key] = torch.compile(call, dynamic=True, fullgraph=True)
        return variant

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling() or not compile_enabled():
            return self.fn(*args)
        args = tuple(_unview(a) for a in args)
        try:
            # no duck sizing: two sizes that happen to be equal (a square matrix, one block per row) must not
            # become one symbol; size-oblivious sizes: a size of 0 or 1 stays a symbol (no 0/1 specialization), so
            # the first call's shapes compile the one graph of the variant and no later shape recompiles
            with torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True), torch._dynamo.config.patch(recompile_limit=_LIMIT, specialize_int=True):
                return self._variant(args)(*[a for a in args if _is_input(a)])
        except Exception as err:  # compilation happens before the graph runs: inputs are untouched on failure
            if not _is_compile_failure(err):
                raise
            _broken.append(err)
            warnings.warn(
                f"lowbit_fn: torch.compile is unavailable ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "running the same math eagerly from now on (slower).",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)

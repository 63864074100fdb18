"""Compile-or-eager wrapper used by every compiled primitive.

Each hot function is compiled once with ``torch.compile(dynamic=True, fullgraph=True)``, so its graph is reused
for every tensor length (one graph per format, not per parameter or shape). When compilation is unavailable
(no C++ compiler, an unsupported platform) the same Python function runs eagerly after one warning; nothing
falls back silently. ``LOWBIT_FN_COMPILE=0`` in the environment forces the eager path.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

__all__ = ["compiled", "compile_enabled"]

_broken: list[BaseException] = []  # the first compile failure; afterwards every primitive runs eagerly


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


class compiled:  # noqa: N801 - used as a decorator
    """Decorator: run ``fn`` through ``torch.compile`` when possible, eagerly otherwise.

    Inside a caller's own ``torch.compile`` region the plain function is called so the caller's graph inlines it.
    """

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or not compile_enabled():
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args, **kwargs)
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
            return self.fn(*args, **kwargs)

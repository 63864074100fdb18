"""The native CPU kernel: ``native.c`` built on first use for this machine and called through ctypes.

It serves every rule of :mod:`lowbit_fn.kernels.rules`. One call steps any number of tensors (*segments*) and can
finish the step in the same pass: weight decay, learning rate and the in-place parameter update (the *epilogue*), reading and writing float32, bfloat16 or
float16 parameters and gradients block by block (no full-size float32 copy). The build is plain C (no torch headers), so it
takes under a second: ``$CC`` (default ``gcc``) with ``-O3 -march=native -fopenmp -ffp-contract=off`` (plus
``$LOWBIT_FN_NATIVE_FLAGS``), cached under ``$LOWBIT_FN_CACHE`` (default ``~/.cache/lowbit_fn``) by a hash of the
source, the flags, the compiler and the CPU, and reused across processes. When many processes start at once (the
ranks of a ``torchrun``), one builds while the others wait on a lock file beside the library, then they all load
the same file; where locks do not work (some network filesystems shared by several nodes) several may build, but
a cached library is never replaced (see :func:`_build`). A built library ends with a seal (its size and sha256),
checked before it is loaded: a truncated or corrupt cached file is removed and rebuilt, with one warning. Without a
working compiler, with a cache directory that cannot be written (read-only, full) or a cached file that cannot be
replaced or is not this build (it fails to load, or its ``lowbit_abi()`` differs), the compiled torch path runs
instead, after one warning naming the cause; ``LOWBIT_FN_NATIVE=0`` selects that path explicitly. The native
kernel computes exactly what the reference path computes (identical codes, scales, directions and parameters).
Inside a user's ``torch.compile`` the call is a graph break (see ``kernels/step.py``): it runs eagerly.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor

from .._random import stream_key_int, tensor_key_int

if TYPE_CHECKING:
    from .rules import Rule
    from .step import StepConfig

try:
    import fcntl
except ImportError:  # Windows: no flock; the create-if-absent link in _build alone keeps a cached library in place
    fcntl = None

__all__ = ["native_available", "native_step", "native_serves_rule", "NATIVE_DTYPES"]

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
_FORMAT_CODES = {"8bit": 0, "4bit": 1, "fp8": 2, "fp32": 3}
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_fingerprint() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _flags() -> list[str]:
    """The compiler flags, plus ``$LOWBIT_FN_NATIVE_FLAGS`` (e.g. ``-DLOWBIT_PORTABLE`` for the portable code only)."""
    return _FLAGS + os.environ.get("LOWBIT_FN_NATIVE_FLAGS", "").split()


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created if absent) for the block: one process of the node at a time.

    The kernel releases the lock when its holder exits or dies, so a killed build never leaves the cache locked;
    the file itself stays in place (deleting it would let a waiter and a newcomer lock two different files). Where
    locking is unavailable (no ``fcntl``; ``flock`` failing, as on some network filesystems) the block runs
    unlocked and :func:`_build` relies on its create-if-absent link alone."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # no working locks on this filesystem: the link alone keeps a cached library in place
            pass
        yield  # closing the file releases the lock


_SEAL = b"lowbit_fn-native"  # the last bytes of a built library: sha256(body) + len(body) (8 bytes LE) + _SEAL
_SEAL_BYTES = 32 + 8 + len(_SEAL)
_SEG_FIELDS = 19  # int64 fields per segment row (see native_step); the library's lowbit_abi() must return it


class NativeBuildError(RuntimeError):
    """Why the native kernel is unavailable; its message is the warning's."""


def _sealed(path: Path) -> bool:
    """Whether ``path`` ends with the seal :func:`_compile` appended: its body's size and sha256. The loader maps
    an ELF file by offsets from its headers, so a truncated library can pass ``dlopen`` and crash the process (SIGBUS)
    when a missing page is touched; this check runs before ``dlopen`` and refuses any file cut short or changed."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if len(data) < _SEAL_BYTES or not data.endswith(_SEAL):
        return False
    body, digest, size = data[:-_SEAL_BYTES], data[-_SEAL_BYTES:-_SEAL_BYTES + 32], data[-len(_SEAL) - 8:-len(_SEAL)]
    return int.from_bytes(size, "little") == len(body) and hashlib.sha256(body).digest() == digest


def _seal(path: Path) -> None:
    """Appends the seal :func:`_sealed` checks to the file at ``path`` (flushed to disk)."""
    body = path.read_bytes()
    with open(path, "ab") as f:
        f.write(hashlib.sha256(body).digest() + len(body).to_bytes(8, "little") + _SEAL)
        f.flush()
        os.fsync(f.fileno())


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Builds the library into a temporary file beside ``target``, seals it (:func:`_sealed`), then links it to
    ``target`` only if that is still absent: a library another process has built (and may have mapped) is never
    replaced, and ``target`` never holds a partly written file."""
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
    except OSError as err:
        raise NativeBuildError(f"cannot write to the cache directory {target.parent} ({err.strerror}); "
                               f"set LOWBIT_FN_CACHE to a writable directory") from err
    os.close(fd)
    tmp = Path(name)
    try:
        result = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            message = " ".join(result.stderr.split())[-300:]
            raise NativeBuildError(f"the C compiler {cc} failed (exit status {result.returncode}): {message}")
        try:
            _seal(tmp)
        except OSError as err:  # e.g. ENOSPC: the cache directory's filesystem is full
            raise NativeBuildError(f"cannot write the library into {target.parent} ({err.strerror})") from err
        try:
            os.link(tmp, target)  # atomic create-if-absent: FileExistsError instead of replacing
        except FileExistsError:
            pass  # built meanwhile by a process the lock did not hold back: load that one
    finally:
        tmp.unlink(missing_ok=True)


def _compiler_version(cc: str) -> str:
    try:
        result = subprocess.run([cc, "--version"], capture_output=True, text=True)
    except OSError as err:
        raise NativeBuildError(f"no C compiler: {cc} ({err.strerror}; set CC to one)") from err
    if result.returncode != 0:
        raise NativeBuildError(f"the C compiler {cc} does not run: `{cc} --version` exited with status {result.returncode}")
    return result.stdout


def _load(target: Path) -> ctypes.CDLL:
    """Loads a sealed library and checks that it is this version's (its ``lowbit_abi()``). The seal guards against
    a damaged file; a library for another CPU gets another name, since the cache key holds the CPU's flags: an
    instruction this CPU lacks would kill the process at the first call, and no check after loading could catch
    it."""
    try:
        lib = ctypes.CDLL(str(target))
        abi = lib.lowbit_abi()
        fn = lib.lowbit_step
    except (OSError, AttributeError) as err:
        raise NativeBuildError(f"the cached library {target} does not load ({err}); delete it to rebuild") from err
    if abi != _SEG_FIELDS:
        raise NativeBuildError(f"the cached library {target} is another version's (layout {abi}, expected "
                               f"{_SEG_FIELDS}); delete it to rebuild")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    fn.argtypes = [p, i64, i64, i32, i32, i32, i32, i32, p, p, i32, p, p, p, p, p, p, i32, i32, i32, i32]
    fn.restype = i32
    return lib


def _damaged(target: Path, err: OSError) -> NativeBuildError:
    return NativeBuildError(f"the cached library {target} is truncated or corrupt ({target.stat().st_size} bytes) "
                            f"and cannot be removed ({err.strerror}); delete it or set LOWBIT_FN_CACHE elsewhere")


def _build() -> ctypes.CDLL:
    """Compiles ``native.c`` unless the cache holds it (keyed by source, flags, compiler and CPU) and loads it.

    One process builds at a time (:func:`_exclusive` on ``<library>.lock``); a process that waited finds the
    library its predecessor built and loads it. A cached file that is not sealed (truncated, corrupt, or written
    by something else) is never loaded: it is removed and rebuilt, with a warning, or, where the cache cannot be
    written, the kernel is unavailable. Raises :class:`NativeBuildError` when the kernel cannot be had."""
    cc = os.environ.get("CC", "gcc")
    flags = _flags()
    version = _compiler_version(cc)
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(flags).encode() + _cpu_fingerprint().encode() + _SEAL).hexdigest()[:20]
    cache = Path(os.environ.get("LOWBIT_FN_CACHE", Path.home() / ".cache" / "lowbit_fn"))
    target = cache / f"native_{key}.so"
    if not _sealed(target):
        with contextlib.ExitStack() as stack:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                stack.enter_context(_exclusive(target.with_suffix(".lock")))
            except OSError as err:
                if target.exists():
                    raise _damaged(target, err) from err
                raise NativeBuildError(f"cannot write to the cache directory {cache} ({err.strerror}); "
                                       f"set LOWBIT_FN_CACHE to a writable directory") from err
            if target.exists() and not _sealed(target):  # checked again: a waited-for build may have replaced it
                size = target.stat().st_size
                try:
                    target.unlink()  # a process that mapped it keeps its own copy of the inode
                except OSError as err:
                    raise _damaged(target, err) from err
                warnings.warn(f"lowbit_fn: the cached native library {target} was truncated or corrupt "
                              f"({size} bytes); rebuilding it.", RuntimeWarning, stacklevel=4)
            if not target.exists():
                _compile(cc, flags, target)
        if not _sealed(target):
            raise NativeBuildError(f"the library {target} did not verify after its build")
    return _load(target)


def _library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _build()
                except Exception as err:  # no compiler, a failed build, an unwritable cache, an unloadable library
                    _state["lib"] = None
                    reason = str(err) if isinstance(err, NativeBuildError) else f"{type(err).__name__}: {err}"
                    warnings.warn(
                        f"lowbit_fn: the native CPU kernel is unavailable ({' '.join(reason.split())[:400]}); "
                        f"using the compiled torch path.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _state["lib"]  # type: ignore[return-value]


def native_available(device: torch.device) -> bool:
    """Whether the native kernel serves tensors on ``device`` (CPU, enabled, and built)."""
    return device.type == "cpu" and os.environ.get("LOWBIT_FN_NATIVE", "1") != "0" and _library() is not None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


_E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
_luts: dict[tuple[int, bytes, str], Tensor] = {}


def _cached(codebook: Tensor, kind: str, make: Callable[[], Tensor]) -> Tensor:
    """A table derived from ``codebook``, built once per codebook (keyed by its address and contents)."""
    key = (codebook.data_ptr(), codebook.numpy().tobytes(), kind)
    if key not in _luts:
        _luts[key] = make()
    return _luts[key]


def _count_table(points: Tensor) -> Tensor:
    """uint8[65536]: for each top-16-bit prefix of a float32, ``min(#points below its interval, 255)`` (``points``
    sorted). Raises if an interval holds two points: one comparison must finish the count."""
    prefix = torch.arange(1 << 16, dtype=torch.int64)
    bits = prefix << 16
    negative = prefix >= 0x8000  # negative prefixes run backwards: their smallest value has all low bits set
    low = torch.where(negative, bits | 0xFFFF, bits).to(torch.int32).view(torch.float32)
    high = torch.where(negative, bits, bits | 0xFFFF).to(torch.int32).view(torch.float32)
    below = torch.searchsorted(points, low.contiguous(), side="left")
    inside = torch.searchsorted(points, high.contiguous(), side="right") - below
    finite = torch.isfinite(low) & torch.isfinite(high)
    if bool((inside[finite] > 1).any()):
        raise ValueError("codebook entries closer than the prefix table resolves")
    # NaN intervals: 0 (NaN inputs are handled apart); the +inf interval counts every point, the -inf one none
    return torch.where(torch.isnan(low), 0, below.clamp(max=255)).to(torch.uint8)


def prefix_table(codebook: Tensor) -> Tensor:
    """uint8[65536]: for each top-16-bit prefix of a float32, ``min(#entries below its interval, n - 1)``: with
    one comparison, ``c + (map[c] < y)`` is the search's index (stochastic rounding needs the entries around y)."""
    return _cached(codebook, "prefix", lambda: _count_table(codebook).clamp(max=codebook.numel() - 1))


def threshold_table(codebook: Tensor) -> Tensor:
    """uint8[65536]: for each top-16-bit prefix of a float32, the number of nearest-rounding thresholds below its
    interval: with one comparison, ``a + (t[a + 1] <= y)`` is the nearest code (``t = nearest_thresholds``)."""
    return _cached(codebook, "threshold_counts", lambda: _count_table(nearest_thresholds(codebook)[1:-1].contiguous()))


EPILOGUE_L2, EPILOGUE_DECOUPLED, EPILOGUE_SCALE, EPILOGUE_APPLY = 1, 2, 4, 8


def nearest_thresholds(codebook: Tensor) -> Tensor:
    """float32[n + 1]: ``t[k]`` is the smallest float32 ``y`` in ``(map[k-1], map[k]]`` for which the reference's
    nearest rounding picks ``k`` (``|map[k] - y| < |y - map[k-1]|`` in float32); ``t[0] = -inf``, ``t[n] = +inf``.
    That comparison is monotone in ``y``, so the nearest code is the number of ``t[1..n-1]`` at or below ``y``.
    Found by bisection over the float32 bit patterns."""

    def make() -> Tensor:
        below, above = codebook[:-1].float(), codebook[1:].float()

        def ordered(x: Tensor) -> Tensor:  # float32 -> int64, order-preserving (both zeros at 0)
            bits = x.view(torch.int32).to(torch.int64)
            return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

        def unordered(o: Tensor) -> Tensor:
            return torch.where(o < 0, (-o) | 0x80000000, o).to(torch.uint32).view(torch.float32)

        lo, hi = ordered(below), ordered(above)  # the upper entry is picked at hi, not at lo
        while bool((hi - lo > 1).any()):
            mid = (lo + hi) // 2
            y = unordered(mid)
            up = (above - y).abs() < (y - below).abs()
            hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
        return torch.cat([torch.tensor([-math.inf]), unordered(hi), torch.tensor([math.inf])])

    return _cached(codebook, "thresholds", make)


def _padded_table(codebook: Tensor, stochastic: bool) -> Tensor:
    """The kernel's prefix table (over the map for stochastic rounding, over the thresholds for nearest) with 4
    bytes of padding (the kernel reads it with 32-bit gathers)."""
    table = prefix_table if stochastic else threshold_table
    return _cached(codebook, f"padded{stochastic}", lambda: torch.cat([table(codebook), torch.zeros(4, dtype=torch.uint8)]))


_NO_MAP = torch.empty(1, dtype=torch.float32)  # FP8 and float32 state have no maps
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NATIVE_DTYPES = tuple(_DTYPES)  # parameter, gradient and output dtypes the kernel reads and writes
NATIVE_SCALARS = 10  # the kernel's scalars: the rule's (RULES_MAX_SCALARS slots), the weight decay, the lr factor
_NATIVE_RULES = frozenset(range(6))  # the native_id of every rule in rules.py


def native_serves_rule(rule: "Rule") -> bool:
    """Whether the kernel implements ``rule`` (the others run the compiled reference): every rule of
    :mod:`lowbit_fn.kernels.rules`."""
    return rule.native_id in _NATIVE_RULES


def native_step(
    grads: list[Tensor], moments: list[list[Tensor]], rows: list[int], bases: list[int], idents: list[int], step: int,
    scalars: Tensor, config: "StepConfig", *,
    params: list[Tensor] | None = None, outs: list[Tensor] | None = None, mode: int = 0, param_sr: bool = False,
) -> None:
    """One step of ``config.rule`` over several tensors (*segments*) in one call; see
    :func:`lowbit_fn.kernels.moment_step`.

    Segment ``s``: gradient ``grads[s]`` (contiguous float32, bfloat16 or float16), its moments ``moments[s]``
    (``[codes, scale]`` per moment in the row layout of :mod:`lowbit_fn.formats`; with ``fmt=None``, one float32
    tensor per moment of the gradient's size), its row length ``rows[s]`` (the whole length for full-precision
    state, where blocks only divide the work), the index of its first element in the whole tensor ``bases[s]``
    and its 32-bit identity ``idents[s]`` (both select its stochastic rounding), and, depending on ``mode``
    (``EPILOGUE_*`` bits), its parameter ``params[s]`` and output ``outs[s]`` (contiguous, any of the three
    dtypes). ``scalars`` (float32, :data:`NATIVE_SCALARS`) holds the rule's scalars padded with zeros to
    :data:`~lowbit_fn.kernels.rules.RULES_MAX_SCALARS`, the weight decay and the signed learning rate. Mode 0
    writes the direction; ``EPILOGUE_L2`` adds ``p * weight_decay`` to the gradient first,
    ``EPILOGUE_DECOUPLED`` adds it to the direction, ``EPILOGUE_SCALE`` multiplies by the learning rate factor,
    and ``EPILOGUE_APPLY`` adds the result to the parameter in place (no output), rounded to its dtype
    (stochastically for bfloat16 with ``param_sr``): exactly the float32 operations of
    :func:`lowbit_fn.kernels.reference.tensor_step`. The caller checks dtypes, devices and contiguity.
    """
    fmt, block_size, stochastic, seed = config.fmt, config.block_size if config.fmt is not None else 256, config.stochastic, config.seed
    if not grads:
        return
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernel was called but is not available")
    name = fmt.name if fmt is not None else "fp32"
    codebooks = name in ("8bit", "4bit")
    signed = fmt.codebook(True) if codebooks else _NO_MAP
    unsigned = fmt.codebook(False) if codebooks else _NO_MAP
    per = 1 if fmt is None else 2  # tensors per moment: float32 values, or codes and scales
    rule = config.rule
    signed_moments = rule.signed()
    nmom = len(signed_moments)
    if any(len(mom) != per * nmom for mom in moments):
        raise ValueError(f"native_step: {type(rule).__name__} has {nmom} moments, {per} tensors each")
    if scalars.dtype != torch.float32 or scalars.numel() != NATIVE_SCALARS or not scalars.is_contiguous():
        raise ValueError(f"native_step: scalars must be {NATIVE_SCALARS} contiguous float32 values")
    stochastic = stochastic and fmt is not None
    streams = [stream_key_int(seed, i, step) for i in range(4)]
    rows_ = []
    for s, (g, mom) in enumerate(zip(grads, moments)):
        codes = [_ptr(mom[per * i]) for i in range(nmom)] + [0] * (3 - nmom)
        scales = [_ptr(mom[per * i + 1]) if per == 2 else 0 for i in range(nmom)] + [0] * (3 - nmom)
        p = params[s] if params else None
        o = outs[s] if outs else None
        keys = [tensor_key_int(streams[i], idents[s]) if (stochastic and i < nmom) or (i == 3 and param_sr) else 0 for i in range(4)]
        rows_ += [_ptr(g), _ptr(o) if o is not None else 0, _ptr(p) if p is not None else 0, g.numel(), rows[s], bases[s],
                  _DTYPES[g.dtype], _DTYPES[p.dtype] if p is not None else 0, _DTYPES[o.dtype] if o is not None else 0,
                  *keys, *codes, *scales]  # the kernel's segment fields, in its order
    segs = torch.tensor(rows_, dtype=torch.int64)
    luts = [_ptr(_padded_table(m, stochastic)) for m in (signed, unsigned)] if codebooks else [0, 0]
    thresholds = [_ptr(nearest_thresholds(m)) for m in (signed, unsigned)] if codebooks else [0, 0]
    signed_mask = sum(1 << i for i, s in enumerate(signed_moments) if s)
    failed = lib.lowbit_step(
        _ptr(segs), len(grads), block_size, nmom, rule.native_id, rule.flags(), signed_mask, _FORMAT_CODES[name],
        _ptr(signed), _ptr(unsigned), signed.numel(), _ptr(_E4M3), *luts, *thresholds, _ptr(scalars), int(stochastic),
        int(param_sr), mode, torch.get_num_threads(),
    )
    if failed == 2:
        raise ValueError(f"lowbit_fn native kernel: {rule} is not a rule it knows with these moments")
    if failed:
        raise MemoryError("lowbit_fn native kernel: could not allocate its scratch buffers")

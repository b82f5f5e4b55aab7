"""Fused numba kernels for the Keras 2.2.4 update rules: one pass over memory per step.

:class:`NumbaBackend` runs each rule of :mod:`paramserver.server.optim.rules` as one loop that reads
every array once and writes each updated array once, where the chunked numpy kernel makes several
passes through scratch buffers. The gradient transform (clipnorm's scale, clipvalue's clip) is fused
into the same loop.

Exactness: each kernel performs the same IEEE operations, in the same order and in the array's
dtype, as the numpy kernel of its rule (float32 arrays are computed in float32: coefficients
are passed as float32 scalars and no float64 literal appears in a kernel). The kernels are
compiled with ``fastmath=False``, so LLVM neither contracts ``a*b + c`` into an FMA nor
reassociates, and results are bit-identical to
:class:`~paramserver.server.optim.engine.NumpyBackend` for float32 and float64. Other dtypes
(float16), arrays that are not 1-D and C-contiguous or not all of one dtype, read-only parameters or
slots, and numpy coefficients of another dtype (with which numpy would compute in the wider dtype)
go to the fallback backend.

Compilation: each kernel is compiled for one fixed signature per dtype (the gradient typed as
a read-only array, so that writable and read-only gradients share it), on first use or by
:meth:`NumbaBackend.warm_up`, never per request: 5-10 s for all of them on 2 cores, against
0.3 s to load them from numba's disk cache (``cache=True``). numba caches in the first
writable place of: ``$NUMBA_CACHE_DIR``, the package's ``__pycache__``, the user's cache
directory (``~/.cache/numba``); it needs write access even to load. A container image compiles
the kernels when it is built (:func:`build_cache`, into the installed package's
``__pycache__``, read-only at run time) and :func:`prepare_cache` copies them into
``$NUMBA_CACHE_DIR`` (or, when that is not writable, a private directory under the temporary
directory or ``/dev/shm``) before the first kernel loads. numba's cache is keyed by the CPU
(its name and features): on another CPU than the image's builder the kernels are compiled
once into that directory. When no place is writable, numba itself refuses ``cache=True`` (a
``RuntimeError``, not a warning): this module then compiles in memory, logs that once, and
works the same.

Speed (``python -m benchmarks.kernels``; float32, one thread, 2-core AMD EPYC Zen 4): from
memory (1e7 elements) every kernel runs within a few percent of a loop that only reads and
writes the same arrays, and Adam beats torch's fused CPU Adam at every size. In cache (1e5 to
1e6 elements) the rules that divide and take square roots are bound by the divider instead:
about 0.12 ns per float32 division and 0.2 ns per square root and element here, so Adam and
RMSprop take ~0.32 ns per element, Adadelta (two roots) ~0.5 and Nadam (four divisions) ~0.65,
against ~0.2-0.27 ns to move their arrays through L3. These are the correctly rounded IEEE
operations that numpy performs; replacing them (reciprocals, ``rsqrt``) would break bit
identity. Neither a 256-bit vector width nor removing the neutral scale/clip ops changed that.
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import types as nbt

from .kernels import KernelBackend, NumpyBackend, RowsKernel, UpdateKernel
from .rules import RULES, UpdateRule

__all__ = [
    "JIT_OPTIONS",
    "SHIPPED_CACHE",
    "SUPPORTED_DTYPES",
    "NumbaBackend",
    "WarmUp",
    "build_cache",
    "prepare_cache",
]

logger = logging.getLogger(__name__)

#: The dtypes the fused kernels are compiled for; anything else goes to the fallback.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

#: Options of every kernel: numpy's float semantics (no ZeroDivisionError), no FMA contraction
#: or reassociation, the GIL released (the server steps different sessions in threads).
JIT_OPTIONS: dict[str, Any] = {
    "error_model": "numpy",
    "fastmath": False,
    "nogil": True,
    "boundscheck": False,
    "cache": True,
}


# --- the fused gradient transform --------------------------------------------------------


@numba.njit(inline="always", error_model="numpy", fastmath=False, boundscheck=False)
def _grad(
    g: np.ndarray,
    i: int,
    scale: float,
    lo: float,
    hi: float,
) -> float:
    """``clip(g[i] * scale, lo, hi)`` as the numpy backend does it (NaN passes through).

    ``scale = 1`` and ``lo, hi = -inf, inf`` are exact no-ops, so one compiled loop serves
    every combination of clipnorm and clipvalue.
    """
    gi = g[i] * scale
    gi = lo if gi < lo else gi
    return hi if gi > hi else gi


@numba.njit(inline="always", error_model="numpy", fastmath=False, boundscheck=False)
def _maximum(
    x: float,
    y: float,
) -> float:
    """``np.maximum(x, y)`` for one element: a NaN in either gives that NaN, and equal values
    give ``y`` (as numpy does: ``maximum(-0.0, 0.0)`` is ``0.0``, ``maximum(0.0, -0.0)`` is
    ``-0.0``)."""
    return x if (x > y or x != x) else y


# --- the kernels: same operations, same order as paramserver.server.optim.rules -------------------
#
# Signature of every kernel: (p, g, index, width, *slots, *coefficients, scale, clip). The
# kernel steps rows ``index`` of ``width`` elements of ``p`` and the slots with the rows of
# ``g`` in order (row ``r`` of ``g`` is ``g[r * width : (r + 1) * width]``): a dense step is one
# row, ``index = [0]`` and ``width = p.size`` (:data:`_WHOLE`); a lazy row-sparse step is the
# touched rows, in place, with nothing gathered or scattered. Comments give the numpy kernel's
# grouping; each binary operation rounds to the array dtype.


def _sgd(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    momentum: float,
    lr: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            lrg = gi * lr
            mi = (m[i] * momentum) - lrg  # v = momentum * m - lr * g
            m[i] = mi
            p[i] = p[i] + mi
        at += width


def _sgd_nesterov(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    momentum: float,
    lr: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            lrg = gi * lr
            mi = (m[i] * momentum) - lrg
            m[i] = mi
            p[i] = (p[i] + (mi * momentum)) - lrg  # p = (p + momentum * v) - lr * g
        at += width


def _rmsprop(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    a: np.ndarray,
    rho: float,
    one_minus_rho: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            ai = (a[i] * rho) + ((gi * gi) * one_minus_rho)
            a[i] = ai
            p[i] = p[i] - ((gi * lr) / (math.sqrt(ai) + eps))
        at += width


def _adagrad(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    a: np.ndarray,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            ai = a[i] + (gi * gi)
            a[i] = ai
            p[i] = p[i] - ((gi * lr) / (math.sqrt(ai) + eps))
        at += width


def _adadelta(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    a: np.ndarray,
    d_a: np.ndarray,
    rho: float,
    one_minus_rho: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            ai = (a[i] * rho) + ((gi * gi) * one_minus_rho)
            a[i] = ai
            di = d_a[i]
            u = (gi * math.sqrt(di + eps)) / math.sqrt(ai + eps)
            p[i] = p[i] - (u * lr)
            d_a[i] = (di * rho) + ((u * u) * one_minus_rho)
        at += width


def _adam(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    v: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    one_minus_beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
            vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - ((mi * lr_t) / (math.sqrt(vi) + eps))
        at += width


def _adam_amsgrad(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    v: np.ndarray,
    vhat: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    one_minus_beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
            vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
            hi = _maximum(vhat[i], vi)
            m[i] = mi
            v[i] = vi
            vhat[i] = hi
            p[i] = p[i] - ((mi * lr_t) / (math.sqrt(hi) + eps))
        at += width


def _adamax(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    u: np.ndarray,
    beta_1: float,
    one_minus_beta_1: float,
    beta_2: float,
    lr_t: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
            ui = _maximum(u[i] * beta_2, abs(gi))
            m[i] = mi
            u[i] = ui
            p[i] = p[i] - ((mi * lr_t) / (ui + eps))
        at += width


def _nadam(
    p: np.ndarray,
    g: np.ndarray,
    index: np.ndarray,
    width: int,
    m: np.ndarray,
    v: np.ndarray,
    g_div: float,
    beta_1: float,
    one_minus_beta_1: float,
    m_div: float,
    beta_2: float,
    one_minus_beta_2: float,
    v_div: float,
    one_minus_cache_t: float,
    cache_t_1: float,
    lr: float,
    eps: float,
    scale: float,
    clip: float,
) -> None:
    lo = -clip
    at = width - width  # unsigned, as every index below: no negative-index wraparound
    for r in range(index.size):
        base = index[r] * width
        for j in range(width):
            i = base + j
            gi = _grad(g, at + j, scale, lo, clip)
            mi = (m[i] * beta_1) + (gi * one_minus_beta_1)
            vi = (v[i] * beta_2) + ((gi * gi) * one_minus_beta_2)
            m[i] = mi
            v[i] = vi
            m_bar = ((gi / g_div) * one_minus_cache_t) + ((mi / m_div) * cache_t_1)
            p[i] = p[i] - ((m_bar * lr) / (math.sqrt(vi / v_div) + eps))
        at += width


#: Independent partial sums of :func:`_sum_squares`. The inner loop over them is elementwise,
#: so LLVM vectorises it without reassociating anything (64 is the smallest width its cost
#: model vectorises here; numba leaves the SLP vectoriser off). The result does not depend on
#: the machine's vector width.
_SUM_LANES = 64


def _sum_squares(
    g: np.ndarray,
) -> float:
    """``sum(g*g)`` in float64: lane ``j`` sums elements ``j, j+64, ...`` in order, the lanes
    are combined pairwise, then the tail is added in order."""
    n = g.size
    body = n - n % _SUM_LANES
    acc = np.zeros(_SUM_LANES, np.float64)
    for i in range(0, body, _SUM_LANES):
        for j in range(_SUM_LANES):
            x = np.float64(g[i + j])
            acc[j] += x * x
    width = _SUM_LANES
    while width > 1:
        width //= 2
        for j in range(width):
            acc[j] += acc[j + width]
    total = acc[0]
    for i in range(body, n):
        x = np.float64(g[i])
        total += x * x
    return total


def _sum_squares_rows(
    index: np.ndarray,
    g: np.ndarray,
    width: int,
    size: int,
) -> float:
    """:func:`_sum_squares` of the dense tensor of ``size`` elements that sorted unique rows
    ``index`` of ``width`` elements, holding ``g``, stand for (zeros elsewhere): element ``k``
    of the flat tensor adds to lane ``k % 64`` in order (the zeros in between add nothing to a
    sum that is >= 0), the lanes combine pairwise, then the elements past the last full lane
    row are added in order. The same bits as the dense kernel and
    :func:`paramserver.sparse.sum_squares`, in one pass over the rows only."""
    body = size - size % _SUM_LANES
    acc = np.zeros(_SUM_LANES, np.float64)
    tail_from = index.size  # the first row reaching past ``body`` (rows are sorted)
    for r in range(index.size):
        base = index[r] * width
        at = r * width
        if base + width > body:
            tail_from = r
            for j in range(min(width, max(body - base, 0))):
                x = np.float64(g[at + j])
                acc[(base + j) % _SUM_LANES] += x * x
            break
        for j in range(width):
            x = np.float64(g[at + j])
            acc[(base + j) % _SUM_LANES] += x * x
    lanes = _SUM_LANES
    while lanes > 1:
        lanes //= 2
        for j in range(lanes):
            acc[j] += acc[j + lanes]
    total = acc[0]
    for r in range(tail_from, index.size):
        base = index[r] * width
        at = r * width
        for j in range(max(body - base, 0), width):
            x = np.float64(g[at + j])
            total += x * x
    return total


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelSpec:
    """One fused loop: its Python source, how many slots and float coefficients it takes."""

    py_func: Callable[..., None]
    n_slots: int
    n_coeffs: int


_KERNELS: dict[str, _KernelSpec] = {
    "sgd": _KernelSpec(_sgd, 1, 2),
    "sgd_nesterov": _KernelSpec(_sgd_nesterov, 1, 2),
    "rmsprop": _KernelSpec(_rmsprop, 1, 4),
    "adagrad": _KernelSpec(_adagrad, 1, 2),
    "adadelta": _KernelSpec(_adadelta, 2, 4),
    "adam": _KernelSpec(_adam, 2, 6),
    "adam_amsgrad": _KernelSpec(_adam_amsgrad, 3, 6),
    "adamax": _KernelSpec(_adamax, 2, 5),
    "nadam": _KernelSpec(_nadam, 2, 11),
}


def _kernel_for(rule: UpdateRule, coeffs: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
    """The fused kernel for ``rule`` and the float coefficients it takes (flags removed)."""
    name = rule.name
    if RULES.get(name) is not rule:  # a rule of someone else's, with the same name
        return None
    if name == "SGD":
        return ("sgd_nesterov" if coeffs[2] else "sgd"), coeffs[:2]
    if name == "Adam":
        return ("adam_amsgrad" if coeffs[6] else "adam"), coeffs[:6]
    key = name.lower()
    return (key, coeffs) if key in _KERNELS else None


def _exact_scalars(
    floats: tuple[Any, ...], grad_scale: Any, grad_clip: Any, ty: Any
) -> tuple[Any, ...] | None:
    """The kernel's scalar arguments in the array dtype ``ty``, or None if numpy would not
    compute with them in that dtype (a numpy scalar of another dtype: numpy would promote).

    Python numbers are weakly typed (NEP 50): numpy converts them to the array dtype first,
    and so does this. No scale is ``1`` and no clip is ``inf``, both exact no-ops.
    """
    one, inf = _NEUTRAL[ty]
    scalars = (
        *floats,
        one if grad_scale is None else grad_scale,
        inf if grad_clip is None else grad_clip,
    )
    if all(type(c) is ty for c in scalars):
        return scalars
    if any(isinstance(c, (np.generic, bool)) or not isinstance(c, (int, float)) for c in scalars):
        return None
    return tuple(ty(c) for c in scalars)


_NEUTRAL = {d.type: (d.type(1), d.type(np.inf)) for d in SUPPORTED_DTYPES}


#: The row index of a dense step: one row, the whole parameter (``width = p.size``).
_WHOLE = np.zeros(1, np.uint64)
_WHOLE.flags.writeable = False

#: Row indices as the kernels take them: unsigned (checked >= 0 before), so that numba does
#: not test each index for a negative one, which would keep LLVM from vectorising the loop.
_INDEX = nbt.Array(nbt.uint64, 1, "C", readonly=True)
_SIGNED_INDEX = nbt.Array(nbt.int64, 1, "C", readonly=True)


def _signature(spec: _KernelSpec, dtype: np.dtype) -> Any:
    scalar = numba.from_dtype(dtype)
    rw = nbt.Array(scalar, 1, "C")
    ro = nbt.Array(scalar, 1, "C", readonly=True)
    args = (rw, ro, _INDEX, nbt.uintp) + (rw,) * spec.n_slots + (scalar,) * (spec.n_coeffs + 2)
    return nbt.void(*args)


# --- the disk cache -----------------------------------------------------------------------
#
# numba keeps each kernel in an index, ``numba_kernels._adam-207.py311.nbi`` (one entry per
# signature and CPU, and the stamp of this source file), and data files ``....1.nbc`` named by
# the index. It uses a directory only if it can write there, even just to load from it.

#: Where a container image keeps the kernels it compiled when it was built (:func:`build_cache`):
#: numba's in-tree cache directory, beside this module (read-only at run time).
SHIPPED_CACHE = Path(os.path.abspath(__file__)).with_name("__pycache__")

_MODULE_STEM = Path(__file__).stem  # numba names cache files after the source file
_PRIVATE_PARENTS = ("/dev/shm",)  # tried after the temporary directory (tempfile)

_cache_prepared = False
_cache_lock = threading.Lock()
#: numba's settings (``NUMBA_CACHE_DIR`` is ``CACHE_DIR``), set from the environment when numba
#: is imported: attributes that type checkers do not see.
_numba_config: Any = numba.config


def cache_subdirectory(root: str | os.PathLike[str]) -> Path:
    """Where numba keeps this module's kernels when ``NUMBA_CACHE_DIR`` is ``root``: the
    source directory's name and the SHA-1 of its path, as numba's ``UserProvidedCacheLocator``
    computes it (``get_suitable_cache_subpath``)."""
    source_dir = os.path.dirname(os.path.abspath(_sgd.__code__.co_filename))
    digest = hashlib.sha1(source_dir.encode(), usedforsecurity=False).hexdigest()
    return Path(root) / f"{os.path.basename(source_dir)}_{digest}"


def _writable(directory: Path) -> bool:
    """Whether ``directory`` exists (made if need be) and takes a new file, numba's own test."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


def _private_directory() -> Path | None:
    """A new directory of this process's own (mode 0700, so no one else can plant code in it)
    under the temporary directory or ``/dev/shm``, removed at exit; None if neither takes one."""
    parents: list[str] = []
    try:
        parents.append(tempfile.gettempdir())  # $TMPDIR, /tmp, /var/tmp, ... the first writable
    except FileNotFoundError:  # none of them is writable
        pass
    parents += [p for p in _PRIVATE_PARENTS if p not in parents]
    for parent in parents:
        try:
            private = Path(tempfile.mkdtemp(prefix="paramserver-numba-", dir=parent))
        except OSError:
            continue
        atexit.register(shutil.rmtree, private, ignore_errors=True)  # no one else can use it
        return private
    return None


def _copy_shipped(target: Path) -> int:
    """Copy the shipped kernels that ``target`` lacks into it; returns how many functions (each
    an index and a data file per dtype and CPU).

    A kernel whose index ``target`` already holds is left alone: it may hold more than the
    shipped one (this machine's CPU). Data files are copied before the index that names them,
    each through a temporary file and a rename, so a reader never sees a torn file.
    """
    if not SHIPPED_CACHE.is_dir() or SHIPPED_CACHE.resolve() == target.resolve():
        return 0
    copied = 0
    for index in sorted(SHIPPED_CACHE.glob(f"{glob.escape(_MODULE_STEM)}.*.nbi")):
        if (target / index.name).exists():
            continue
        stem = index.name[: -len(".nbi")]
        for source in [*sorted(SHIPPED_CACHE.glob(f"{glob.escape(stem)}.*.nbc")), index]:
            partial = target / f".{source.name}.{os.getpid()}.tmp"
            shutil.copyfile(source, partial)
            os.replace(partial, target / source.name)
        copied += 1
    return copied


def prepare_cache() -> Path | None:
    """Give numba a writable cache directory that holds the shipped kernels, once per process;
    returns the directory of this module's kernels (None: numba chooses, or compiles in memory).

    Only when ``NUMBA_CACHE_DIR`` is set (as in the image): if it is writable, the kernels the
    image shipped (:data:`SHIPPED_CACHE`) are copied there; if not (a read-only root file
    system without a scratch mount), numba is pointed at a private directory under the
    temporary directory or ``/dev/shm`` instead, and they are copied there. Without
    ``NUMBA_CACHE_DIR`` numba keeps its own order (the package's ``__pycache__``, then
    ``~/.cache/numba``). A copy that fails (a full disk) only costs compiling what is missing.
    """
    global _cache_prepared
    with _cache_lock:
        if _cache_prepared:
            return _cache_directory()
        _cache_prepared = True
        configured = _numba_config.CACHE_DIR
        if not configured:
            return None
        target = cache_subdirectory(configured)
        if not _writable(target):
            private = _private_directory()
            if private is None:
                logger.warning(
                    "NUMBA_CACHE_DIR %s is not writable, nor is any temporary directory: the "
                    "kernels are compiled in memory at every start",
                    configured,
                )
                return None
            logger.warning(
                "NUMBA_CACHE_DIR %s is not writable; caching the kernels in %s instead (mount "
                "a writable directory there, e.g. an emptyDir or --tmpfs, to silence this)",
                configured,
                private,
            )
            _numba_config.CACHE_DIR = str(private)
            target = cache_subdirectory(private)
            target.mkdir(exist_ok=True)
        try:
            copied = _copy_shipped(target)
        except OSError as exc:
            logger.warning("could not copy the shipped kernels into %s: %s", target, exc)
        else:
            if copied:
                logger.info(
                    "copied the shipped kernels of %d function(s) from %s to %s",
                    copied,
                    SHIPPED_CACHE,
                    target,
                )
        return target


def _cache_directory() -> Path | None:
    configured = _numba_config.CACHE_DIR
    return cache_subdirectory(configured) if configured else None


_cache_available = True


def _compile(py_func: Callable[..., Any], signature: Any) -> Any:
    """An eagerly compiled (or loaded from the disk cache) dispatcher of ``py_func`` for
    exactly ``signature``.

    With an explicit signature the dispatcher never compiles again: a call whose types do not
    fit raises ``TypeError`` instead of compiling a new specialisation at request time.
    """
    global _cache_available
    prepare_cache()
    options = dict(JIT_OPTIONS, cache=_cache_available)
    try:
        return numba.njit(signature, **options)(py_func)
    except RuntimeError as exc:
        if not options["cache"] or "cannot cache function" not in str(exc):
            raise
        _cache_available = False
        logger.warning(
            "numba has no writable cache directory (%s); compiling in memory. Set "
            "NUMBA_CACHE_DIR to a writable directory to reuse compiled kernels.",
            exc,
        )
        return numba.njit(signature, **dict(options, cache=False))(py_func)


@dataclass(frozen=True)
class WarmUp:
    """What :meth:`NumbaBackend.warm_up` did: kernels loaded from the disk cache or compiled
    (for ``cpu``, and cached in ``cache_dir`` when it is not None), and how long it took."""

    loaded: int
    compiled: int
    seconds: float
    cache_dir: Path | None
    cpu: str

    def __str__(self) -> str:
        where = "numba's default cache" if self.cache_dir is None else str(self.cache_dir)
        if not _cache_available:
            where = "memory (no writable cache directory)"
        return (
            f"{self.loaded + self.compiled} kernels in {self.seconds:.2f} s: {self.loaded} "
            f"loaded from the cache, {self.compiled} compiled for CPU {self.cpu} (in {where})"
        )


def _loaded_from_cache(dispatcher: Any) -> bool:
    stats = getattr(dispatcher, "stats", None)
    return stats is not None and sum(stats.cache_hits.values()) > 0


def _cpu_name() -> str:
    """The CPU the kernels are compiled for: ``NUMBA_CPU_NAME``, else this machine's."""
    configured: str | None = _numba_config.CPU_NAME
    if configured:
        return configured
    from llvmlite import binding

    return str(binding.get_host_cpu_name())


def build_cache() -> WarmUp:
    """Compile every kernel into numba's disk cache and check that it holds them: what a
    container image runs when it is built, with ``NUMBA_CACHE_DIR`` unset, so that they land
    in :data:`SHIPPED_CACHE` (``docker build``: see the Dockerfile)."""
    summary = NumbaBackend().warm_up()
    if not _cache_available:
        raise RuntimeError("numba found no writable cache directory: nothing was cached")
    where = _cache_directory() or SHIPPED_CACHE
    cached = sorted(where.glob(f"{glob.escape(_MODULE_STEM)}.*.nbi"))
    if len(cached) < len(_KERNELS) + 2:
        raise RuntimeError(f"only {len(cached)} kernel indexes in {where}")
    print(f"numba kernels cached in {where}: {summary}")
    return summary


# --- the backend --------------------------------------------------------------------------


class NumbaBackend:
    """Fused single-pass numba kernels, bit-identical to the numpy backend.

    One thread per call, the GIL released while a kernel runs. Arrays the kernels were not
    compiled for (float16, not 1-D and contiguous, mixed dtypes, read-only parameters) and
    numpy coefficients of another dtype go to ``fallback``. Kernels are compiled per dtype on
    first use; call :meth:`warm_up` at start-up to take that cost before the first request.
    """

    name = "numba"

    def __init__(self, *, fallback: KernelBackend | None = None) -> None:
        self.fallback: KernelBackend = fallback if fallback is not None else NumpyBackend()
        self._compiled: dict[tuple[str, np.dtype], Any] = {}
        self._lock = threading.Lock()

    def supports(self, rule: str, dtype: np.dtype) -> bool:
        return rule in RULES and np.dtype(dtype) in SUPPORTED_DTYPES

    def warm_up(self) -> WarmUp:
        """Compile (or load from the disk cache) every kernel for float32 and float64."""
        started = time.perf_counter()
        kernels = []
        for dtype in SUPPORTED_DTYPES:
            kernels.append(self._sum_squares_kernel(dtype))
            kernels.append(self._sum_squares_rows_kernel(dtype))
            kernels.extend(self._kernel(key, dtype) for key in _KERNELS)
        loaded = sum(1 for k in kernels if _loaded_from_cache(k))
        return WarmUp(
            loaded=loaded,
            compiled=len(kernels) - loaded,
            seconds=time.perf_counter() - started,
            cache_dir=_cache_directory() if _cache_available else None,
            cpu=_cpu_name(),
        )

    @property
    def loaded(self) -> bool:
        """Whether every kernel :meth:`warm_up` loads is loaded (no step will compile one)."""
        return len(self._compiled) >= len(SUPPORTED_DTYPES) * (2 + len(_KERNELS))

    def _kernel(self, key: str, dtype: np.dtype) -> Any:
        kernel = self._compiled.get((key, dtype))
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get((key, dtype))
                if kernel is None:
                    spec = _KERNELS[key]
                    kernel = _compile(spec.py_func, _signature(spec, dtype))
                    self._compiled[(key, dtype)] = kernel
        return kernel

    def _sum_squares_kernel(self, dtype: np.dtype) -> Any:
        kernel = self._compiled.get(("sum_squares", dtype))
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get(("sum_squares", dtype))
                if kernel is None:
                    array = nbt.Array(numba.from_dtype(dtype), 1, "C", readonly=True)
                    kernel = _compile(_sum_squares, nbt.float64(array))
                    self._compiled[("sum_squares", dtype)] = kernel
        return kernel

    def _sum_squares_rows_kernel(self, dtype: np.dtype) -> Any:
        kernel = self._compiled.get(("sum_squares_rows", dtype))
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get(("sum_squares_rows", dtype))
                if kernel is None:
                    array = nbt.Array(numba.from_dtype(dtype), 1, "C", readonly=True)
                    signature = nbt.float64(_SIGNED_INDEX, array, nbt.intp, nbt.intp)
                    kernel = _compile(_sum_squares_rows, signature)
                    self._compiled[("sum_squares_rows", dtype)] = kernel
        return kernel

    def kernel(self, rule: UpdateRule, dtype: np.dtype) -> UpdateKernel:
        """The fused kernel of ``rule`` for ``dtype``, or the fallback's kernel (float16, a rule
        that is not one of :data:`~paramserver.server.optim.rules.RULES`)."""
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES or RULES.get(rule.name) is not rule:
            return self.fallback.kernel(rule, dtype)
        return functools.partial(self._fused, rule)

    def rows_kernel(self, rule: UpdateRule, dtype: np.dtype) -> RowsKernel:
        """The fused kernel of ``rule`` over rows of a parameter of ``dtype``, in place, or
        the fallback's (gathers and scatters) where :meth:`kernel` would fall back."""
        dtype = np.dtype(dtype)
        if dtype not in SUPPORTED_DTYPES or RULES.get(rule.name) is not rule:
            return self.fallback.rows_kernel(rule, dtype)
        return functools.partial(self._fused_rows, rule)

    def sparse_sum_squares(
        self, index: np.ndarray, rows: np.ndarray, shape: tuple[int, ...]
    ) -> float:
        """:func:`_sum_squares_rows`: the dense equivalent's sum of squares over the rows
        only, bit for bit :func:`paramserver.sparse.sum_squares` (the fallback's)."""
        width = math.prod(shape[1:])
        if rows.size != index.size * width:
            raise ValueError(f"{rows.size} row elements for {index.size} rows of {width}")
        if (
            rows.dtype in SUPPORTED_DTYPES
            and _fits_index(index)
            and rows.flags.c_contiguous
            and rows.flags.aligned
        ):
            kernel = self._sum_squares_rows_kernel(rows.dtype)
            return float(kernel(index, rows.reshape(-1), width, math.prod(shape)))
        return self.fallback.sparse_sum_squares(index, rows, shape)

    def update_rows(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        rows: np.ndarray,
        index: np.ndarray,
        width: int,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """A lazy step of rows ``index`` (sorted, unique) of ``width`` elements of any arrays:
        fused in place where :meth:`update` would be, else the fallback."""
        if _fits(rule, p, rows, slots, rows=True):
            self._fused_rows(rule, p, rows, index, width, slots, coeffs, grad_scale, grad_clip)
        else:
            self.fallback.update_rows(
                rule, p, rows, index, width, slots, coeffs, grad_scale, grad_clip
            )

    def sum_squares(self, g: np.ndarray) -> float:
        """``sum(g*g)`` in float64 in one pass (64 ordered partial sums, see
        :func:`_sum_squares`): not the numpy backend's summation order, so the two may differ
        in the last bits. Arrays it was not compiled for go to the fallback."""
        if g.dtype in SUPPORTED_DTYPES and g.ndim == 1 and g.flags.c_contiguous:
            return float(self._sum_squares_kernel(g.dtype)(g))
        return self.fallback.sum_squares(g)

    def update(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        g: np.ndarray,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """One step over any arrays: fused when they are what the kernels were compiled for
        (1-D, C-contiguous, all of ``p``'s dtype, ``p`` and the slots writable), else the
        fallback. An optimizer calls :meth:`kernel` once instead, for arrays it owns."""
        if _fits(rule, p, g, slots, rows=False):
            self._fused(rule, p, g, slots, coeffs, grad_scale, grad_clip)
        else:
            self.fallback.update(rule, p, g, slots, coeffs, grad_scale, grad_clip)

    def _fused(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        g: np.ndarray,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """The fused kernel over arrays it was compiled for. Coefficients that numpy would not
        compute with in the array dtype (a numpy scalar of another dtype) go to the fallback,
        which then computes exactly as numpy does."""
        chosen = _chosen(rule, coeffs, grad_scale, grad_clip, p.dtype.type)
        if chosen is None:
            self.fallback.update(rule, p, g, slots, coeffs, grad_scale, grad_clip)
            return
        key, scalars = chosen
        self._kernel(key, p.dtype)(p, g, _WHOLE, p.size, *slots, *scalars)

    def _fused_rows(
        self,
        rule: UpdateRule,
        p: np.ndarray,
        rows: np.ndarray,
        index: np.ndarray,
        width: int,
        slots: tuple[np.ndarray, ...],
        coeffs: tuple[Any, ...],
        grad_scale: Any,
        grad_clip: Any,
    ) -> None:
        """The fused kernel over rows ``index`` of ``p`` and the slots, in place: the same
        loop as a dense step, one row at a time (no gather, no scatter). ``rows`` holds
        ``len(index) * width`` elements; ``index`` is sorted, unique and in range (checked by
        whoever prepared the gradient; checked again here, before a kernel that does not
        check bounds touches memory)."""
        if rows.size != index.size * width or (width and p.size % width):
            raise ValueError(f"{rows.size} row elements for {index.size} rows of {width}")
        if not width or not index.size:
            return  # no element to step
        if int(index.min()) < 0 or int(index.max()) >= p.size // width:
            raise ValueError(f"a row index is outside [0, {p.size // width})")
        chosen = _chosen(rule, coeffs, grad_scale, grad_clip, p.dtype.type)
        if chosen is None or not _fits_index(index):
            self.fallback.update_rows(
                rule, p, rows, index, width, slots, coeffs, grad_scale, grad_clip
            )
            return
        key, scalars = chosen
        self._kernel(key, p.dtype)(p, rows, index.view(np.uint64), width, *slots, *scalars)


def _fits(
    rule: UpdateRule, p: np.ndarray, g: np.ndarray, slots: tuple[np.ndarray, ...], *, rows: bool
) -> bool:
    """Whether the kernels were compiled for these arrays: 1-D, C-contiguous, all of ``p``'s
    dtype, ``p`` and the slots writable and of one size, and ``g`` of that size too (a dense
    step) or aligned row values (``rows``: the row kernel's arrays must all be aligned)."""
    dtype = p.dtype
    return (
        dtype in SUPPORTED_DTYPES
        and RULES.get(rule.name) is rule
        and all(
            a.ndim == 1
            and a.dtype == dtype
            and a.flags.c_contiguous
            and (a.flags.aligned or not rows)
            for a in (p, g, *slots)
        )
        and all(a.size == p.size and a.flags.writeable for a in (p, *slots))
        and (rows or g.size == p.size)
    )


def _chosen(
    rule: UpdateRule, coeffs: tuple[Any, ...], grad_scale: Any, grad_clip: Any, ty: Any
) -> tuple[str, tuple[Any, ...]] | None:
    """The fused kernel for ``rule`` and its scalar arguments in the array dtype ``ty``, or
    None: a rule without one, or coefficients that numpy would not compute with in ``ty``
    (a numpy scalar of another dtype), which the fallback then computes exactly as numpy."""
    chosen = _kernel_for(rule, coeffs)
    if chosen is None:
        return None
    key, floats = chosen
    scalars = _exact_scalars(floats, grad_scale, grad_clip, ty)
    return None if scalars is None else (key, scalars)


def _fits_index(index: np.ndarray) -> bool:
    """Whether ``index`` is what the kernels take: 1-D, int64, C-contiguous, aligned."""
    return (
        index.ndim == 1
        and index.dtype == np.int64
        and index.flags.c_contiguous
        and index.flags.aligned
    )

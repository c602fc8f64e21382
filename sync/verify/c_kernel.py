"""The CPU checksum kernels in C: what ``sync.verify.batched`` runs on the CPU where a C compiler is.

The same sums as the numba kernels of ``sync.verify.cpu_kernel`` (bit for bit: the tests compare them),
several times faster: 32-bit words mixed four at a time in SIMD multiplies, summed into eight 64-bit
lanes. Side by side here (one core, 176 MB): 20.5 GB/s over 32-bit words against numba's 3.0, 6.8 GB/s
over 16-bit words against 5.4. Position weights come from running sums (per lane: the sum, and the sum
of the sums after each step of eight words), so an element costs additions only. Strided runs (a column
slice of every row) prefetch the rows eight ahead: rows of 512 B read a quarter of their block went
from 1.9-2.3 GB/s to 3.8-4.2, rows of 1408 B from 3.4-3.5 to 5.5-6.2 (one core, separate runs).

Compiled with the host's C compiler (``$CC`` or ``cc``, ``-O3 -march=native``) at first use, once per
machine and CPU (``sync.native``; a fraction of a second); where it cannot be built, or with
``RLSYNC_NATIVE_SUMS=0``, the numba kernels run instead.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from sync.native import build_directory, build_once
from sync.verify.checksums import MIX_K1, MIX_K2

__all__ = ["library", "tile_sums"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint64_t u64x2 __attribute__((vector_size(16)));

static const uint32_t K1 = %(k1)du, K2 = %(k2)du;

/* h(x) = x * K1 + x * x * K2 mod 2**32, as x * (K1 + x * K2) */
static inline uint32_t mix(uint32_t x) { return x * (K1 + x * K2); }
static inline u32x4 mix4(u32x4 x) {
  const u32x4 k1 = {K1, K1, K1, K1}, k2 = {K2, K2, K2, K2};
  return x * (k1 + x * k2);
}
/* a vector's words 0, 1 (low) or 2, 3 (high), zero-extended to 64 bits */
static inline u64x2 low_words(u32x4 h) { return (u64x2)__builtin_shufflevector(h, (u32x4){0, 0, 0, 0}, 0, 4, 1, 5); }
static inline u64x2 high_words(u32x4 h) { return (u64x2)__builtin_shufflevector(h, (u32x4){0, 0, 0, 0}, 2, 6, 3, 7); }

/* the cache lines of n bytes at p, fetched ahead of their reading (rows of a strided run) */
enum { AHEAD = 8 };
static inline void prefetch_row(const unsigned char* p, int64_t n) {
  for (int64_t k = 0; k < n; k += 64) __builtin_prefetch(p + k, 0, 0);
}

/* sums_W(p, n, s0, s1): over the n words of W bytes at p (any alignment), s0 = sum of h(word k),
   s1 = sum of k * h(word k), modulo 2**64. Eight words a step: lane j holds words 8b + j. */
#define DEFINE_SUMS(W, T)                                                                                  \
  static inline u32x4 load4_##W(const unsigned char* p) {                                                  \
    T w[4];                                                                                                \
    memcpy(w, p, sizeof w);                                                                                \
    return (u32x4){w[0], w[1], w[2], w[3]};                                                                \
  }                                                                                                        \
  static void sums_##W(const unsigned char* p, int64_t n, uint64_t* s0, uint64_t* s1) {                    \
    u64x2 a0 = {0, 0}, a1 = {0, 0}, a2 = {0, 0}, a3 = {0, 0}; /* per lane: the sum of h */                \
    u64x2 b0 = {0, 0}, b1 = {0, 0}, b2 = {0, 0}, b3 = {0, 0}; /* per lane: the sum of those sums */       \
    const int64_t steps = n / 8;                                                                           \
    for (int64_t b = 0; b < steps; ++b) {                                                                  \
      const u32x4 h0 = mix4(load4_##W(p + 8 * b * W)), h1 = mix4(load4_##W(p + (8 * b + 4) * W));          \
      a0 += low_words(h0); a1 += high_words(h0); a2 += low_words(h1); a3 += high_words(h1);                \
      b0 += a0; b1 += a1; b2 += a2; b3 += a3;                                                              \
    }                                                                                                      \
    const uint64_t lane[8] = {a0[0], a0[1], a1[0], a1[1], a2[0], a2[1], a3[0], a3[1]};                     \
    const uint64_t running[8] = {b0[0], b0[1], b1[0], b1[1], b2[0], b2[1], b3[0], b3[1]};                  \
    uint64_t t0 = 0, t1 = 0;                                                                               \
    for (int j = 0; j < 8; ++j) { /* sum over steps of b * h = steps * lane - running */                  \
      t0 += lane[j];                                                                                       \
      t1 += 8 * ((uint64_t)steps * lane[j] - running[j]) + (uint64_t)j * lane[j];                          \
    }                                                                                                      \
    for (int64_t k = steps * 8; k < n; ++k) {                                                              \
      T w;                                                                                                 \
      memcpy(&w, p + k * W, W);                                                                            \
      const uint64_t h = mix(w);                                                                           \
      t0 += h;                                                                                             \
      t1 += h * (uint64_t)k;                                                                               \
    }                                                                                                      \
    *s0 = t0;                                                                                              \
    *s1 = t1;                                                                                              \
  }                                                                                                        \
  /* table [tiles, 2]: (first word from base, words); out [tiles, 2]: (S0, S1 from the tile's start) */   \
  void rlsync_sums_flat_##W(const unsigned char* base, const int64_t* table, int64_t tiles, int64_t* out) { \
    for (int64_t t = 0; t < tiles; ++t) {                                                                  \
      uint64_t s0, s1;                                                                                     \
      sums_##W(base + table[2 * t] * W, table[2 * t + 1], &s0, &s1);                                       \
      out[2 * t] = (int64_t)s0;                                                                            \
      out[2 * t + 1] = (int64_t)s1;                                                                        \
    }                                                                                                      \
  }                                                                                                        \
  /* table [tiles, 5]: (first word, rows, row width, source row stride, destination row stride) */         \
  void rlsync_sums_rows_##W(const unsigned char* base, const int64_t* table, int64_t tiles, int64_t* out) { \
    for (int64_t t = 0; t < tiles; ++t) {                                                                  \
      const int64_t* row = table + 5 * t;                                                                  \
      uint64_t s0 = 0, s1 = 0;                                                                             \
      for (int64_t r = 0; r < row[1]; ++r) {                                                               \
        uint64_t r0, r1;                                                                                   \
        if (r + AHEAD < row[1]) /* rows apart defeat the hardware prefetcher: ask for a later row */       \
          prefetch_row(base + (row[0] + (r + AHEAD) * row[3]) * W, row[2] * W);                            \
        sums_##W(base + (row[0] + r * row[3]) * W, row[2], &r0, &r1);                                      \
        s0 += r0;                                                                                          \
        s1 += r1 + (uint64_t)(r * row[4]) * r0;                                                            \
      }                                                                                                    \
      out[2 * t] = (int64_t)s0;                                                                            \
      out[2 * t + 1] = (int64_t)s1;                                                                        \
    }                                                                                                      \
  }

DEFINE_SUMS(1, uint8_t)
DEFINE_SUMS(2, uint16_t)
DEFINE_SUMS(4, uint32_t)
""" % dict(k1=MIX_K1, k2=MIX_K2)

_CFLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
_PARALLEL_WORDS = 1 << 21  # a launch is split over the cores only above this many words per thread
_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]


class _Library:
    """The compiled kernels, built at most once per machine and loaded at most once per process."""

    def __init__(self) -> None:
        self.functions: dict[tuple[str, int], object] | None = None
        self.error: BaseException | None = None
        self._tried = False
        self._lock = threading.Lock()

    def get(self) -> dict | None:
        """{(kind, word bytes): function}, or None where the kernels cannot be built or are turned off."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._tried = True
                    if os.environ.get("RLSYNC_NATIVE_SUMS", "") != "0":
                        try:
                            self.functions = build_once(_directory(), _compile, _load)
                        except Exception as e:  # noqa: BLE001 -- any failure leaves the numba kernels, which agree
                            self.error = e
                            warnings.warn(f"rlsync: the C checksum kernels could not be built ({e}); using numba's",
                                          RuntimeWarning, stacklevel=2)
        return self.functions


library = _Library()


def tile_sums(kind: str, base: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``rlsync_sums_<kind>_<word>`` over ``table`` (``base``: the words' array, its itemsize the word's),
    split over this process's share of the cores (``torch.get_num_threads()``) where the launch is
    large enough for each to help."""
    function = library.get()[(kind, base.itemsize)]
    address = base.ctypes.data
    tiles = table.shape[0]
    words = int(table[:, 1].sum() if kind == "flat" else (table[:, 1] * table[:, 2]).sum())
    # torch's thread count is the process's share of the cores (launchers of many ranks per machine set 1)
    threads = min(torch.get_num_threads(), len(os.sched_getaffinity(0)), tiles, max(words // _PARALLEL_WORDS, 1))
    if threads <= 1:
        function(address, table.ctypes.data, tiles, out.ctypes.data)
        return
    # contiguous slices of tiles; ctypes lets go of the GIL for each call
    bounds = np.linspace(0, tiles, threads + 1).astype(np.int64)
    workers = [threading.Thread(target=function, args=(address, table[a:].ctypes.data, int(b - a), out[a:].ctypes.data))
               for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()) if b > a]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _directory() -> Path:
    """Named for the source, flags, compiler and CPU: ``-march=native`` code runs only where it was built."""
    return build_directory("rlsync_sums", _SOURCE, *_CFLAGS, _compiler(), platform.machine(), _cpu())


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _cpu() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _compile(directory: Path) -> tuple[str, dict]:
    compiler = shutil.which(_compiler())
    if compiler is None:
        raise RuntimeError(f"no C compiler ({_compiler()}) on PATH")
    source, library_path = directory / "sums.c", directory / f"sums.{os.getpid()}.so"
    source.write_text(_SOURCE)
    done = subprocess.run([compiler, *_CFLAGS, "-o", str(library_path), str(source)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
    return str(library_path), _load(str(library_path))


def _load(path: str) -> dict:
    lib = ctypes.CDLL(path)
    functions = {}
    for kind in ("flat", "rows"):
        for word in (1, 2, 4):
            f = getattr(lib, f"rlsync_sums_{kind}_{word}")
            f.argtypes, f.restype = _ARGS, None
            functions[(kind, word)] = f
    return functions

"""Whether the endpoints' tensors are still where the copy programs were bound.

Copy programs hold raw addresses, so every sync first checks that each endpoint tensor is still the
object it was and still has its address. A tensor moves under the same Python object when its
``.data`` is replaced or its storage is resized to nothing and back (what offloading does), and an
endpoint may put a new tensor under an old name. Reading each ``data_ptr`` from Python costs ~0.1 us a
tensor: 4-13 ms for the ~80,000 tensors of the DeepSeek-V3-like colocated case on an H200's host, as
long as its copies. :class:`Addresses` does both in one C++ pass instead: the dicts' values against
the objects taken, then the addresses from references to those tensors (a few ns a tensor).

The C++ part is compiled with torch's extension builder on first use, on a background thread
(tens of seconds, once per machine, into ``$RLSYNC_CACHE_DIR`` or ``~/.cache/rlsync``); every later
process imports that build directly at its first check. Until it is there, or where it cannot be
built (no compiler or ninja, or ``RLSYNC_NATIVE_CHECK=0``), the check reads every address from
Python. It starts by itself on CUDA machines, where the check weighs; ``RLSYNC_NATIVE_CHECK=1``
starts it elsewhere too.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from itertools import chain
from pathlib import Path

import torch

from sync.native import build_directory, build_once, load_ready

__all__ = ["Addresses", "native_check"]

# checks many tensors' addresses in one C++ loop: private, but what torch's CUDA graph trees use to
# check their static inputs; CPU builds lack it (then a Python pass does the same)
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)

_SOURCE = r"""
#include <torch/extension.h>
#include <cstdint>
#include <vector>

// An address as data_ptr() gives it (0 for an empty tensor), read from the storage without
// data_ptr()'s checks that the data is allocated.
static std::intptr_t address_of(const at::Tensor& t) {
  const auto* impl = t.unsafeGetTensorImpl();
  if (impl->numel() == 0) return 0;
  return reinterpret_cast<std::intptr_t>(impl->storage().data()) +
         static_cast<std::intptr_t>(impl->storage_offset() * impl->itemsize());
}

struct Addresses {
  std::vector<pybind11::object> objects;  // the tensors' Python objects, in the dicts' order
  std::vector<at::Tensor> tensors;  // the same TensorImpls: .data = ... shows here
  std::vector<std::intptr_t> addresses;  // where they were bound
  Addresses(const pybind11::list& given, std::vector<std::intptr_t> at) : addresses(std::move(at)) {
    TORCH_CHECK(given.size() == addresses.size(), "one address per tensor");
    for (const auto& t : given) {
      objects.push_back(pybind11::reinterpret_borrow<pybind11::object>(t));
      tensors.push_back(t.cast<at::Tensor>());
    }
  }
  // The first position whose tensor in ``dicts`` (their values, in order) is another object than
  // the one taken, or is no longer where it was; -1 if none.
  std::int64_t first_moved(const pybind11::list& dicts) const {
    std::size_t i = 0;
    auto same = [&](PyObject* value) { return i < objects.size() && value == objects[i].ptr(); };
    for (const auto& d : dicts) {
      if (PyDict_CheckExact(d.ptr())) {  // its values without a Python call each
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
          if (!same(value)) return static_cast<std::int64_t>(i);
          ++i;
        }
      } else {
        for (const auto& value : d.attr("values")()) {
          if (!same(value.ptr())) return static_cast<std::int64_t>(i);
          ++i;
        }
      }
    }
    if (i != objects.size()) return static_cast<std::int64_t>(i);
    pybind11::gil_scoped_release unlocked;
    for (std::size_t j = 0; j < tensors.size(); ++j)
      if (address_of(tensors[j]) != addresses[j]) return static_cast<std::int64_t>(j);
    return -1;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Addresses>(m, "Addresses")
      .def(pybind11::init<const pybind11::list&, std::vector<std::intptr_t>>())
      .def("first_moved", &Addresses::first_moved);
}
"""


class _Native:
    """The compiled module: built at most once per machine, loaded at most once per process.

    Torch's extension builder, even for a build it has cached, imports its own machinery, hashes the
    sources and runs ninja: seconds of a busy interpreter in each process that loads the module that
    way, competing with the syncs it is meant to speed up (CUDA IPC workers spawned per rank ran at a
    seventh of their speed meanwhile). So a build goes into a directory of its own, named for all
    that makes it (source, flags, torch, Python), and is marked ready once it imports; any later
    process on the machine imports that library directly, in milliseconds, at its first check. Only a
    process that finds no ready build starts one; one builds at a time, and the others wait for it (on
    their background threads) and import what it built."""

    def __init__(self) -> None:
        self.module = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def get(self):
        """The module if it is loaded or built and ready to import; else starts building it (where
        enabled) and returns None."""
        if self.module is None and self._thread is None and _enabled():
            with self._lock:
                if self.module is None and self._thread is None:
                    directory = _build_directory()
                    self.module = _import_ready(directory)
                    if self.module is None:
                        self._thread = threading.Thread(target=self._build, args=(directory,),
                                                        name="rlsync-native-check", daemon=True)
                        self._thread.start()
        return self.module

    def wait(self, timeout_s: float | None = None):
        """Build (if not started) and wait for it; the module, or None where it could not be built."""
        self.get()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.module

    def _build(self, directory: Path) -> None:
        try:
            # one builder a machine: the others wait for it and import its build
            self.module = build_once(directory, _compile, _import)
        except Exception as e:  # noqa: BLE001 -- any failure leaves the Python check, which is correct
            self.error = e
            warnings.warn(f"rlsync: the C++ address check could not be built ({e}); checking from Python",
                          RuntimeWarning, stacklevel=1)


_CFLAGS = ("-O2",)


def _compile(directory: Path):
    """Build the module in ``directory`` (holding its builder's lock): the library's path and the module."""
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    if not is_ninja_available():
        raise RuntimeError("ninja is not installed")
    work = directory / "build"
    shutil.rmtree(work, ignore_errors=True)  # what a builder that died left, torch's lock file with it
    work.mkdir()
    module = load_inline(directory.name, cpp_sources=[_SOURCE], extra_cflags=list(_CFLAGS),
                         build_directory=str(work), verbose=False)
    return module.__file__, module


def _build_directory() -> Path:
    """Where this source, built with these flags for this torch and Python, lives: another torch or
    Python gets a build of its own instead of a library compiled against another ABI. The directory's
    name is also the module's, which its init symbol carries."""
    return build_directory("rlsync_addresses", _SOURCE, *_CFLAGS, torch.__version__, str(torch.version.cuda),
                           sys.version, platform.machine())


def _import(path: str):
    """The module built at ``path``, imported directly (no builder, no ninja)."""
    name = Path(path).parent.parent.name  # <directory>/build/<name>.so
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_ready(directory: Path):
    return load_ready(directory, _import)


def _enabled() -> bool:
    flag = os.environ.get("RLSYNC_NATIVE_CHECK", "")
    if flag in ("0", "1"):
        return flag == "1"
    return torch.cuda.is_available()


native_check = _Native()


class Addresses:
    """Where ``tensors`` (the values of the endpoints' dicts, in order) are now, with their ``data_ptr``s
    already read (``addresses``), to check later. ``native``: check in C++ once it is built (False:
    always from Python)."""

    def __init__(self, tensors: list[torch.Tensor], addresses: list[int], native: bool = True) -> None:
        self.tensors, self.addresses, self.native = tensors, addresses, native
        self._native = None
        self._indices: list[int] | None = None

    def moved(self, dicts: list[dict]) -> bool:
        """Whether the values of ``dicts`` (the endpoints' dicts now) are other tensors than those taken,
        or any of them has a new address."""
        native = self._native or (self._take_native() if self.native else None)
        if native is not None:  # one C++ pass: the same objects, each where it was
            return native.first_moved(list(dicts)) >= 0
        tensors = list(chain.from_iterable(d.values() for d in dicts))
        if len(tensors) != len(self.addresses):
            return True
        if _PTRS_EQUAL is not None:  # CUDA builds: torch's C++ loop over the Python list
            self._indices = self._indices or list(range(len(tensors)))
            return not _PTRS_EQUAL(tensors, self.addresses, self._indices)
        return list(map(torch.Tensor.data_ptr, tensors)) != self.addresses

    def _take_native(self):
        """C++ references to the tensors taken, with their addresses when taken, once the module is built."""
        module = native_check.get()
        if module is not None:
            self._native = module.Addresses(self.tensors, self.addresses)
        return self._native

"""Whether the endpoints' tensors are still where the copy programs were bound.

Copy programs hold raw addresses, so every sync first checks that each endpoint tensor is still the
object it was and still has its address. A tensor moves under the same Python object when its
``.data`` is replaced or its storage is resized to nothing and back (what offloading does), and an
endpoint may put a new tensor under an old name. Reading each ``data_ptr`` from Python costs ~0.1 us a
tensor: 7-13 ms for the ~80,000 tensors of the DeepSeek-V3-like colocated case on an H200's host, as
long as its copies. :class:`Addresses` compares object identities in Python (a C-level ``map``) and
reads the addresses in C++, from references taken once (a few ns a tensor, without the GIL).

The C++ part is compiled with torch's extension builder on first use, on a background thread
(tens of seconds, once per machine: torch caches the build). Until it is there, or where it cannot
be built (no compiler or ninja, or ``RLSYNC_NATIVE_CHECK=0``), the check reads every address from
Python. It starts by itself on CUDA machines, where the check weighs; ``RLSYNC_NATIVE_CHECK=1``
starts it elsewhere too.
"""

from __future__ import annotations

import operator
import os
import threading
import warnings

import torch

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
  std::vector<at::Tensor> tensors;  // the same TensorImpls as Python's: .data = ... shows here
  std::vector<std::intptr_t> addresses;  // where they were bound
  Addresses(std::vector<at::Tensor> given, std::vector<std::intptr_t> at)
      : tensors(std::move(given)), addresses(std::move(at)) {
    TORCH_CHECK(tensors.size() == addresses.size(), "one address per tensor");
  }
  std::int64_t first_moved() const {
    for (std::size_t i = 0; i < tensors.size(); ++i)
      if (address_of(tensors[i]) != addresses[i]) return static_cast<std::int64_t>(i);
    return -1;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Addresses>(m, "Addresses")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<std::intptr_t>>())
      .def("first_moved", &Addresses::first_moved, pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""


class _Native:
    """The compiled module: built at most once per process, on a background thread."""

    def __init__(self) -> None:
        self.module = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def get(self):
        """The module if it is built; else starts building it (where enabled) and returns None."""
        if self.module is None and self._thread is None and _enabled():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._build, name="rlsync-native-check", daemon=True)
                    self._thread.start()
        return self.module

    def wait(self, timeout_s: float | None = None):
        """Build (if not started) and wait for it; the module, or None where it could not be built."""
        self.get()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.module

    def _build(self) -> None:
        try:
            from torch.utils.cpp_extension import is_ninja_available, load_inline

            if not is_ninja_available():
                raise RuntimeError("ninja is not installed")
            self.module = load_inline("rlsync_addresses", cpp_sources=[_SOURCE], extra_cflags=["-O2"], verbose=False)
        except Exception as e:  # noqa: BLE001 -- any failure leaves the Python check, which is correct
            self.error = e
            warnings.warn(f"rlsync: the C++ address check could not be built ({e}); checking from Python",
                          RuntimeWarning, stacklevel=1)


def _enabled() -> bool:
    flag = os.environ.get("RLSYNC_NATIVE_CHECK", "")
    if flag in ("0", "1"):
        return flag == "1"
    return torch.cuda.is_available()


native_check = _Native()


class Addresses:
    """Where ``tensors`` are now (with their ``data_ptr``s already read: ``addresses``), to check later.
    ``native``: check in C++ once it is built (False: always from Python)."""

    def __init__(self, tensors: list[torch.Tensor], addresses: list[int], native: bool = True) -> None:
        self.tensors, self.addresses, self.native = tensors, addresses, native
        self._native = None
        self._indices: list[int] | None = None

    def moved(self, tensors: list[torch.Tensor]) -> bool:
        """Whether ``tensors`` (the endpoints' tensors now, in the same order) differ from those taken,
        or any of them has a new address."""
        if len(tensors) != len(self.addresses):
            return True
        native = self._native or (self._take_native() if self.native else None)
        if native is not None:  # the same objects, each where it was
            return not all(map(operator.is_, tensors, self.tensors)) or native.first_moved() >= 0
        if _PTRS_EQUAL is not None:  # CUDA builds: one C++ loop over the Python list
            self._indices = self._indices or list(range(len(tensors)))
            return not _PTRS_EQUAL(tensors, self.addresses, self._indices)
        return list(map(torch.Tensor.data_ptr, tensors)) != self.addresses

    def _take_native(self):
        """C++ references to the tensors taken, with their addresses when taken, once the module is built."""
        module = native_check.get()
        if module is not None:
            self._native = module.Addresses(self.tensors, self.addresses)
        return self._native

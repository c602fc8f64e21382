"""Did vLLM's post-load processing leave a module's weights where, and as, it loaded them?

After ``load_weights`` vLLM runs ``process_weights_after_loading``: per platform and kernel it may leave
the loaded tensors alone (unquantized linears on CUDA), re-lay them in place (w13 halves swapped or
shuffled for FlashInfer MoE, transposed on XPU), pad them, or pack them into something else and drop the
originals (oneDNN and SGL linears on CPU, FP8). A sync that writes the *loaded* layout into the live
tensors is right only where that processing was the identity; anywhere else the kernels would read
bytes no sync wrote, while its checksums pass.

So this is detected, never assumed. :func:`snapshot` records, for every module, its own tensors (name,
shape, stride, dtype and a position-aware checksum of the values) and the tensors reachable from its
other attributes and its ``quant_method`` (one level into containers, closures and kernel objects); the
vLLM plugin (``sync.ends.vllm_plugin``) takes one snapshot before vLLM's processing and one after, and
:func:`compare` names every module whose processing was not the identity. The engine end then writes
in place only where nothing changed and otherwise re-runs vLLM's processing after each sync (reload).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch

from sync.verify.checksums import checksum_flat

__all__ = ["TensorFacts", "ModuleFacts", "ProcessingRecord", "snapshot", "compare", "derived_tensors", "RECORDS",
           "record_of"]


@dataclass(frozen=True)
class TensorFacts:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str
    checksum: tuple[int, int] | None  # None: not readable here (meta tensors)

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorFacts":
        readable = not t.is_meta and t.numel() > 0
        return cls(tuple(t.shape), tuple(t.stride()), str(t.dtype).removeprefix("torch."),
                   checksum_flat(t.detach()) if readable else None)


@dataclass
class ModuleFacts:
    tensors: dict[str, TensorFacts]  # the module's own parameters and buffers
    derived: dict[str, tuple[int, ...]]  # other tensors its attributes reach: where -> shape


@dataclass
class ProcessingRecord:
    """What vLLM's post-load processing did to one model: ``changed`` maps module names to why their
    processing was not the identity (empty: the identity everywhere); ``scalars_only`` names those whose
    only change was to scalar tensors of their own (kv-cache and quantization scales vLLM resets to
    defaults: nothing derived from weights is a scalar)."""

    changed: dict[str, str] = field(default_factory=dict)
    scalars_only: set[str] = field(default_factory=set)
    relaid: set[str] = field(default_factory=set)  # some tensor kept its shape, dtype and strides, not its values

    def blocking(self, modules: set[str]) -> dict[str, str]:
        """The changes that make writing ``modules`` in place wrong: any change to those modules, and
        anywhere else any change but scalars (a tensor elsewhere may be derived from them: MLA absorbs
        ``kv_b_proj`` into its attention layers' weights while processing)."""
        return {m: why for m, why in self.changed.items() if m in modules or m not in self.scalars_only}

    @staticmethod
    def describe(changes: dict[str, str], most: int = 3) -> str:
        hits = [f"{m}: {why}" for m, why in sorted(changes.items())]
        more = f" and {len(hits) - most} more" if len(hits) > most else ""
        return "; ".join(hits[:most]) + more


# model -> its record, filled by the plugin while vLLM loads it (weak: a freed model leaves no entry)
RECORDS: "WeakKeyDictionary[torch.nn.Module, ProcessingRecord]" = WeakKeyDictionary()


def record_of(model: torch.nn.Module) -> ProcessingRecord | None:
    return RECORDS.get(model)


def own_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's own parameters and buffers (not its submodules'), by leaf name."""
    out = {n: p for n, p in module.named_parameters(recurse=False)}
    out.update({n: b for n, b in module.named_buffers(recurse=False) if b is not None})
    return out


OPAQUE = object()  # stands for an object a kernel closure holds that cannot be looked into (a oneDNN handle)


def _reachable(value, where: str, own: set[int], out: dict, depth: int = 0, in_closure: bool = False) -> None:
    """Tensors ``value`` holds that are not the module's own (by storage), one level into containers,
    closures, partials and plain objects: a prepacked copy hides in any of them. An object a closure
    holds that is none of those (a native kernel handle with its own copy of the weights) counts too,
    as ``OPAQUE``: nothing says it does not hold one."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta and value.numel() and value.untyped_storage().data_ptr() not in own:
            out[where] = value
        return
    if isinstance(value, (str, bytes, int, float, bool, complex, type(None), torch.nn.Module, type, torch.dtype,
                          torch.device)):
        return
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = enumerate(value)
    elif isinstance(value, functools.partial):
        items = [("args", value.args), ("keywords", value.keywords)]
    elif callable(value) and getattr(value, "__closure__", None):
        items = [(f"closure{i}", c.cell_contents) for i, c in enumerate(value.__closure__) if _cell_is_set(c)]
        in_closure = True
    elif hasattr(value, "__dict__") and not callable(value):
        items = vars(value).items()
    else:
        if in_closure and not callable(value):
            out[where] = OPAQUE
        return
    if depth >= 2:
        return
    for key, item in items:
        _reachable(item, f"{where}.{key}", own, out, depth + 1, in_closure)


def _cell_is_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
                     "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"}


def derived_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors the module's attributes reach that are not its own parameters or buffers (by storage):
    what processing derived from weights (MLA's absorbed ``W_UK_T``) or packed them into."""
    return {where: t for where, t in _derived(module).items() if t is not OPAQUE}


def _derived(module: torch.nn.Module) -> dict:
    storages = {t.untyped_storage().data_ptr() for t in own_tensors(module).values() if not t.is_meta}
    out: dict = {}
    for key, value in vars(module).items():
        if key not in _MODULE_INTERNALS and not key.startswith("_forward") and not key.startswith("_backward"):
            _reachable(value, key, storages, out)
    return out


def _facts(module: torch.nn.Module) -> ModuleFacts:
    derived = {where: () if t is OPAQUE else tuple(t.shape) for where, t in _derived(module).items()}
    return ModuleFacts({n: TensorFacts.of(t) for n, t in own_tensors(module).items()}, derived)


def snapshot(model: torch.nn.Module) -> dict[str, ModuleFacts]:
    """Facts of every module of ``model`` that holds a tensor, by module name."""
    return {name: facts for name, module in model.named_modules()
            if (facts := _facts(module)).tensors or facts.derived}


def compare(before: dict[str, ModuleFacts], after: dict[str, ModuleFacts]) -> ProcessingRecord:
    """Every module whose tensors processing removed, added, re-shaped, re-strided, re-typed or changed
    in value, or whose attributes now reach tensors they did not before."""
    changed: dict[str, str] = {}
    scalars_only: set[str] = set()
    relaid: set[str] = set()
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        old_t = old.tensors if old else {}
        new_t = new.tensors if new else {}
        why, scalar = [], True
        if old_t.keys() != new_t.keys():
            gone, added = sorted(old_t.keys() - new_t.keys()), sorted(new_t.keys() - old_t.keys())
            why.append(" ".join(filter(None, [f"removed {','.join(gone)}" if gone else "",
                                              f"added {','.join(added)}" if added else ""])))
            scalar = False
        for t in sorted(old_t.keys() & new_t.keys()):
            a, b = old_t[t], new_t[t]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                why.append(f"{t} {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}")
            elif a.stride != b.stride:
                why.append(f"{t} re-strided {a.stride} -> {b.stride}")
            elif a.checksum != b.checksum:
                why.append(f"{t} re-laid (same shape, other values)")
                relaid.add(name)
            else:
                continue
            scalar = scalar and _numel(a.shape) <= 1 and _numel(b.shape) <= 1
        new_derived = set(new.derived if new else {}) - set(old.derived if old else {})
        if new_derived:
            why.append("now holds derived tensors " + ", ".join(sorted(new_derived)[:3]))
            scalar = False
        if why:
            changed[name] = "; ".join(why)
            if scalar:
                scalars_only.add(name)
    return ProcessingRecord(changed, scalars_only, relaid)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

"""Expert load statistics: what engines observed, folded onto logical experts, over a sliding window.

An engine counts tokens per *physical* slot in each forward pass; the window folds them onto
logical experts with the ``phy2log`` in force during that pass (so statistics survive placement
changes), keeps the last ``window`` passes, merges across ranks and engines, and serializes so an
engine can hand its window to the synchronizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from planners.errors import EplbError

__all__ = ["ExpertLoadWindow", "EngineLoadWindows", "synthetic_load", "drift", "read_load", "load_array", "check_load"]


def check_load(load: Any, layers: int | None = None, experts: int | None = None) -> np.ndarray:
    """``load`` as a float array ``[layers, experts]`` of finite, non-negative token counts (of that
    shape, where given); an EplbError naming the load (its shape, or the first bad entry) otherwise."""
    shape = f"[{layers} MoE layers, {experts} experts]" if layers is not None else "[layers, experts]"
    want = f"{shape} of finite, non-negative token counts (no NaN or infinity)"
    try:
        arr = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        raise EplbError(f"load must be a numeric array {want}; got {type(load).__name__}") from None
    if arr.ndim != 2 or (layers is not None and arr.shape != (layers, experts)):
        raise EplbError(f"load has shape {arr.shape}; expected {want}")
    bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
    if len(bad):
        layer, expert = (int(x) for x in bad[0])
        raise EplbError(f"load[{layer}, {expert}] is {float(arr[layer, expert])!r} ({len(bad)} bad entries); expected {want}")
    return arr


def logical_counts(slot_counts: np.ndarray, phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` tokens per logical expert from ``slot_counts [L, P]`` under ``phy2log [L, P]``."""
    slot_counts = np.asarray(slot_counts, dtype=np.float64)
    if slot_counts.shape != phy2log.shape:
        raise ValueError(f"slot counts {slot_counts.shape} and phy2log {phy2log.shape} must both be [layers, slots]")
    layers = phy2log.shape[0]
    flat = (np.arange(layers)[:, None] * num_experts + phy2log).ravel()
    logical = np.bincount(flat, weights=slot_counts.ravel(), minlength=layers * num_experts)
    return logical.reshape(layers, num_experts)


@dataclass
class ExpertLoadWindow:
    num_layers: int
    num_experts: int
    window: int = 1000
    passes: list[np.ndarray] = field(default_factory=list)  # oldest first, each [L, E]

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def record(self, slot_counts: np.ndarray, phy2log: np.ndarray) -> None:
        """One pass of per-slot token counts ``[L, P]`` under placement ``phy2log [L, P]``."""
        self.record_logical(logical_counts(slot_counts, phy2log, self.num_experts))

    def record_logical(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"counts {counts.shape} must be [{self.num_layers}, {self.num_experts}]")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("expert token counts must be finite and non-negative")
        self.passes.append(counts)
        del self.passes[: max(0, len(self.passes) - self.window)]

    def load(self) -> np.ndarray:
        """``[L, E]`` tokens per logical expert over the window."""
        if not self.passes:
            return np.zeros((self.num_layers, self.num_experts))
        return np.sum(self.passes, axis=0)

    def merge(self, other: "ExpertLoadWindow") -> "ExpertLoadWindow":
        """Sum of two windows, aligned on their most recent passes (ranks of one step)."""
        if (other.num_layers, other.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError("cannot merge windows of different model shapes")
        a, b = self.passes[::-1], other.passes[::-1]
        n = max(len(a), len(b))
        zero = np.zeros((self.num_layers, self.num_experts))
        merged = [(a[i] if i < len(a) else zero) + (b[i] if i < len(b) else zero) for i in range(n)][::-1]
        return ExpertLoadWindow(self.num_layers, self.num_experts, max(self.window, other.window), merged[-max(self.window, other.window):])

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_experts": self.num_experts, "window": self.window,
                "passes": [p.tolist() for p in self.passes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExpertLoadWindow":
        return cls(d["num_layers"], d["num_experts"], d["window"], [np.asarray(p, dtype=np.float64) for p in d["passes"]])


@dataclass
class EngineLoadWindows:
    """The expert loads of a job's engines: one window per engine where each engine is balanced by its
    own load (``per_engine``), else one window summing every engine's (they share a placement)."""

    num_layers: int
    num_experts: int
    engines: int
    per_engine: bool = False
    window: int = 1000
    windows: list[ExpertLoadWindow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.resize(self.engines)

    def resize(self, engines: int) -> None:
        """Engines started or stopped: a new engine starts with an empty window."""
        self.engines = engines
        want = engines if self.per_engine else 1
        self.windows = self.windows[:want] + [ExpertLoadWindow(self.num_layers, self.num_experts, self.window)
                                              for _ in range(want - len(self.windows))]

    def record(self, slot_counts: list[np.ndarray], placement) -> None:
        """One pass: ``slot_counts[k] [L, P]`` tokens engine k's slots served under ``placement`` (shared,
        or per engine)."""
        if len(slot_counts) != self.engines:
            raise ValueError(f"slot counts of {len(slot_counts)} engines for {self.engines}")
        logical = [logical_counts(counts, placement.of_engine(k).phy2log, self.num_experts)
                   for k, counts in enumerate(slot_counts)]
        if self.per_engine:
            for window, counts in zip(self.windows, logical):
                window.record_logical(counts)
        else:
            self.windows[0].record_logical(np.sum(logical, axis=0))

    def load(self) -> np.ndarray:
        """``[L, E]`` summed over the engines, or ``[engines, L, E]`` per engine."""
        if self.per_engine:
            return np.stack([w.load() for w in self.windows])
        return self.windows[0].load()



def synthetic_load(num_layers: int, num_experts: int, zipf: float = 1.0, seed: int = 0,
                   tokens: float = 1e6) -> np.ndarray:
    """``[L, E]`` loads: Zipf-distributed popularity (exponent ``zipf``), a random expert order per
    layer, +-10% noise; ``zipf=0`` is uniform up to the noise."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1.0
    share = ranks ** -zipf * rng.uniform(0.9, 1.1, (num_layers, num_experts))
    return tokens * share / share.sum(axis=1, keepdims=True)


def drift(load: np.ndarray, amount: float = 0.3, seed: int = 1) -> np.ndarray:
    """The next window of a drifting load: each expert's share scaled by lognormal noise."""
    rng = np.random.default_rng(seed)
    out = load * rng.lognormal(0.0, amount, load.shape)
    return out * load.sum(axis=1, keepdims=True) / out.sum(axis=1, keepdims=True)


def read_load(path: str | Path) -> np.ndarray:
    """``[L, E]`` load from .npy / .json holding ``[L, E]`` or ``[window, L, E]`` (summed); a .pt file
    (torch) is read by ``sync.cli``, which hands its array to :func:`load_array`."""
    path = Path(path)
    if path.suffix == ".npy":
        data = np.load(path)
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
        data = ExpertLoadWindow.from_dict(raw).load() if isinstance(raw, dict) else np.asarray(raw, dtype=np.float64)
    else:
        raise ValueError(f"load file {path} must be .npy, .json or .pt")
    return load_array(data, str(path))


def load_array(data, where: str) -> np.ndarray:
    """``data`` (``[L, E]`` or ``[window, L, E]``, summed over the window) as a float ``[L, E]`` array."""
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 3:
        data = data.sum(axis=0)
    if data.ndim != 2:
        raise ValueError(f"load file {where} holds shape {data.shape}; expected [layers, experts] or [window, layers, experts]")
    return data

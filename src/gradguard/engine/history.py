"""Bounded history: every step until the buffer is full, then every 2nd, 4th, … step.

Memory stays O(capacity) over millions of steps while the whole run stays visible at a coarser
resolution (the last steps before a fault are kept separately by the guard at full resolution).
"""

from __future__ import annotations

from typing import Any


class History:
    def __init__(self, capacity: int = 2048) -> None:
        if capacity < 4:
            raise ValueError(f"history capacity must be at least 4, got {capacity}")
        self.capacity = capacity
        self.stride = 1
        self.rows: list[dict[str, Any]] = []

    def add(self, step: int, row: dict[str, Any]) -> None:
        if step % self.stride:
            return
        self.rows.append({"step": step, **row})
        if len(self.rows) >= self.capacity:
            self.stride *= 2
            self.rows = [r for r in self.rows if r["step"] % self.stride == 0]

    def to_dict(self, groups: list[str]) -> dict[str, Any]:
        """Column form for the report: ``steps``, ``loss``, ``supervised_tokens``, ``grad_norm[group]``,
        ``update_ratio[group]`` (|dW| / |W| of the update before that step's check)."""
        rows = self.rows
        return {
            "stride": self.stride,
            "steps": [r["step"] for r in rows],
            "loss": [r.get("loss") for r in rows],
            "supervised_tokens": [r.get("supervised") for r in rows],
            "grad_norm": {g: [r.get("norms", {}).get(g) for r in rows] for g in groups},
            "update_ratio": {g: [r.get("updates", {}).get(g) for r in rows] for g in groups},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "stride": self.stride, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity = int(state.get("capacity", self.capacity))
        self.stride = int(state.get("stride", 1))
        self.rows = list(state.get("rows", []))

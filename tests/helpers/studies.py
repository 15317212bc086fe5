"""Study configs on the small real MiniLM experts (the ``small_experts`` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def small_study_config(root: Path, experts: Any, **overrides: Any) -> dict[str, Any]:
    """A small TIES study over ``experts`` (an ExpertSet), its artifacts under ``root``; ``overrides`` replace keys."""
    data: dict[str, Any] = {
        "name": "small-ties",
        "sources": {"base": str(next(iter(experts.base.values()))),
                    "models": [str(p) for p in experts.experts.values()],
                    "tasks": list(experts.experts)},
        "space": {"method": "ties", "search": {"weight": [0.2, 1.2], "density": [0.2, 1.0]}},
        "sampler": {"name": "RandomSampler"},
        "objective": {"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48},
        "trials": 4,
        "seed": 0,
        "artifacts": str(root / "artifacts"),
        "baselines": [],
        "heartbeat_interval": 1,
        "grace_period": 2,
    }
    data.update(overrides)
    return data


def write_study_config(root: Path, data: dict[str, Any]) -> Path:
    """Write a study config as ``root/<name>.yaml``; returns its path."""
    path = root / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path

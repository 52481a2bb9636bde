"""qvgm.policy: FlowPolicy backbones (pi0.5, state), processor, checkpoint IO, published-weight import.

Public API (imported lazily so `qvgm.policy.interface` stays light for ROS nodes):
    make_policy(name, norm_stats, tasks=..., **config_overrides) -> FlowPolicy
    save_policy(policy, dir, version, parent=None, summary=None) / load_policy(dir, expect=None, device="cpu")
    load_published_weights(pi05_model, path_or_tensors, layout="auto") -> ImportReport
    get_config(name), Pi05Config, StateConfig, NormStats, build_tokenizer, Pi05Policy, StatePolicy
Flow-time convention (openpi): t = 1 noise, t = 0 clean; see interface.py.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_policy": "qvgm.policy.factory",
    "save_policy": "qvgm.policy.checkpoint_io",
    "load_policy": "qvgm.policy.checkpoint_io",
    "load_published_weights": "qvgm.policy.weights_import",
    "ImportReport": "qvgm.policy.weights_import",
    "get_config": "qvgm.policy.config",
    "Pi05Config": "qvgm.policy.config",
    "StateConfig": "qvgm.policy.config",
    "NormStats": "qvgm.policy.processor",
    "ObservationError": "qvgm.policy.processor",
    "build_tokenizer": "qvgm.policy.processor",
    "Pi05Policy": "qvgm.policy.pi05",
    "StatePolicy": "qvgm.policy.state_policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qvgm.policy' has no attribute {name!r}")

"""Bring-up profiles (config/<name>.yaml): the one reader shared by launch/tabletop.launch.py and `qvgm up`.

Never imports rclpy or launch: both front ends turn the same `NodeSpec` list into their own node objects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def _share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("qvgm"))
    except Exception:  # not installed as a ROS package (plain checkout)
        return None


def package_file(relative: str) -> Path:
    """A file shipped with the package (config/, urdf/, launch/): the checkout first, then the ament share."""
    candidate = REPO_ROOT / relative
    if candidate.exists():
        return candidate
    share = _share_dir()
    if share is not None and (share / relative).exists():
        return share / relative
    raise FileNotFoundError(f"{relative} not found in {REPO_ROOT} or the qvgm share directory")


@dataclass(frozen=True)
class NodeSpec:
    """One node of a profile: ROS node name, console-script executable, parameters (plain YAML values)."""

    name: str
    executable: str
    parameters: dict[str, Any] = field(default_factory=dict)


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load config/<name>.yaml (or a path to a YAML file); raises ValueError on a malformed profile."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = package_file(f"config/{name_or_path}.yaml")
    with open(path, encoding="utf-8") as f:
        prof = yaml.safe_load(f)
    if not isinstance(prof, dict) or not isinstance(prof.get("nodes"), dict) or not prof["nodes"]:
        raise ValueError(f"profile {path} has no `nodes` mapping")
    for node_name, node in prof["nodes"].items():
        if not isinstance(node, dict) or "executable" not in node:
            raise ValueError(f"profile {path}: node {node_name!r} needs an `executable`")
    return prof


def node_specs(profile: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None) -> list[NodeSpec]:
    """The graph of a profile: one NodeSpec per node, parameters with `overrides[node][param]` applied."""
    specs = []
    overrides = overrides or {}
    unknown = set(overrides) - set(profile["nodes"])
    if unknown:
        raise ValueError(f"overrides for nodes not in the profile: {sorted(unknown)}")
    for node_name, node in profile["nodes"].items():
        params = copy.deepcopy(node.get("parameters") or {})
        params.update(overrides.get(node_name, {}))
        specs.append(NodeSpec(node_name, node["executable"], params))
    return specs


def ros_params_yaml(specs: list[NodeSpec]) -> str:
    """The specs' parameters as a ROS 2 parameters file (`--ros-args --params-file`), one section per node."""
    return yaml.safe_dump({s.name: {"ros__parameters": dict(s.parameters)} for s in specs}, sort_keys=False)

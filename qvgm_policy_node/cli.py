"""`qvgm up PROFILE`: run a profile's whole graph in ONE process with one rclpy executor.

Same graph as `ros2 launch qvgm tabletop.launch.py` (both read config/<profile>.yaml through
qvgm_policy_node.profile.node_specs). Applies loopback DDS (qvgm_policy_node.ros_env) unless --network is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import Any

import yaml

from qvgm_policy_node.profile import NodeSpec, load_profile, node_specs

# console-script executable (setup.py) -> node class
NODE_CLASSES: dict[str, str] = {
    "sim_node": "qvgm_policy_node.sim_node:SimNode",
    "policy_node": "qvgm_policy_node.policy_node:PolicyNode",
}


def node_class(executable: str) -> type:
    if executable not in NODE_CLASSES:
        raise ValueError(f"no in-process node class for executable {executable!r}; known: {sorted(NODE_CLASSES)}")
    module, cls = NODE_CLASSES[executable].split(":")
    return getattr(importlib.import_module(module), cls)


def build_nodes(specs: list[NodeSpec], context: Any = None) -> list[Any]:
    """Instantiate every NodeSpec as an rclpy node (parameters as overrides) in `context`."""
    from rclpy.parameter import Parameter

    nodes = []
    try:
        for spec in specs:
            overrides = [Parameter(k, value=v) for k, v in spec.parameters.items()]
            nodes.append(node_class(spec.executable)(spec.name, context=context, parameter_overrides=overrides))
    except Exception:
        for node in nodes:
            node.destroy_node()
        raise
    return nodes


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """["sim_node.seed=3", ...] -> {"sim_node": {"seed": 3}} (values parsed as YAML scalars/lists)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or not node or not param:
            raise ValueError(f"--set expects NODE.PARAM=VALUE, got {item!r}")
        out.setdefault(node, {})[param] = yaml.safe_load(value)
    return out


def up(profile: str, overrides: dict[str, dict[str, Any]] | None = None, duration: float | None = None) -> int:
    """Bring the graph up and spin until Ctrl-C or `duration` seconds."""
    from qvgm_policy_node.graph import Graph

    specs = node_specs(load_profile(profile), overrides)
    with Graph(specs) as graph:
        print(f"qvgm up {profile}: nodes {[s.name for s in specs]}", flush=True)
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while graph.context.ok() and (deadline is None or time.monotonic() < deadline):
                graph.spin_once(0.1)
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvgm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="run a profile's graph in one process")
    p_up.add_argument("profile", help="profile name (config/<name>.yaml) or path")
    p_up.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE")
    p_up.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p_up.add_argument("--network", action="store_true",
                      help="keep the caller's DDS discovery settings (real robot network) instead of loopback")
    args = parser.parse_args(argv)
    if args.command == "up":
        if not args.network:
            from qvgm_policy_node.ros_env import apply_loopback_env

            apply_loopback_env(keep_existing_domain=True)
        return up(args.profile, parse_overrides(args.set), args.duration)
    return 2


if __name__ == "__main__":
    sys.exit(main())

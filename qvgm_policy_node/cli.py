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
    "recorder_node": "qvgm_policy_node.recorder_node:RecorderNode",
    "episode_manager": "qvgm_policy_node.episode_manager:EpisodeManager",
    "teleop_node": "qvgm_policy_node.teleop_node:TeleopNode",
    "camera_node": "qvgm_policy_node.camera_node:CameraNode",  # named /camera/<camera_name>; dict overrides
}


def node_class(executable: str) -> type:
    if executable not in NODE_CLASSES:
        raise ValueError(f"no in-process node class for executable {executable!r}; known: {sorted(NODE_CLASSES)}")
    module, cls = NODE_CLASSES[executable].split(":")
    return getattr(importlib.import_module(module), cls)


def build_nodes(specs: list[NodeSpec], context: Any = None) -> list[Any]:
    """Instantiate every qvgm NodeSpec as an rclpy node (parameters as overrides, remappings as node-local
    ROS arguments) in `context`. Nodes of other packages (spec.external, e.g. robot_state_publisher) are
    skipped: the caller reports them."""
    from rclpy.parameter import Parameter

    nodes = []
    try:
        for spec in specs:
            if spec.external:
                continue
            cls = node_class(spec.executable)
            kwargs: dict[str, Any] = {"context": context}
            if spec.remappings:
                kwargs["cli_args"] = spec.ros_args()
            if spec.executable == "camera_node":  # CameraNode(camera_name, parameter_overrides=dict)
                if spec.name != spec.parameters.get("camera_name") or spec.namespace != "camera":
                    raise ValueError(f"camera node {spec.name!r}: the node must be named after its camera_name "
                                     f"in namespace 'camera' (node /camera/<camera_name>)")
                nodes.append(cls(parameter_overrides=dict(spec.parameters), **kwargs))
                continue
            if spec.namespace:
                kwargs["namespace"] = spec.namespace
            overrides = [Parameter(k, value=v) for k, v in spec.parameters.items()]
            nodes.append(cls(spec.name, parameter_overrides=overrides, **kwargs))
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


def up(profile: str, overrides: dict[str, dict[str, Any]] | None = None, duration: float | None = None,
       mode: str | None = None) -> int:
    """Bring the graph up (only `mode`'s nodes when given) and spin until Ctrl-C or `duration` seconds."""
    from qvgm_policy_node.graph import Graph

    specs = node_specs(load_profile(profile), overrides, mode=mode)
    for spec in specs:
        if spec.external:
            print(f"qvgm up {profile}: skipping {spec.name} ({spec.package}/{spec.executable} is not a Python "
                  f"node; start it yourself or use `ros2 launch qvgm tabletop.launch.py profile:={profile}`)",
                  flush=True)
    with Graph(specs) as graph:
        print(f"qvgm up {profile}: nodes {[s.name for s in specs if not s.external]}", flush=True)
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
    p_up.add_argument("profile", help="profile name (config/<name>.yaml; aliases sim, real) or path")
    p_up.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE")
    p_up.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p_up.add_argument("--mode", default=None, help="only the nodes of this mode (e.g. deploy); default: all")
    p_up.add_argument("--network", action="store_true",
                      help="keep the caller's DDS discovery settings (real robot network) instead of loopback")
    p_check = sub.add_parser("check", help="validate a profile (schema, URDF) and, unless --static, a live graph")
    p_check.add_argument("profile", help="profile name (config/<name>.yaml; aliases sim, real) or path")
    p_check.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                         help="the same overrides the graph was started with")
    p_check.add_argument("--timeout", type=float, default=10.0, help="wait this long for the topics to appear (s)")
    p_check.add_argument("--window", type=float, default=3.0, help="measure rates over this many seconds")
    p_check.add_argument("--min-rate", type=float, default=0.5,
                         help="observed rate must be at least this fraction of the profile's rate")
    p_check.add_argument("--static", action="store_true", help="only the static checks (no ROS graph)")
    p_check.add_argument("--network", action="store_true",
                         help="keep the caller's DDS discovery settings (real robot network) instead of loopback")
    args = parser.parse_args(argv)
    if args.command in ("up", "check") and not args.network:
        from qvgm_policy_node.ros_env import apply_loopback_env

        apply_loopback_env(keep_existing_domain=True)
    if args.command == "up":
        return up(args.profile, parse_overrides(args.set), args.duration, args.mode)
    if args.command == "check":
        from qvgm_policy_node.check_profile import run_check

        return run_check(args.profile, parse_overrides(args.set), timeout=args.timeout, window=args.window,
                         min_rate_fraction=args.min_rate, static_only=args.static)
    return 2


if __name__ == "__main__":
    sys.exit(main())

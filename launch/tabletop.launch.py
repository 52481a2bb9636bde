"""`ros2 launch qvgm tabletop.launch.py [profile:=tabletop_sim|sim|tabletop_real|real|robots/ur5e]`.

Thin over config/<profile>.yaml: the node list and parameters come from qvgm_policy_node.profile.node_specs,
the same function `qvgm up` uses. DDS discovery settings are the caller's environment (see the profile).
Nodes of other packages (robot_state_publisher, with robot_description read from the profile's robot.urdf)
are started here only; `qvgm up` skips them.
"""

from __future__ import annotations

from qvgm_policy_node.profile import NodeSpec, launch_parameters, load_profile, node_specs

DEFAULT_PROFILE = "tabletop_sim"


def describe(profile: str = DEFAULT_PROFILE, mode: str | None = None) -> list[NodeSpec]:
    """The nodes this launch file starts (no launch import needed)."""
    return node_specs(load_profile(profile), mode=mode)


def _nodes(context, *args, **kwargs):  # launch OpaqueFunction: resolve the profile argument at launch time
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    name = LaunchConfiguration("profile").perform(context)
    mode = LaunchConfiguration("mode").perform(context) or None
    profile = load_profile(name)
    return [Node(package=spec.package, executable=spec.executable, name=spec.name, namespace=spec.namespace or None,
                 parameters=[launch_parameters(spec, profile)], remappings=list(spec.remappings) or None,
                 output="screen") for spec in node_specs(profile, mode=mode)]


def generate_launch_description():
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription

    return LaunchDescription([
        DeclareLaunchArgument("profile", default_value=DEFAULT_PROFILE,
                              description="config/<profile>.yaml (aliases: sim, real)"),
        DeclareLaunchArgument("mode", default_value="",
                              description="'' = every node; e.g. deploy = only nodes whose `modes` list it"),
        OpaqueFunction(function=_nodes),
    ])

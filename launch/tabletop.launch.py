"""`ros2 launch qvgm tabletop.launch.py [profile:=tabletop_sim]`: the profile's graph as launch_ros Nodes.

Thin over config/<profile>.yaml: the node list and parameters come from qvgm_policy_node.profile.node_specs,
the same function `qvgm up` uses. DDS discovery settings are the caller's environment (see the profile).
"""

from __future__ import annotations

from qvgm_policy_node.profile import NodeSpec, load_profile, node_specs

DEFAULT_PROFILE = "tabletop_sim"


def describe(profile: str = DEFAULT_PROFILE) -> list[NodeSpec]:
    """The nodes this launch file starts (no launch import needed)."""
    return node_specs(load_profile(profile))


def _nodes(context, *args, **kwargs):  # launch OpaqueFunction: resolve the profile argument at launch time
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    profile = LaunchConfiguration("profile").perform(context)
    return [Node(package="qvgm", executable=spec.executable, name=spec.name, parameters=[spec.parameters],
                 output="screen") for spec in describe(profile)]


def generate_launch_description():
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription

    return LaunchDescription([
        DeclareLaunchArgument("profile", default_value=DEFAULT_PROFILE, description="config/<profile>.yaml"),
        OpaqueFunction(function=_nodes),
    ])

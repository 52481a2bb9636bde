"""What every node shares: parameter declaration (one place for the list-parameter rule) and the main loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node


def declare(node: Node, defaults: dict[str, Any]) -> dict[str, Any]:
    """Declare every parameter with its default; returns the effective values (overrides applied).

    List parameters are dynamically typed; an empty list from a params file (`cameras: []`, which ROS cannot
    type and delivers as unset) reads as [] instead of None.
    """
    values = {}
    for k, v in defaults.items():
        descriptor = ParameterDescriptor(dynamic_typing=True) if isinstance(v, list) else ParameterDescriptor()
        value = node.declare_parameter(k, v, descriptor).value
        values[k] = (list(value) if value is not None else []) if isinstance(v, list) else value
    return values


def spin_main(node_factory: Callable[[], Node], args: list[str] | None = None) -> None:
    """Console-script body of every node: init, spin until Ctrl-C or SIGTERM, destroy, shut down."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    node = node_factory()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()

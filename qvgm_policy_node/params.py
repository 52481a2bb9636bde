"""What every node shares: parameter declaration (one place for the list-parameter rule) and the main loop."""

from __future__ import annotations

import os
import sys
import threading
import traceback
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


def spin_main(node_factory: Callable[[], Node], args: list[str] | None = None, *,
              shutdown_timeout_s: float = 10.0) -> None:
    """Console-script body of every node: init, spin until Ctrl-C or SIGTERM, destroy, shut down, exit.

    Exiting is guaranteed: a node's worker threads (the sim's EGL render thread, a recorder's writer) have been
    stopped and flushed by destroy_node, after which the process ends with os._exit so a thread stuck in native
    code cannot hold interpreter shutdown; and if destroy/shutdown itself takes longer than
    `shutdown_timeout_s`, a watchdog ends the process with status 1 and says so (what ros2 launch would do
    with SIGKILL, minus the wait).
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=args)
    node = node_factory()
    code = 0
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except BaseException:  # a crash still releases the node and exits non-zero, with its traceback
        code = 1
        traceback.print_exc()
    finally:
        watchdog = threading.Timer(shutdown_timeout_s, _forced_exit, args=(node.get_name(), shutdown_timeout_s))
        watchdog.daemon = True
        watchdog.start()
        try:
            node.destroy_node()
            rclpy.try_shutdown()
        finally:
            watchdog.cancel()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _forced_exit(name: str, timeout_s: float) -> None:
    sys.stderr.write(f"[{name}] shutdown did not finish within {timeout_s:.0f} s: forcing exit\n")
    sys.stderr.flush()
    os._exit(1)

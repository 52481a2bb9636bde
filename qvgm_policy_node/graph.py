"""An in-process ROS graph: its own rclpy Context, one SingleThreadedExecutor, nodes from a profile.

Used by `qvgm up`, the demo, benches and tests (a fresh context each, shut down cleanly on exit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from qvgm_policy_node.profile import NodeSpec


class Graph:
    """Context manager: `with Graph(specs) as g: g.spin_until(lambda: ..., timeout=5)`."""

    def __init__(self, specs: list[NodeSpec] | None = None) -> None:
        self.specs = list(specs or [])
        self.context = rclpy.Context()
        self.executor: SingleThreadedExecutor | None = None
        self.nodes: dict[str, Node] = {}

    def __enter__(self) -> Graph:
        from qvgm_policy_node.cli import build_nodes

        rclpy.init(context=self.context)
        try:
            self.executor = SingleThreadedExecutor(context=self.context)
            for node in build_nodes(self.specs, self.context):
                self.add(node)
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def node(self, name: str, **kwargs: Any) -> Node:
        """Create (and spin) a plain helper node in this graph's context."""
        return self.add(Node(name, context=self.context, **kwargs))

    def add(self, node: Node) -> Node:
        assert self.executor is not None
        self.nodes[node.get_name()] = node
        self.executor.add_node(node)
        return node

    def spin_once(self, timeout: float = 0.01) -> None:
        assert self.executor is not None
        self.executor.spin_once(timeout_sec=timeout)

    def spin_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Spin until predicate() is true (returns True) or `timeout` wall seconds pass (returns False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            self.spin_once(0.005)
        return bool(predicate())

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def call(self, client: Any, request: Any, timeout: float = 10.0) -> Any:
        """Call a service and spin until the answer; raises TimeoutError."""
        if not self.spin_until(client.service_is_ready, timeout):
            raise TimeoutError(f"service {client.srv_name} not available")
        future = client.call_async(request)
        if not self.spin_until(future.done, timeout):
            raise TimeoutError(f"service {client.srv_name} did not answer in {timeout}s")
        return future.result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(timeout_sec=1.0)
            self.executor = None
        for node in self.nodes.values():
            node.destroy_node()
        self.nodes.clear()
        rclpy.try_shutdown(context=self.context)

"""episode_manager over real DDS: the state machine through its services (invalid transitions answered, never
raised), the latched status and policy-enable topics, the time limit, and unattended sim collection (success
auto-label, sim reset service, auto start)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import rclpy
from helpers import wait_for
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool, Trigger

from qvgm_policy_node.episode_manager import EpisodeManager

LATCHED = QoSProfile(depth=20, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@contextmanager
def graph(*makers: Callable[[rclpy.Context], Node]) -> Iterator[list[Node]]:
    """Each node in its own rclpy context (separate DDS participants), all spun on background threads."""
    runs = []
    try:
        for make in makers:
            ctx = rclpy.Context()
            rclpy.init(context=ctx)
            ex = SingleThreadedExecutor(context=ctx)  # not Multi: it busy-waits holding the GIL (rclpy #1452)
            node = make(ctx)
            ex.add_node(node)
            th = threading.Thread(target=ex.spin, daemon=True)
            th.start()
            runs.append((ctx, ex, node, th))
        yield [r[2] for r in runs]
    finally:
        for ctx, ex, node, th in reversed(runs):
            ex.shutdown(timeout_sec=2.0)
            th.join(5.0)
            node.destroy_node()
            rclpy.shutdown(context=ctx)


class Operator(Node):
    """Test-side client: calls the episode services, records status and policy-enable messages."""

    def __init__(self, ctx: rclpy.Context) -> None:
        super().__init__("operator", context=ctx)
        self.status: list[dict] = []
        self.enable: list[bool] = []
        self.create_subscription(String, "/qvgm/episode/status", lambda m: self.status.append(json.loads(m.data)),
                                 LATCHED)
        self.create_subscription(Bool, "/qvgm/policy/enable", lambda m: self.enable.append(m.data), LATCHED)
        self.cli = {n: self.create_client(Trigger, f"/qvgm/episode/{n}") for n in ("start", "stop", "discard")}
        self.cli["label"] = self.create_client(SetBool, "/qvgm/episode/label")
        self.cli["takeover"] = self.create_client(SetBool, "/qvgm/episode/takeover")

    def call(self, name: str, data: bool | None = None) -> Any:
        c = self.cli[name]
        wait_for(c.service_is_ready)
        fut = c.call_async(Trigger.Request() if data is None else SetBool.Request(data=data))
        wait_for(fut.done)
        return fut.result()

    def state(self) -> str | None:
        return self.status[-1]["state"] if self.status else None


class FakeSimReset(Node):
    """Plays the sim's side: a ~/reset Trigger service and the /qvgm/sim/success stream."""

    def __init__(self, ctx: rclpy.Context) -> None:
        super().__init__("fake_sim", context=ctx)
        self.resets = 0
        self.pub = self.create_publisher(Bool, "/qvgm/sim/success", 10)
        self.create_service(Trigger, "~/reset", self._reset)

    def _reset(self, req: Trigger.Request, res: Trigger.Response) -> Trigger.Response:
        self.resets += 1
        self.pub.publish(Bool(data=False))
        res.success, res.message = True, "pick the cube"
        return res


def manager(**params: Any) -> Callable[[rclpy.Context], Node]:
    return lambda ctx: EpisodeManager(context=ctx, parameter_overrides=[Parameter(k, value=v)
                                                                         for k, v in params.items()])


def test_services_walk_the_state_machine_and_refuse_invalid() -> None:
    with graph(manager(time_limit=30.0), Operator) as (mgr, op):
        wait_for(lambda: op.state() == "IDLE")
        assert wait_for(lambda: op.enable and op.enable[-1] is False) is not None
        for name, data in [("stop", None), ("discard", None), ("label", True), ("takeover", True)]:
            r = op.call(name, data)
            assert r.success is False and "IDLE" in r.message, (name, r.message)
        assert op.call("start").success
        wait_for(lambda: op.state() == "RUNNING")
        assert wait_for(lambda: op.enable[-1] is True)
        r = op.call("start")
        assert not r.success and "RUNNING" in r.message
        assert op.call("takeover", True).success
        wait_for(lambda: op.status[-1]["takeover"] and op.status[-1]["control"] == "teleop")
        assert wait_for(lambda: op.enable[-1] is False)  # policy muted during takeover
        assert op.call("takeover", False).success
        wait_for(lambda: op.enable[-1] is True)
        assert not op.call("label", True).success  # must stop first
        assert op.call("stop").success
        wait_for(lambda: op.state() == "LABEL")
        st = op.status[-1]
        assert st["terminal"] and st["t_end"] >= st["t_start"] and st["episode"] == 0
        assert op.call("label", False).success
        wait_for(lambda: op.state() == "RESET")
        assert op.status[-1]["label"] is False and op.status[-1]["label_source"] == "operator"
        assert op.enable[-1] is False
        assert not op.call("label", True).success and not op.call("takeover", True).success
        assert op.call("stop").success  # reset finished
        wait_for(lambda: op.state() == "IDLE")
        assert op.call("start").success and op.call("discard").success
        wait_for(lambda: op.state() == "RESET" and op.status[-1]["discarded"] and op.status[-1]["episode"] == 1)
        # the status topic is latched: a late joiner sees the current state at once
        late: list[dict] = []
        sub = op.create_subscription(String, "/qvgm/episode/status", lambda m: late.append(json.loads(m.data)),
                                     LATCHED)
        wait_for(lambda: late and late[-1]["state"] == "RESET")
        op.destroy_subscription(sub)


def test_time_limit_and_unattended_sim_collection() -> None:
    with graph(FakeSimReset, manager(time_limit=0.8, sim=True, sim_reset_service="/fake_sim/reset", auto_start=True,
                                     auto_label_timeout=True), Operator) as (sim, mgr, op):
        wait_for(lambda: op.state() == "RUNNING" and op.status[-1]["episode"] == 0)
        sim.pub.publish(Bool(data=True))  # a True before any False of this episode is ignored (stale)
        time.sleep(0.2)
        assert op.state() == "RUNNING"
        sim.pub.publish(Bool(data=False))
        time.sleep(0.1)
        sim.pub.publish(Bool(data=True))
        labelled = wait_for(lambda: [s for s in op.status if s["episode"] == 0 and s["label"] is True])
        first = labelled[0]
        assert first["label_source"] == "auto" and first["terminal"] and first["end_reason"] == "success"
        # reset through the sim service, back to IDLE, auto start of the next episode
        wait_for(lambda: op.status[-1]["episode"] == 1 and op.state() == "RUNNING")
        assert sim.resets >= 1
        # episode 1: no success -> the time limit ends it, auto failure label (not terminal: truncated)
        timed = wait_for(lambda: [s for s in op.status if s["episode"] == 1 and s["state"] == "RESET"], timeout=5.0)
        t = timed[0]
        assert t["label"] is False and t["label_source"] == "auto" and t["end_reason"] == "timeout"
        assert not t["terminal"] and 0.8 <= t["elapsed"] < 1.2
        wait_for(lambda: op.status[-1]["episode"] == 2 and op.state() == "RUNNING")
        assert sim.resets >= 2

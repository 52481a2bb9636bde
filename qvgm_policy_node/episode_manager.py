"""episode_manager: the teleop-reset collection loop IDLE -> RUNNING -> LABEL -> RESET -> IDLE.

Services (std_srvs): /qvgm/episode/start, /qvgm/episode/stop (RUNNING -> LABEL; in RESET: reset finished),
/qvgm/episode/discard (Trigger), /qvgm/episode/label (SetBool, data = success), /qvgm/episode/takeover
(SetBool, data = teleop takes over during RUNNING). Invalid transitions answer success=False with the reason.
Publishes (transient-local): /qvgm/episode/status (String JSON, EpisodeStateMachine.status: state, episode,
elapsed s, takeover, control, t_start/t_end node-clock s, label, ...), /qvgm/policy/enable (Bool: True only while
the policy drives). Sim mode: /qvgm/sim/success (Bool) ends and auto-labels the episode, RESET calls the sim's
reset service (std_srvs/Trigger) and returns to IDLE, `auto_start` starts the next episode: unattended collection.
"""

from __future__ import annotations

import json
from typing import Any

from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import Bool, String
from std_srvs.srv import SetBool, Trigger

from qvgm.recording import IDLE, RESET, RUNNING, EpisodeStateMachine, Transition
from qvgm_policy_node import topics
from qvgm_policy_node.params import declare, spin_main

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STATUS_TOPIC = "/qvgm/episode/status"  # std_msgs/String JSON, transient-local
ENABLE_TOPIC = "/qvgm/policy/enable"  # std_msgs/Bool, transient-local: the policy node publishes chunks only if True
SERVICE_PREFIX = "/qvgm/episode/"  # start, stop, discard (Trigger); label, takeover (SetBool)

DEFAULTS: dict[str, Any] = {
    "time_limit": 60.0, "sim": False, "sim_reset_service": "", "auto_start": False, "auto_label_timeout": False,
    "status_hz": 2.0, "tick_hz": 20.0, "reset_retry_s": 2.0,
}


class EpisodeManager(Node):
    """See the module doc; parameters in DEFAULTS (time_limit in s)."""

    def __init__(self, node_name: str = "episode_manager", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = declare(self, DEFAULTS)
        self.sim = bool(p["sim"])
        self.auto_start = bool(p["auto_start"])
        self.reset_retry_s = float(p["reset_retry_s"])
        self.sm = EpisodeStateMachine(float(p["time_limit"]), auto_label_timeout=bool(p["auto_label_timeout"]))
        self.pub_status = self.create_publisher(String, STATUS_TOPIC, LATCHED)
        self.pub_enable = self.create_publisher(Bool, ENABLE_TOPIC, LATCHED)
        self.create_service(Trigger, SERVICE_PREFIX + "start", self._srv(lambda now, _r: self.sm.start(now)))
        self.create_service(Trigger, SERVICE_PREFIX + "stop", self._srv(lambda now, _r: self.sm.stop(now)))
        self.create_service(Trigger, SERVICE_PREFIX + "discard", self._srv(lambda now, _r: self.sm.discard(now)))
        self.create_service(SetBool, SERVICE_PREFIX + "label",
                            self._srv(lambda now, r: self.sm.label_request(bool(r.data), now)))
        self.create_service(SetBool, SERVICE_PREFIX + "takeover",
                            self._srv(lambda now, r: self.sm.takeover_request(bool(r.data), now)))
        self.reset_client = None
        self._reset_future = None
        self._reset_last_try = -1e9
        self._fresh = False  # the sim was reset since the last episode started
        if p["sim_reset_service"]:
            self.reset_client = self.create_client(Trigger, str(p["sim_reset_service"]))
        self._armed = False  # a success=False was seen during this episode (guards against a stale True)
        if self.sim:
            self.create_subscription(Bool, topics.SUCCESS, self._on_success, 10)
        self.create_timer(1.0 / float(p["tick_hz"]), self._tick)
        self.create_timer(1.0 / float(p["status_hz"]), self._publish)
        self._last_seq = -1
        self._publish()

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _srv(self, fn: Any) -> Any:
        def handler(request: Any, response: Any) -> Any:
            try:
                tr: Transition = fn(self.now(), request)
                response.success, response.message = tr.ok, tr.message
            except Exception as exc:  # a service never raises into the executor
                response.success, response.message = False, f"internal error: {type(exc).__name__}: {exc}"
            self._after_transition()
            if response.success:
                self.get_logger().info(response.message)
            else:
                self.get_logger().warning(f"refused: {response.message}")
            return response
        return handler

    def _after_transition(self) -> None:
        if self.sm.seq != self._last_seq:
            if self.sm.state != RUNNING:
                self._armed = False
            self._publish()

    def _on_success(self, msg: Bool) -> None:
        if self.sm.state != RUNNING:
            return
        if not msg.data:
            self._armed = True
        elif self._armed:
            tr = self.sm.sim_success(self.now())
            if tr:
                self.get_logger().info(f"sim success: {tr.message}")
            self._after_transition()

    def _tick(self) -> None:
        now = self.now()
        tr = self.sm.tick(now)
        if tr:
            self.get_logger().info(f"time limit: {tr.message}")
        if self.sm.state == RESET and self.reset_client is not None:
            if self._drive_sim_reset(now):
                self.sm.reset_done(now)
                self._fresh = True
        if self.sm.state == IDLE and self.auto_start:
            if self.reset_client is not None and not self._fresh:
                self._fresh = self._drive_sim_reset(now)  # unattended episodes always start from a sim reset
            else:
                tr = self.sm.start(now)
                self._fresh = False
                if tr:
                    self.get_logger().info(f"auto start: {tr.message}")
        self._after_transition()

    def _drive_sim_reset(self, now: float) -> bool:
        """Call the sim's reset service without blocking; True once a call has succeeded (retries on failure)."""
        fut = self._reset_future
        if fut is not None and fut.done():
            self._reset_future = None
            try:
                res = fut.result()
                ok, msg = bool(res.success), res.message
            except Exception as exc:
                ok, msg = False, str(exc)
            if ok:
                self.get_logger().info(f"sim reset done: {msg}")
            else:
                self.get_logger().error(f"sim reset failed: {msg}; retrying")
            return ok
        if fut is None and now - self._reset_last_try >= self.reset_retry_s:
            self._reset_last_try = now
            if self.reset_client.service_is_ready():
                self._reset_future = self.reset_client.call_async(Trigger.Request())
            else:
                self.get_logger().warning("sim reset service not available yet", throttle_duration_sec=5.0)
        return False

    def _publish(self) -> None:
        self._last_seq = self.sm.seq
        self.pub_status.publish(String(data=json.dumps(self.sm.status(self.now()))))
        self.pub_enable.publish(Bool(data=self.sm.control == "policy"))


def main(args: list[str] | None = None) -> None:
    spin_main(EpisodeManager, args)


if __name__ == "__main__":
    main()

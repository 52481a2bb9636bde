"""teleop_node: sensor_msgs/Joy (any joystick / SpaceMouse driver) or a terminal keyboard -> joint/gripper jogs.

Publishes one-point JointTrajectory messages (absolute targets, robot units, time_from_start = 1/rate_hz,
header.stamp = now) on /arm_controller/joint_trajectory, ONLY while teleop has control according to
/qvgm/episode/status ("control": "teleop"; set require_status:=false for a robot without episode_manager).
Joy: the deadman button must be held; jogs start from the measured /joint_states, integrate the mapped axis
velocities (qvgm.recording.JoyMapping) and are clamped per step (max_velocity / rate_hz) and to the joint limits
(parameters lower/upper, defaults = urdf/tabletop_arm.urdf; if `urdf` is set and qvgm.safety is available, the
limits are read from it). A Joy message older than joy_timeout s counts as released (robot holds).
Keyboard (keyboard:=true, reads stdin raw or `keyboard_device`): g start, x stop (in RESET: reset done, also r),
s success, f failure, d discard, t toggle takeover, 1..7 select joint (7 = gripper), = / + and - jog it by
key_step (rad, gripper: key_step/10 m). Episode keys call the /qvgm/episode/* services asynchronously.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import JointState, Joy
from std_msgs.msg import String
from std_srvs.srv import SetBool, Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from qvgm.recording import Jogger, JoyMapping, parse_key
from qvgm_policy_node import topics
from qvgm_policy_node.params import declare, spin_main

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
JOINT_NAMES = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]

DEFAULTS: dict[str, Any] = {
    "joint_names": JOINT_NAMES,
    "lower": [-2.9671, -2.0944, -2.618, -2.9671, -2.0944, -2.9671, 0.0],
    "upper": [2.9671, 2.0944, 2.618, 2.9671, 2.0944, 2.9671, 0.04],
    "max_velocity": [0.5, 0.5, 0.5, 0.8, 0.8, 0.8, 0.05],  # rad/s, m/s: jog speed caps (below the URDF limits)
    "urdf": "",
    "axes": [0, 1, 4, 3, 7, 6, -1], "scale": [0.5, 0.5, 0.5, 0.8, 0.8, 0.8, 0.05],
    "deadman_button": 4, "gripper_open_button": 1, "gripper_close_button": 0, "gripper_speed": 0.03,
    "deadzone": 0.1, "rate_hz": 20.0, "joy_timeout": 0.5, "require_status": True,
    "keyboard": False, "keyboard_device": "", "key_step": 0.05,
    "trajectory_topic": topics.TRAJECTORY,
}

EPISODE_KEYS = {"start": ("start", None), "stop": ("stop", None), "reset_done": ("stop", None),
                "discard": ("discard", None), "success": ("label", True), "failure": ("label", False)}


def seconds_to_duration(s: float) -> Duration:
    sec = int(s)
    return Duration(sec=sec, nanosec=int(round((s - sec) * 1e9)))


class TeleopNode(Node):
    """See the module doc; parameters in DEFAULTS."""

    def __init__(self, node_name: str = "teleop_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = declare(self, DEFAULTS)
        self.joint_names = list(p["joint_names"])
        lower, upper = np.asarray(p["lower"], float), np.asarray(p["upper"], float)
        if p["urdf"]:
            try:
                from qvgm.safety import SafetyLimits  # type: ignore[import-not-found]

                lim = SafetyLimits.from_urdf(p["urdf"], self.joint_names)
                lower, upper = lim.lower, lim.upper
            except ImportError:
                self.get_logger().warning("qvgm.safety not available: using the lower/upper parameters")
        self.jogger = Jogger(lower, upper, np.asarray(p["max_velocity"], float))
        self.mapping = JoyMapping(list(p["axes"]), list(p["scale"]), int(p["deadman_button"]),
                                  int(p["gripper_open_button"]), int(p["gripper_close_button"]),
                                  float(p["gripper_speed"]), float(p["deadzone"]))
        if len(self.mapping.axes) != len(self.joint_names):
            raise ValueError("axes/scale need one entry per joint in joint_names")
        self.dt = 1.0 / float(p["rate_hz"])
        self.joy_timeout = float(p["joy_timeout"])
        self.key_step = float(p["key_step"])
        self.require_status = bool(p["require_status"])
        self.control = "teleop" if not self.require_status else "none"
        self.takeover = False
        self.q: np.ndarray | None = None
        self.joy: tuple[float, list[float], list[int]] | None = None
        self.selected = 0
        self.published = 0
        self.keys: deque[str] = deque()
        self.last_response: dict[str, Any] = {}
        self.pub = self.create_publisher(JointTrajectory, str(p["trajectory_topic"]), 10)
        self.create_subscription(Joy, "/joy", self._on_joy, 10)
        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joint_state, 10)
        self.create_subscription(String, "/qvgm/episode/status", self._on_status, LATCHED)
        self.clients_ = {n: self.create_client(Trigger, f"/qvgm/episode/{n}") for n in ("start", "stop", "discard")}
        self.clients_["label"] = self.create_client(SetBool, "/qvgm/episode/label")
        self.clients_["takeover"] = self.create_client(SetBool, "/qvgm/episode/takeover")
        self.create_timer(self.dt, self._tick)
        self._stop = threading.Event()
        self._kb_thread: threading.Thread | None = None
        if p["keyboard"]:
            self._kb_thread = threading.Thread(target=self._read_keys, args=(str(p["keyboard_device"]),),
                                               daemon=True, name="teleop-keyboard")
            self._kb_thread.start()

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ------------------------------------------------------------------ inputs
    def _on_joy(self, msg: Joy) -> None:
        self.joy = (time.monotonic(), list(msg.axes), list(msg.buttons))

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            idx = {n: i for i, n in enumerate(msg.name)}
            q = np.array([msg.position[idx[n]] for n in self.joint_names], dtype=float)
            if np.all(np.isfinite(q)):
                self.q = q
        except (KeyError, IndexError):
            self.get_logger().warning("joint_states without all teleop joints; ignored", throttle_duration_sec=5.0)

    def _on_status(self, msg: String) -> None:
        try:
            st = json.loads(msg.data)
            control, takeover = str(st["control"]), bool(st.get("takeover", False))
        except Exception as exc:
            self.get_logger().warning(f"bad episode status ignored: {exc}", throttle_duration_sec=5.0)
            return
        if control != self.control:
            self.jogger.target = None  # re-anchor on the measured state when control comes back
        self.control, self.takeover = control, takeover

    @property
    def has_control(self) -> bool:
        return self.control == "teleop"

    # ------------------------------------------------------------------ output
    def _publish(self, target: np.ndarray, duration: float | None = None) -> None:
        """One-point trajectory to `target` (robot units), reached `duration` s (default 1/rate_hz) from now."""
        msg = JointTrajectory()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.joint_names = list(self.joint_names)
        msg.points = [JointTrajectoryPoint(positions=[float(x) for x in target],
                                           time_from_start=seconds_to_duration(duration or self.dt))]
        self.pub.publish(msg)
        self.published += 1

    def _tick(self) -> None:
        try:
            self._step()
        except Exception as exc:  # never die in a timer; the controller holds the last target
            self.jogger.target = None
            self.get_logger().error(f"teleop tick failed: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)

    def _step(self) -> None:
        while self.keys:
            self._handle_key(self.keys.popleft())
        if not self.has_control or self.joy is None:
            return
        t, axes, buttons = self.joy
        v = self.mapping.velocity(axes, buttons) if time.monotonic() - t <= self.joy_timeout else None
        if v is None:  # deadman released or joystick silent: stop commanding, the controller holds
            self.jogger.target = None
            return
        if self.jogger.target is None:
            if self.q is None:
                self.get_logger().warning("no /joint_states yet: cannot jog", throttle_duration_sec=5.0)
                return
            self.jogger.anchor(self.q)
        self._publish(self.jogger.step(v, self.dt))

    # ------------------------------------------------------------------ keyboard
    def _read_keys(self, device: str) -> None:
        fd = os.open(device, os.O_RDONLY | os.O_NOCTTY) if device else 0
        saved = None
        try:
            if os.isatty(fd):
                import termios
                import tty

                saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
            while not self._stop.is_set():
                r, _, _ = select.select([fd], [], [], 0.1)
                if not r:
                    continue
                data = os.read(fd, 64)
                if not data:
                    return
                self.keys.extend(data.decode("utf-8", "ignore"))
        except OSError as exc:
            self.get_logger().error(f"keyboard input closed: {exc}")
        finally:
            if saved is not None:
                import termios

                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            if device:
                os.close(fd)

    def _handle_key(self, ch: str) -> None:
        parsed = parse_key(ch)
        if parsed is None:
            return
        cmd, joint = parsed
        if cmd == "select":
            if joint is not None and joint < len(self.joint_names):
                self.selected = joint
                self.get_logger().info(f"jog joint {self.joint_names[joint]}")
        elif cmd in ("jog+", "jog-"):
            if not self.has_control:
                self.get_logger().warning(f"teleop has no control (control={self.control}); jog ignored")
                return
            if self.jogger.target is None:
                if self.q is None:
                    self.get_logger().warning("no /joint_states yet: cannot jog")
                    return
                self.jogger.anchor(self.q)
            j = self.selected
            step = self.key_step * (0.1 if j == len(self.joint_names) - 1 else 1.0)
            target = self.jogger.target.copy()
            target[j] = np.clip(target[j] + (step if cmd == "jog+" else -step), self.jogger.lower[j],
                                self.jogger.upper[j])
            # one key = one discrete step, executed no faster than max_velocity
            duration = max(self.dt, abs(target[j] - self.jogger.target[j]) / self.jogger.max_velocity[j])
            self.jogger.target = target
            self._publish(target, duration)
        elif cmd == "takeover":
            self._call("takeover", not self.takeover)
        elif cmd in EPISODE_KEYS:
            self._call(*EPISODE_KEYS[cmd])

    def _call(self, service: str, data: bool | None) -> None:
        client = self.clients_[service]
        if not client.service_is_ready():
            self.get_logger().warning(f"/qvgm/episode/{service} not available")
            return
        req = Trigger.Request() if data is None else SetBool.Request(data=data)
        fut = client.call_async(req)

        def done(f: Any, name: str = service) -> None:
            try:
                res = f.result()
                self.last_response = {"service": name, "success": res.success, "message": res.message}
                self.get_logger().info(f"{name}: {'ok' if res.success else 'refused'}: {res.message}")
            except Exception as exc:
                self.get_logger().error(f"{name} failed: {exc}")
        fut.add_done_callback(done)

    def destroy_node(self) -> None:
        self._stop.set()
        if self._kb_thread is not None:
            self._kb_thread.join(1.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    spin_main(TeleopNode, args)


if __name__ == "__main__":
    main()

"""policy_node: observation dict from ROS topics -> PolicyBackend -> whole chunk as JointTrajectory.

A timer polls at `poll_hz`; a chunk goes out whenever the robot clock (the joint-state stamp) has advanced by
1/control_hz since the last chunk, so the policy keeps pace with a sim running slower or faster than real time.
Each chunk assembles {images, state, prompt, stamp} (qvgm/policy/interface.py)
from the latest /joint_states, camera images and /qvgm/task. Each stream has a max age (measured on this node's
clock at receipt); if any is stale or missing no chunk is published and the robot keeps executing/holding its
last trajectory. The chunk goes out with header.stamp = the observation's (joint state) stamp and
time_from_start = k * chunk_dt, k = 0..H-1. Backends are chosen by name (qvgm_policy_node/backends.py):
`expert` (sim only, needs /qvgm/sim/objects), `hold`, `flow` (a learned FlowPolicy checkpoint).

The learned (`flow`) backend runs asynchronously (qvgm/chunking.py): inference runs on a worker thread while the
current chunk executes and starts when `async_start_fraction` of the chunk is left (robot clock); a chunk coming
back late is trimmed by the elapsed time (points whose step already passed are dropped; the stamp stays the
observation time, the kept points keep time_from_start = k * chunk_dt) and dropped whole if nothing is left;
its first `blend_steps` points are cross-faded from the previous chunk; the joint jump at the boundary is
measured with and without the blend. The outgoing chunk goes through qvgm.safety (limits, workspace box,
max step per chunk_dt from the previous setpoint) and carries finite-difference velocities (cubic
interpolation). With `checkpoint_store` the node serves the store's current version and hot-reloads new ones
(backends.StoreFlowBackend, qvgm.reload.HotReloader); the swap happens only at a chunk boundary (no inference
in flight), services ~/reload and ~/rollback (std_srvs/Trigger).
`boundary_mode`: `blend` (default) = cross-fade only; `inpaint` = real-time-chunking-style conditioning: the next
inference receives the committed prefix (the published chunk sampled at the new chunk's point times, the first
`inpaint_steps` points, robot units) and inpaints it while denoising (qvgm.policy.prefix.sample_with_prefix;
`inpaint_weights` `hard`, or `exp` = also a decaying soft pull toward the rest of the published chunk);
blending still applies after.

All backends: /qvgm/estop (std_msgs/Bool) true -> one hold trajectory at the measured position, then nothing
until false; /qvgm/policy/enable (std_msgs/Bool, transient-local) false -> muted, nothing published (in-flight
results discarded); /qvgm/policy/version (std_msgs/String, transient-local) = version of the latest chunk,
published on change. For the learned backend a stale or frozen joint state (stamp not advancing for
max_state_age) also publishes one hold trajectory. Holds have header.stamp 0 (= "now" for JTC and the sim)
and a single point at time_from_start 0.
Receipt times, max ages and the robot-clock estimate are measured on time.monotonic(), or with use_sim_time=True on
the node clock (= /clock, sim seconds): a sim running faster or slower than real time, or pausing, is then never
"stale" (and a sim that stops publishing /clock freezes this node's notion of age too: the sim is the watchdog).
"""

from __future__ import annotations

import time
import traceback
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from visualization_msgs.msg import MarkerArray

from qvgm.chunking import (
    AsyncSchedule,
    Chunk,
    blend_chunks,
    boundary_jump,
    finite_difference_velocities,
    percentile,
    trim_late,
)
from qvgm.policy.interface import ActionChunk, Observation
from qvgm.safety import SafetyLayer, SafetyLimits, box_workspace
from qvgm_policy_node import topics
from qvgm_policy_node.backends import BackendConfig, NoPolicyError, backend_entry
from qvgm_policy_node.params import declare, spin_main
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL, from_time_msg, to_time_msg

DEFAULTS: dict[str, Any] = {
    "backend": "expert", "control_hz": 10.0, "poll_hz": 50.0, "chunk_dt": 0.1, "horizon": 10,
    "cameras": ["front", "wrist"],
    "joint_names": ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"],
    "max_state_age": 0.25, "max_image_age": 0.5, "max_objects_age": 0.5, "expert_noise": 0.0,
    "expert_seed": -1, "checkpoint": "", "device": "cpu", "cuda_graphs": True, "num_steps": 10, "seed": -1,
    "noise_scale": 1.0,
    "checkpoint_store": "",
    "privileged": False, "reload_budget_s": 0.5, "reload_watch": "auto", "reload_poll_s": 0.5,
    "reload_nice": 0, "reload_yield_s": 0.002, "reload_pace_s": 0.25,
    "async_start_fraction": 0.5, "blend_steps": 3, "boundary_mode": "blend", "inpaint_steps": 3,
    "inpaint_weights": "hard", "late_margin": 0.0, "velocity_scale": 1.0, "urdf": "",
    "workspace_min": [-0.9, -0.9, 0.0], "workspace_max": [0.9, 0.9, 1.2], "diagnostics_hz": 1.0,
}
ESTOP_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def image_to_array(msg: Image) -> np.ndarray:
    """sensor_msgs/Image rgb8 -> uint8[H, W, 3]; ValueError for any other encoding or a bad size."""
    if msg.encoding != "rgb8":
        raise ValueError(f"unsupported encoding {msg.encoding!r} (expected rgb8)")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < 3 * w or len(msg.data) != step * h:
        raise ValueError(f"image data size {len(msg.data)} != step {step} * height {h}")
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(h, step)
    return buf[:, : 3 * w].reshape(h, w, 3).copy()


class PolicyNode(Node):
    """Publishes action chunks from a pluggable backend. Parameters: see DEFAULTS / config/tabletop_sim.yaml."""

    def __init__(self, node_name: str = "policy_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = declare(self, DEFAULTS)
        self.joint_names: list[str] = list(p["joint_names"])
        self.cameras: list[str] = list(p["cameras"])
        self.max_age = {"state": float(p["max_state_age"]), "image": float(p["max_image_age"]),
                        "objects": float(p["max_objects_age"])}
        entry = backend_entry(str(p["backend"]))
        options = {"noise": float(p["expert_noise"]), "expert_seed": int(p["expert_seed"]),
                   "checkpoint": str(p["checkpoint"]), "device": str(p["device"]),
                   "cuda_graphs": bool(p["cuda_graphs"]), "num_steps": int(p["num_steps"]),
                   "noise_scale": float(p["noise_scale"]),
                   "seed": int(p["seed"]), "checkpoint_store": str(p["checkpoint_store"]),
                   "cameras": list(self.cameras), "privileged": bool(p["privileged"]),
                   "reload_budget_s": float(p["reload_budget_s"]), "reload_watch": str(p["reload_watch"]),
                   "reload_poll_s": float(p["reload_poll_s"]), "reload_nice": int(p["reload_nice"]),
                   "reload_yield_s": float(p["reload_yield_s"]), "reload_pace_s": float(p["reload_pace_s"])}
        self.chunk_dt = float(p["chunk_dt"])
        self.backend = entry.factory(BackendConfig(self.joint_names, int(p["horizon"]), self.chunk_dt, options))
        self.needs_objects = bool(getattr(self.backend, "needs_objects", entry.needs_objects))
        # learned backends run asynchronously through the safety layer; expert/hold are trusted and synchronous
        self.learned = self.backend.name == "flow"
        self.skipped: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # dropped/late chunks, missed ticks, holds, swaps...
        self.published = 0
        self.last_chunk: ActionChunk | None = None
        self.published_versions: list[str] = []  # version of every published chunk (tests, benches)
        self.publish_log: deque[tuple[float, float, str]] = deque(maxlen=10_000)  # (wall, obs stamp, version)

        # latest values: (value, ros stamp s, receipt time on self._now())
        self._sim_time = bool(self.get_parameter("use_sim_time").value)
        self._state: tuple[np.ndarray, float, float] | None = None
        self._state_changed = self._now()  # receipt time of the last joint state whose stamp advanced
        self._images: dict[str, tuple[np.ndarray, float, float]] = {}
        self._objects: tuple[dict[str, np.ndarray], str, float] | None = None
        self._prompt: str | None = None
        self.estop = False
        self.enabled = True
        self.version: str | None = None  # version of the latest published chunk

        # learned path state
        self.schedule = AsyncSchedule(float(p["async_start_fraction"]))
        self.blend_steps = int(p["blend_steps"])
        self.boundary_mode = str(p["boundary_mode"])
        self.inpaint_steps = int(p["inpaint_steps"])
        self.inpaint_weights = str(p["inpaint_weights"])
        if self.boundary_mode not in ("blend", "inpaint"):
            raise ValueError(f"boundary_mode must be 'blend' or 'inpaint', got {self.boundary_mode!r}")
        if self.inpaint_weights not in ("hard", "exp") or self.inpaint_steps < 0:
            raise ValueError(f"inpaint_weights must be 'hard' or 'exp' (got {self.inpaint_weights!r}) and "
                             f"inpaint_steps >= 0 (got {self.inpaint_steps})")
        self.late_margin = float(p["late_margin"])
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-infer")
        self._future: Future | None = None
        self._future_epoch = 0
        self._epoch = 0  # bumps on task / estop / mute: results of older inferences are discarded
        self._last_start_stamp: float | None = None
        self._prev: Chunk | None = None  # the last published (blended, filtered) chunk
        self._last_pub_stamp: float | None = None
        self._held = False
        self.latencies: deque[float] = deque(maxlen=500)  # inference wall s
        self.chunk_ages: deque[float] = deque(maxlen=500)  # robot s between observation and publish
        self.jumps_raw: deque[float] = deque(maxlen=500)  # boundary jump without blending (rad / m)
        self.jumps_blended: deque[float] = deque(maxlen=500)  # boundary jump of the published chunk
        self.safety: SafetyLayer | None = None
        if self.learned:
            self.safety = self._make_safety(p)
            if hasattr(self.backend, "observation_source"):
                self.backend.observation_source = self.latest_observation
        self.add_on_set_parameters_callback(self._on_set_parameters)  # after declare: only run-time changes
        # the worker thread triggers this when a chunk is ready, so it goes out without waiting for the poll timer
        self._chunk_ready = self.create_guard_condition(self._tick)

        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joint_state, 10)
        for cam in self.cameras:
            self.create_subscription(Image, topics.camera_image(cam),
                                     lambda msg, cam=cam: self._on_image(cam, msg), qos_profile_sensor_data)
        self.create_subscription(String, topics.TASK, self._on_task, TRANSIENT_LOCAL)
        self.create_subscription(Bool, topics.ESTOP, self._on_estop, ESTOP_QOS)
        self.create_subscription(Bool, topics.POLICY_ENABLE, self._on_enable, TRANSIENT_LOCAL)
        if self.needs_objects:
            self.create_subscription(MarkerArray, topics.OBJECTS, self._on_objects, 10)
        self.pub_traj = self.create_publisher(JointTrajectory, topics.TRAJECTORY, 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.pub_version = self.create_publisher(String, topics.POLICY_VERSION, TRANSIENT_LOCAL)
        self.create_service(Trigger, "~/reload", self._srv_reload)
        self.create_service(Trigger, "~/rollback", self._srv_rollback)
        self.control_period = 1.0 / float(p["control_hz"])
        self._last_chunk_stamp = -np.inf
        self.create_timer(1.0 / float(p["poll_hz"]), self._tick)
        self.create_timer(1.0 / float(p["diagnostics_hz"]), self._publish_diagnostics)

    def _make_safety(self, p: dict[str, Any]) -> SafetyLayer:
        """SafetyLayer from the URDF (joint + velocity limits) and the tool0 workspace box (FK, m)."""
        from qvgm.sim import urdf_path

        urdf = str(p["urdf"]) or str(urdf_path())
        workspace = None
        if len(p["workspace_min"]) or len(p["workspace_max"]):
            from qvgm.sim.ik import ArmIK

            ik = ArmIK(urdf)  # used on the executor thread only
            workspace = box_workspace(lambda q: ik.fk(np.asarray(q[:6]))[0], p["workspace_min"], p["workspace_max"])
        return SafetyLayer(SafetyLimits.from_urdf(urdf, self.joint_names), velocity_scale=float(p["velocity_scale"]),
                           max_obs_age=float(p["max_state_age"]), workspace=workspace)

    def destroy_node(self) -> None:
        pool = getattr(self, "_pool", None)  # absent when __init__ failed
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(getattr(self, "backend", None), "close", None)
        if close is not None:
            close()
        super().destroy_node()

    # -- inputs (never raise) ----------------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState) -> None:
        try:
            index = {n: i for i, n in enumerate(msg.name)}
            q = np.array([msg.position[index[j]] for j in self.joint_names], dtype=np.float64)
            if not np.all(np.isfinite(q)):
                raise ValueError("non-finite joint position")
        except (KeyError, IndexError, ValueError) as exc:
            self.skipped["bad_joint_state"] += 1
            self.get_logger().warning(f"ignoring joint state: {exc!r}", throttle_duration_sec=5.0)
            return
        stamp, now = from_time_msg(msg.header.stamp), self._now()
        if self._state is None or stamp != self._state[1]:
            self._state_changed = now
        self._state = (q, stamp, now)

    def _on_image(self, cam: str, msg: Image) -> None:
        try:
            img = image_to_array(msg)
        except ValueError as exc:
            self.skipped["bad_image"] += 1
            self.get_logger().warning(f"ignoring image from {cam}: {exc}", throttle_duration_sec=5.0)
            return
        self._images[cam] = (img, from_time_msg(msg.header.stamp), self._now())

    def _on_task(self, msg: String) -> None:
        self._prompt = msg.data
        self._last_chunk_stamp = -np.inf
        self._restart_chunking()
        self._state = None  # a new episode: wait for post-reset observations
        self._objects = None
        self.backend.reset(msg.data)

    def _restart_chunking(self) -> None:
        """Forget the chunk history (new episode, estop, mute): in-flight results get discarded."""
        self._epoch += 1
        self._last_start_stamp = None
        self._prev = None
        self._last_pub_stamp = None

    def _on_estop(self, msg: Bool) -> None:
        if bool(msg.data) and not self.estop:
            self.estop = True
            self._restart_chunking()
            self.stats["estops"] += 1
            self.get_logger().warning("estop: holding position until /qvgm/estop is cleared")
            self._publish_hold("estop")
        elif not bool(msg.data) and self.estop:
            self.estop = False
            self._last_chunk_stamp = -np.inf
            self.get_logger().info("estop cleared: policy resumes")

    def _on_enable(self, msg: Bool) -> None:
        enabled = bool(msg.data)
        if enabled != self.enabled:
            self.enabled = enabled
            self._restart_chunking()
            self._last_chunk_stamp = -np.inf
            self.get_logger().info("policy " + ("enabled" if enabled else "muted (publishes nothing)"))

    def _publish_hold(self, reason: str) -> None:
        """One single-point trajectory at the measured position, stamp 0 (= now): the robot holds there."""
        if self._state is None:
            return
        msg = JointTrajectory()
        msg.joint_names = list(self.joint_names)
        msg.points.append(JointTrajectoryPoint(positions=[float(x) for x in self._state[0]],
                                               velocities=[0.0] * len(self.joint_names),
                                               time_from_start=Duration(sec=0, nanosec=0)))
        self.pub_traj.publish(msg)
        self.stats[f"holds.{reason}"] += 1

    def _srv_reload(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        return self._reloader_service(response, "reload", lambda r: r.request_reload())

    def _srv_rollback(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        return self._reloader_service(response, "roll back", lambda r: r.request_rollback())

    def _reloader_service(self, response: Trigger.Response, what: str, call: Any) -> Trigger.Response:
        """~/reload and ~/rollback: delegate to the store backend's HotReloader (non-blocking)."""
        reloader = getattr(self.backend, "reloader", None)
        if reloader is None:
            response.success, response.message = False, f"no checkpoint_store configured: nothing to {what}"
        else:
            response.success, response.message = call(reloader)
        self.get_logger().info(f"~/{what.replace(' ', '')}: {response.message}")
        return response

    def _on_objects(self, msg: MarkerArray) -> None:
        objects: dict[str, np.ndarray] = {}
        task = ""
        for m in msg.markers:
            if m.ns == "task":
                task = m.text
                continue
            p, o = m.pose.position, m.pose.orientation
            objects[m.ns] = np.array([p.x, p.y, p.z, o.w, o.x, o.y, o.z], dtype=np.float64)
        self._objects = (objects, task, self._now())

    # -- control tick ------------------------------------------------------------------------------------
    def observation(self) -> tuple[Observation | None, str]:
        """The current observation dict, or (None, reason) when a stream is missing or stale."""
        now = self._now()
        if self._prompt is None:
            return None, "no_prompt"
        if self._state is None:
            return None, "no_state"
        q, stamp, received = self._state
        if now - received > self.max_age["state"]:
            return None, "stale_state"
        if now - self._state_changed > self.max_age["state"]:
            return None, "frozen_state"
        images = {}
        for cam in self.cameras:
            if cam not in self._images:
                return None, f"no_image.{cam}"
            img, _, received = self._images[cam]
            if now - received > self.max_age["image"]:
                return None, f"stale_image.{cam}"
            images[cam] = img
        obs: Observation = {"images": images, "state": q.astype(np.float32), "prompt": self._prompt,
                            "stamp": stamp}
        if self.needs_objects:
            if self._objects is None:
                return None, "no_objects"
            objects, task, received = self._objects
            if now - received > self.max_age["objects"]:
                return None, "stale_objects"
            obs["objects"], obs["task"] = objects, task
            # marker order = the sim's role order, the same layout as TabletopEnv's obs["privileged"]
            obs["privileged"] = np.concatenate(list(objects.values())).astype(np.float32) \
                if objects else np.zeros(0, np.float32)
        return obs, "ok"

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        """Run-time parameter changes: `noise_scale` (flow backend) applies from the next inference, e.g.
        `ros2 param set /policy_node noise_scale 0.0`; a bad value is refused with the reason. Other parameters
        are read once at start-up."""
        for prm in params:
            if prm.name != "noise_scale":
                continue
            setter = getattr(self.backend, "set_noise_scale", None)
            if setter is None:
                return SetParametersResult(successful=False,
                                           reason=f"the {self.backend.name} backend samples no noise")
            try:
                setter(prm.value)
            except (TypeError, ValueError) as e:
                return SetParametersResult(successful=False, reason=str(e))
            self.get_logger().info(f"noise_scale -> {prm.value}")
        return SetParametersResult(successful=True)

    def latest_observation(self) -> Observation | None:
        """The current observation or None (any thread; used for the dry run of a new checkpoint)."""
        try:
            return self.observation()[0]
        except Exception:
            return None

    def robot_now(self) -> float | None:
        """Estimated robot-clock time (s): the latest joint-state stamp plus the wall time since its receipt."""
        if self._state is None:
            return None
        return self._state[1] + (self._now() - self._state[2])

    def _now(self) -> float:
        """Receipt/age clock (s): time.monotonic(), or the node clock (sim time) when use_sim_time is set."""
        if self._sim_time:
            return self.get_clock().now().nanoseconds * 1e-9
        return time.monotonic()

    def _tick(self) -> None:
        if self.learned:
            try:
                self._tick_learned()
            except Exception:  # never die in the control loop
                self.skipped["internal_error"] += 1
                self.get_logger().error("policy tick failed:\n" + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        if self.estop or not self.enabled:
            return
        obs, reason = self.observation()
        if obs is None:
            self.skipped[reason] += 1
            return
        if obs["stamp"] < self._last_chunk_stamp + self.control_period - 1e-3:
            return  # not yet time for the next chunk on the robot clock
        try:
            chunk = self.backend.infer(obs)
            msg = chunk_to_trajectory(chunk)
        except Exception:
            self.skipped["backend_error"] += 1
            self.get_logger().error("backend failed:\n" + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        self.pub_traj.publish(msg)
        self._last_chunk_stamp = float(obs["stamp"])
        self._note_published(chunk)

    def _note_published(self, chunk: ActionChunk) -> None:
        self.published += 1
        self.last_chunk = chunk
        self.published_versions.append(chunk.version)
        if len(self.published_versions) > 200_000:  # bounded on long runs
            del self.published_versions[:100_000]
        self.publish_log.append((time.monotonic(), float(chunk.stamp), chunk.version))
        if chunk.version != self.version:
            self.version = chunk.version
            self.pub_version.publish(String(data=chunk.version))

    # -- learned backend: async inference, trimming, blending, safety -----------------------------------
    def _tick_learned(self) -> None:
        if self._future is not None and self._future.done():
            future, epoch, self._future = self._future, self._future_epoch, None
            self._finish(future, epoch)
        if self.estop or not self.enabled:
            return
        obs, reason = self.observation()
        if obs is None:
            self.skipped[reason] += 1
            if reason in ("stale_state", "frozen_state") and self._prev is not None and not self._held:
                self.get_logger().warning(f"{reason}: holding position")
                self._publish_hold(reason)
                self._held = True
                self._restart_chunking()
            return
        if self._future is not None:
            return  # inference in flight: no swap, no new start
        swap = getattr(self.backend, "poll_swap", None)
        if swap is not None:  # chunk boundary: nothing in flight
            new_version = swap()
            if new_version is not None:
                self.stats["swaps"] += 1
                self.get_logger().info(f"serving checkpoint {new_version}")
        if not getattr(self.backend, "ready", True):
            self.skipped["no_policy"] += 1
            return
        serving = getattr(self.backend, "current", self.backend)  # StoreFlowBackend wraps a FlowPolicyBackend
        horizon = int(serving.policy.horizon)
        if not self.schedule.due(self._last_start_stamp, float(obs["stamp"]), horizon, self.chunk_dt):
            return
        self._last_start_stamp = float(obs["stamp"])
        self._future_epoch = self._epoch
        kwargs = self.committed_prefix(float(obs["stamp"]), horizon) if self.boundary_mode == "inpaint" else {}
        self._future = self._pool.submit(self._infer_timed, self.backend, obs, kwargs)
        self._future.add_done_callback(lambda _f: self._chunk_ready.trigger())

    def committed_prefix(self, stamp: float, horizon: int) -> dict[str, Any]:
        """Inpainting keywords for the backend's infer: the published chunk sampled at the new chunk's point times
        stamp + k * chunk_dt (s, robot clock) while they lie inside it, as prefix float64[P, n] (rad / m);
        hard: P <= inpaint_steps; exp: P <= horizon, prefix_len = min(inpaint_steps, P). {} without a chunk."""
        prev = self._prev
        if prev is None or self.inpaint_steps == 0:
            return {}
        times = stamp + np.arange(horizon) * self.chunk_dt
        inside = int(np.sum(times <= prev.end_time + 1e-9))
        p = min(inside, self.inpaint_steps) if self.inpaint_weights == "hard" else inside
        if p == 0:
            return {}
        prefix = np.stack([prev.sample(float(t)) for t in times[:p]])
        return {"prefix": prefix, "prefix_len": min(p, self.inpaint_steps), "weights": self.inpaint_weights}

    @staticmethod
    def _infer_timed(backend: Any, obs: Observation,
                     kwargs: dict[str, Any] | None = None) -> tuple[ActionChunk, float, np.ndarray]:
        t0 = time.perf_counter()
        chunk = backend.infer(obs, **(kwargs or {}))
        return chunk, time.perf_counter() - t0, np.asarray(obs["state"], dtype=np.float64)

    def _finish(self, future: Future, epoch: int) -> None:
        """A chunk came back from the worker: trim, blend, filter, publish (or drop it with a reason)."""
        try:
            chunk, latency, measured = future.result()
        except NoPolicyError:
            self.skipped["no_policy"] += 1
            return
        except Exception:
            self.skipped["backend_error"] += 1
            self.get_logger().error("backend failed:\n" + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        self.latencies.append(latency)
        if epoch != self._epoch or self.estop or not self.enabled:
            self.stats["discarded_chunks"] += 1  # a task change / estop / mute happened meanwhile
            return
        now = self.robot_now()
        if now is None:
            return
        raw = Chunk(np.asarray(chunk.positions, dtype=np.float64), float(chunk.stamp), float(chunk.dt))
        trimmed, n_late = trim_late(raw, now, self.late_margin)
        if trimmed is None:
            self.stats["dropped_chunks"] += 1
            self.get_logger().warning(f"chunk {latency * 1e3:.0f} ms late beyond its horizon: dropped",
                                      throttle_duration_sec=5.0)
            return
        if n_late:
            self.stats["late_chunks"] += 1
            self.stats["trimmed_points"] += n_late
        prev = self._prev
        blended = blend_chunks(prev, trimmed, self.blend_steps)
        if prev is not None:
            self.jumps_raw.append(boundary_jump(prev, trimmed))
        current = prev.sample(float(blended.times()[0])) if prev is not None else measured
        safe, intervened = self._filter(blended, current)
        if prev is not None:
            self.jumps_blended.append(boundary_jump(prev, safe))
        if intervened:
            self.stats["safety_interventions"] += 1
        assert self.safety is not None
        vel = finite_difference_velocities(safe.positions, safe.dt,
                                           self.safety.limits.velocity * self.safety.velocity_scale * 0.999)
        msg = JointTrajectory()
        msg.header.stamp = to_time_msg(safe.stamp)
        msg.joint_names = list(chunk.joint_names)
        for k, (row, v) in enumerate(zip(safe.positions, vel, strict=True)):
            msg.points.append(JointTrajectoryPoint(positions=[float(x) for x in row], velocities=[float(x) for x in v],
                                                   time_from_start=_duration((safe.first + k) * safe.dt)))
        self.pub_traj.publish(msg)
        if self._last_pub_stamp is not None:
            gap = safe.stamp - self._last_pub_stamp
            interval = self.schedule.interval(len(raw.positions), raw.dt)
            if gap > interval + raw.dt + 1e-6:  # the chunk that was due one control step ago did not come
                self.stats["missed_ticks"] += int(np.floor((gap - interval) / raw.dt + 1e-9))
        self._last_pub_stamp = safe.stamp
        self._prev = safe
        self._held = False
        self.chunk_ages.append(now - safe.stamp)
        self._note_published(ActionChunk(positions=safe.positions, dt=safe.dt, joint_names=list(chunk.joint_names),
                                         stamp=safe.stamp, version=chunk.version))
        boundary = getattr(self.backend, "note_boundary", None)
        if boundary is not None:  # a hot-reloading backend runs its next loader stage in the gap that follows
            boundary()

    def _filter(self, chunk: Chunk, current: np.ndarray) -> tuple[Chunk, bool]:
        """Every point through the safety layer, starting at `current` [n]: finite positions are clamped into the
        URDF limits (counted `clamped`), then SafetyLayer.filter rejects non-finite / out-of-workspace targets
        (the point holds the previous command) and limits the step per chunk_dt to velocity_scale * v_max * dt
        (counted `rate_limited`). Returns (filtered chunk, whether anything changed)."""
        assert self.safety is not None
        out = np.empty_like(chunk.positions)
        cmd = np.asarray(current, dtype=np.float64)
        changed = False
        for k, raw in enumerate(chunk.positions):
            target = raw
            if np.all(np.isfinite(raw)):
                target = self.safety.limits.clamp(raw)
                if np.any(target != raw):
                    self.safety.count("clamped")
                    changed = True
            verdict = self.safety.filter(cmd, target, chunk.dt, obs_age=0.0)
            if not verdict.ok:
                changed = True
            elif np.max(np.abs(verdict.command - target)) > 1e-9:
                self.safety.count("rate_limited")
                changed = True
            cmd = verdict.command
            out[k] = cmd
        return Chunk(out, chunk.stamp, chunk.dt, chunk.first), changed

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus()
        status.name, status.hardware_id = "qvgm/policy_node", str(self.backend.name)
        status.level = DiagnosticStatus.OK
        status.message = f"{self.published} chunks published"
        values: dict[str, Any] = {"published_chunks": self.published, "backend": self.backend.name,
                                  "version": self.version or "", "estop": self.estop, "enabled": self.enabled}
        values.update({f"skipped.{k}": v for k, v in sorted(self.skipped.items())})
        if self.learned:
            for name, arr in (("inference_latency_s", self.latencies), ("chunk_age_s", self.chunk_ages),
                              ("boundary_jump_raw", self.jumps_raw), ("boundary_jump_blended", self.jumps_blended)):
                values[f"{name}.p50"] = f"{percentile(arr, 50):.4f}"
                values[f"{name}.p95"] = f"{percentile(arr, 95):.4f}"
            for key in ("dropped_chunks", "late_chunks", "trimmed_points", "missed_ticks", "discarded_chunks",
                        "safety_interventions", "swaps"):
                values[key] = self.stats[key]
            if self.safety is not None:
                values.update({f"safety.{k}": v for k, v in sorted(self.safety.counters.items())})
            if hasattr(self.backend, "noise_scale"):  # x_1 = noise_scale * eps of the served chunks
                values["noise_scale"] = f"{self.backend.noise_scale:g}"
        values.update({f"stats.{k}": v for k, v in sorted(self.stats.items()) if k.startswith(("holds", "estops"))})
        diag = getattr(self.backend, "diagnostic_values", None)
        if diag is not None:
            values.update(diag())
            if values.get("reload.last_error"):
                status.level = DiagnosticStatus.WARN
                status.message += f"; reload: {values['reload.last_error']}"
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self.pub_diag.publish(arr)


def chunk_to_trajectory(chunk: ActionChunk) -> JointTrajectory:
    """ActionChunk -> JointTrajectory: header.stamp = chunk.stamp, point k at time_from_start = k * dt."""
    pos = np.asarray(chunk.positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != len(chunk.joint_names) or not np.all(np.isfinite(pos)):
        raise ValueError(f"bad chunk positions shape {pos.shape} for {len(chunk.joint_names)} joints")
    msg = JointTrajectory()
    msg.header.stamp = to_time_msg(chunk.stamp)
    msg.joint_names = list(chunk.joint_names)
    for k, row in enumerate(pos):
        msg.points.append(JointTrajectoryPoint(positions=[float(x) for x in row],
                                               time_from_start=_duration(k * chunk.dt)))
    return msg


def _duration(t: float) -> Duration:
    sec = int(t)
    return Duration(sec=sec, nanosec=min(int(round((t - sec) * 1e9)), 999_999_999))


def main(args: list[str] | None = None) -> None:
    spin_main(PolicyNode, args)


if __name__ == "__main__":
    main()

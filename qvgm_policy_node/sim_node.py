"""sim_node: the MuJoCo tabletop (qvgm.sim.TabletopEnv) as a ROS 2 robot.

A timer steps physics in real time (sim time advances with wall time times `real_time_factor`), executes
JointTrajectory chunks with JTC semantics (qvgm.trajectory) through the shared safety layer (qvgm.safety), and
publishes /joint_states, camera images + camera_info (sensor-data QoS), success, prompt, privileged object
poses and /diagnostics. ROS stamps are sim time mapped to ROS time: stamp = epoch + env.time, with the epoch
fixed at start-up/reset so that stamps track the node clock. With `publish_clock` the node is the graph's clock
source instead: it publishes the robot time (epoch + env.time, monotonic across resets) on /clock
(rosgraph_msgs/Clock) after every tick, so nodes with use_sim_time=True time everything (timers, timeouts,
staleness, episode windows) in sim seconds and any real_time_factor keeps stamps and node clocks consistent;
its own timers then run on the steady clock (they drive the sim, they cannot wait for it). A trajectory's
header.stamp is read back through the same map (zero stamp = now); chunks stamped before the last reset are
dropped. Cameras are captured at the tick's sim time and rendered on a worker thread (RenderWorker), so slow
(software) rendering lowers the camera rate instead of delaying control ticks. The node never dies on a message:
bad input is rejected, logged, counted in /diagnostics, and the arm holds.
`lockstep_s` > 0 (sim-time graphs, e.g. the learning loop): the sim never runs more than lockstep_s sim seconds past
the stamp of the latest multi-point trajectory; it waits (sim time pauses, counted as `lockstep_waits` ticks) for
the next chunk instead, so a controller slowed by a busy CPU costs wall time, not control quality. It waits at most
`lockstep_timeout_s` wall seconds after the last chunk (a muted or stopped controller), then runs free until the
next chunk; a reset also releases it.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections import Counter
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock as ClockMsg
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory
from visualization_msgs.msg import Marker, MarkerArray

from qvgm.safety import SafetyLayer, SafetyLimits, box_workspace
from qvgm.trajectory import TrajectoryExecutor, TrajectoryRejected, validate_trajectory
from qvgm_policy_node import topics
from qvgm_policy_node.params import declare, spin_main

TRANSIENT_LOCAL = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)

DEFAULTS: dict[str, Any] = {
    "task": "pick_place", "seed": 0, "cameras": ["front", "wrist"], "image_width": 224, "image_height": 224,
    "control_hz": 10.0, "physics_hz": 500.0, "joint_state_hz": 50.0, "camera_hz": 10.0,
    "real_time_factor": 1.0, "velocity_scale": 1.0, "urdf": "", "diagnostics_hz": 1.0, "render_thread": True,
    "workspace_min": [-0.9, -0.9, 0.0], "workspace_max": [0.9, 0.9, 1.2], "publish_clock": False,
    "lockstep_s": 0.0, "lockstep_timeout_s": 1.0,
}
CLOCK_TOPIC = "/clock"
CLOCK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)  # what rclpy's TimeSource subscribes with


def to_time_msg(seconds: float) -> TimeMsg:
    sec = int(np.floor(seconds))
    return TimeMsg(sec=sec, nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def from_time_msg(stamp: TimeMsg) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class SimNode(Node):
    """The simulated robot. Parameters: see DEFAULTS / config/tabletop_sim.yaml."""

    def __init__(self, node_name: str = "sim_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        from qvgm.sim import TabletopEnv, urdf_path  # MuJoCo import kept out of module import time

        p = declare(self, DEFAULTS)
        self.cameras: list[str] = list(p["cameras"])
        self.rtf = float(p["real_time_factor"])
        if not self.rtf > 0:
            raise ValueError("real_time_factor must be > 0")
        self.env = TabletopEnv(task=p["task"], cameras=tuple(self.cameras),
                               image_size=(int(p["image_height"]), int(p["image_width"])),
                               control_hz=float(p["control_hz"]), physics_hz=float(p["physics_hz"]),
                               max_episode_steps=None, render=bool(self.cameras))
        self.joint_names = list(self.env.joint_names)
        urdf = p["urdf"] or str(urdf_path())
        workspace = None
        if len(p["workspace_min"]) or len(p["workspace_max"]):  # tool0 box in base_link, m
            from qvgm.sim.ik import ArmIK

            ik = ArmIK(urdf)  # own kinematics model: used on the executor thread only
            workspace = box_workspace(lambda q: ik.fk(np.asarray(q[:6]))[0], p["workspace_min"], p["workspace_max"])
        self.safety = SafetyLayer(SafetyLimits.from_urdf(urdf, self.joint_names),
                                  velocity_scale=float(p["velocity_scale"]), workspace=workspace)
        self.traj = TrajectoryExecutor(len(self.joint_names))
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.ticks = 0
        self.tick_times: list[float] = []  # wall time (time.monotonic) of every control tick, for benches
        self.camera_period = 1.0 / float(p["camera_hz"])
        self.success = False
        self.publish_clock = bool(p["publish_clock"])
        self.pub_clock = self.create_publisher(ClockMsg, CLOCK_TOPIC, CLOCK_QOS) if self.publish_clock else None
        self._epoch = time.time()  # robot time of env.time 0 (s); with publish_clock: the /clock value at start
        self.lockstep_s = float(p["lockstep_s"])
        self.lockstep_timeout_s = float(p["lockstep_timeout_s"])
        if self.lockstep_s < 0 or not self.lockstep_timeout_s > 0:
            raise ValueError("lockstep_s must be >= 0 and lockstep_timeout_s > 0")
        self._state_stamp = -1.0  # env.time of the last published joint state
        self._lock_until: float | None = None  # sim time (env.time) the sim may not pass while waiting for a chunk
        self._lock_wall = 0.0  # time.monotonic() of the chunk that set it
        self.lockstep_waits = 0  # ticks at which the sim waited for the controller

        self.pub_js = self.create_publisher(JointState, topics.JOINT_STATES, 10)
        self.pub_img = {c: self.create_publisher(Image, topics.camera_image(c), qos_profile_sensor_data)
                        for c in self.cameras}
        self.pub_info = {c: self.create_publisher(CameraInfo, topics.camera_info(c), qos_profile_sensor_data)
                         for c in self.cameras}
        self.pub_success = self.create_publisher(Bool, topics.SUCCESS, 10)
        self.pub_task = self.create_publisher(String, topics.TASK, TRANSIENT_LOCAL)
        self.pub_objects = self.create_publisher(MarkerArray, topics.OBJECTS, 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.create_subscription(JointTrajectory, topics.TRAJECTORY, self._on_trajectory, 10)
        self.create_service(Trigger, "~/reset", self._on_reset)

        self._render_worker: RenderWorker | None = None
        if self.cameras and bool(p["render_thread"]):
            self._render_worker = RenderWorker(self.cameras, self.env.image_size, self._send_images,
                                               self.get_logger())
        self._reset_env(int(p["seed"]), str(p["task"]))
        # the clock source cannot time itself on /clock (nor on a sim-time node clock): steady wall timers then
        timer_clock = Clock(clock_type=ClockType.STEADY_TIME) if self.publish_clock or self._uses_sim_time() else None
        self.create_timer(1.0 / float(p["joint_state_hz"]), self._tick, clock=timer_clock)
        self.create_timer(1.0 / float(p["diagnostics_hz"]), self._publish_diagnostics, clock=timer_clock)

    # -- time ------------------------------------------------------------------------------------------------
    def _uses_sim_time(self) -> bool:
        return bool(self.get_parameter("use_sim_time").value)

    def _ros_now(self) -> float:
        """Now on the robot clock (s): the node clock, or with publish_clock the robot time itself."""
        if self.publish_clock:
            return self.sim_to_ros(float(self.env.time))
        return self.get_clock().now().nanoseconds * 1e-9

    def _publish_clock(self) -> None:
        if self.pub_clock is not None:
            msg = ClockMsg()
            msg.clock = to_time_msg(self.sim_to_ros(float(self.env.time)))
            self.pub_clock.publish(msg)

    def sim_to_ros(self, sim_t: float) -> float:
        return self._epoch + sim_t

    def _reset_env(self, seed: int, task: str) -> str:
        # with publish_clock the robot clock goes on from where it was (+ one physics step, so that every stamp
        # before the reset is strictly older than the reset); otherwise it is the node clock
        now = self._ros_now() + (float(self.env.physics_dt) if self.publish_clock else 0.0)
        self.env.reset(seed=seed, options={"task": task})
        q, _, _ = self.env.joint_state()
        self._cmd = np.asarray(q, dtype=np.float64).copy()
        self.traj.hold(self._cmd)
        self.env.set_joint_targets(self._cmd)
        self._reset_stamp = now
        self._epoch = now - float(self.env.time)
        self._wall0, self._sim0 = time.monotonic(), float(self.env.time)
        self._lock_until = None
        self._next_camera = float(self.env.time) + self.camera_period  # the reset publishes the frame at t
        self.success = False
        self._publish_clock()
        self.pub_success.publish(Bool(data=False))  # marks the reset in the success stream
        self.pub_task.publish(String(data=self.env.prompt))
        self._publish_state()
        self._publish_objects()
        self._publish_cameras()
        return self.env.prompt

    # -- callbacks -------------------------------------------------------------------------------------------
    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        seed = int(self.get_parameter("seed").value)
        task = str(self.get_parameter("task").value)
        try:
            prompt = self._reset_env(seed, task)
        except Exception as exc:  # bad task name etc.: report, keep the node and the scene alive
            self.get_logger().error(f"reset(task={task!r}, seed={seed}) failed: {exc}")
            response.success, response.message = False, f"reset failed: {exc}"
            return response
        self.get_logger().info(f"reset task={task} seed={seed}: {prompt}")
        response.success, response.message = True, prompt
        return response

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        text = f"rejected trajectory ({reason}): {detail}; holding"
        if reason == "before_reset":  # expected for chunks in flight across a reset
            self.get_logger().info(text)
        else:
            self.get_logger().warning(text)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        try:
            stamp = from_time_msg(msg.header.stamp)
            if stamp == 0.0:
                start = float(self.env.time)
            elif stamp < self._reset_stamp:
                self._reject("before_reset", f"stamp {stamp:.3f} precedes the last reset {self._reset_stamp:.3f}")
                return
            else:
                start = stamp - self._epoch
            times = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
            positions = [list(p.positions) for p in msg.points]
            velocities = [list(p.velocities) for p in msg.points]
            traj = validate_trajectory(list(msg.joint_names), times, positions, velocities, self.safety.limits,
                                       start)
            for k in range(len(traj.positions)):
                verdict = self.safety.check_target(traj.positions[k])
                if not verdict.ok:
                    raise TrajectoryRejected(verdict.reason, f"point {k}: {verdict.detail}")
        except TrajectoryRejected as exc:
            self._reject(exc.reason, exc.detail)
            return
        except Exception as exc:  # never die on a message
            self._reject("malformed", f"{type(exc).__name__}: {exc}")
            return
        self.traj.set_trajectory(traj)
        self.accepted += 1
        if self.lockstep_s > 0 and len(traj.positions) > 1:  # a chunk (not a hold): wait for the next one from here
            self._lock_until = start + self.lockstep_s
            self._lock_wall = time.monotonic()

    def _tick(self) -> None:
        try:
            self._step_realtime()
        except Exception:
            self.rejected["internal_error"] += 1
            self.get_logger().error("sim tick failed:\n" + traceback.format_exc())

    def _step_realtime(self) -> None:
        wall = time.monotonic()
        self.tick_times.append(wall)
        if len(self.tick_times) > 100_000:
            del self.tick_times[:50_000]
        dt = float(self.env.physics_dt)
        target = self._sim0 + self.rtf * (wall - self._wall0)
        n = int(np.floor((target - float(self.env.time)) / dt + 1e-9))
        max_n = max(1, int(round(0.25 * self.rtf / dt)))  # never catch up more than 0.25 s of wall time
        if n > max_n:  # fell behind (loaded CPU): sim time slows down instead of spiralling
            n = max_n
            self._wall0, self._sim0 = wall, float(self.env.time) + n * dt
        if self._lock_until is not None:
            if wall - self._lock_wall > self.lockstep_timeout_s:
                self._lock_until = None  # no chunk for a while: the controller is muted or gone, run free
            else:
                room = int(np.floor((self._lock_until - float(self.env.time)) / dt + 1e-9))
                if n > room:  # the controller is behind: wait for its next chunk (sim time pauses, no catch-up)
                    n = max(0, room)
                    self._wall0, self._sim0 = wall, float(self.env.time) + n * dt
                    self.lockstep_waits += 1
        if n <= 0:
            return
        t_end = float(self.env.time) + n * dt
        setpoint = self.traj.sample(t_end)
        verdict = self.safety.filter(self._cmd, setpoint, dt=n * dt, obs_age=0.0)
        self._cmd = verdict.command
        self.env.set_joint_targets(self._cmd)
        while n > 0:  # a camera instant inside this tick splits the physics there: frames land on the camera grid
            k = n
            to_camera = int(np.ceil((self._next_camera - float(self.env.time)) / dt - 1e-9))
            if 0 < to_camera < n:
                k = to_camera
            self.env.step_physics(k)
            n -= k
            if float(self.env.time) + 1e-9 >= self._next_camera:
                self._camera_instant()
        self.traj.prune(float(self.env.time))
        self.ticks += 1
        self._publish_clock()
        if self._state_stamp != float(self.env.time):
            self._publish_state()

    def _camera_instant(self) -> None:
        """At (or just past) a camera time: joint state, images, object poses and the success flag, all stamped with
        env.time (so every image has the joint state of its instant)."""
        self._publish_state()
        self._next_camera += self.camera_period * max(1, int(np.ceil(
            (float(self.env.time) - self._next_camera + 1e-9) / self.camera_period)))
        self._publish_cameras()
        self._publish_objects()
        self.success = bool(self.env.is_success())
        self.pub_success.publish(Bool(data=self.success))

    # -- publishing ------------------------------------------------------------------------------------------
    def _publish_state(self) -> None:
        self._state_stamp = float(self.env.time)
        q, v, e = self.env.joint_state()
        msg = JointState()
        msg.header.stamp = to_time_msg(self.sim_to_ros(float(self.env.time)))
        msg.name = self.joint_names
        msg.position = [float(x) for x in q]
        msg.velocity = [float(x) for x in v]
        msg.effort = [float(x) for x in e]
        self.pub_js.publish(msg)

    def _publish_cameras(self) -> None:
        """Capture the scene at the current sim time; render + publish inline or on the render thread."""
        if not self.cameras:
            return
        stamp = to_time_msg(self.sim_to_ros(float(self.env.time)))
        infos = {cam: self.env.camera_info(cam) for cam in self.cameras}
        if self._render_worker is None:
            self._send_images(self.env.render_cameras(), infos, stamp)
            return
        self._render_worker.submit(self.env, infos, stamp)

    def _send_images(self, images: dict[str, np.ndarray], infos: dict[str, dict], stamp: TimeMsg) -> None:
        for cam in self.cameras:
            img = np.ascontiguousarray(images[cam], dtype=np.uint8)
            frame = topics.optical_frame(cam)
            msg = Image()
            msg.header.stamp, msg.header.frame_id = stamp, frame
            msg.height, msg.width = int(img.shape[0]), int(img.shape[1])
            msg.encoding, msg.is_bigendian, msg.step = "rgb8", 0, int(img.shape[1] * 3)
            msg.data = img.tobytes()
            self.pub_img[cam].publish(msg)
            ci = infos[cam]
            info = CameraInfo()
            info.header.stamp, info.header.frame_id = stamp, frame
            info.width, info.height = int(ci["width"]), int(ci["height"])
            fx, fy, cx, cy = (float(ci[k]) for k in ("fx", "fy", "cx", "cy"))
            info.distortion_model = "plumb_bob"
            info.d = [0.0] * 5
            info.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
            info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
            info.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
            self.pub_info[cam].publish(info)

    def _publish_objects(self) -> None:
        stamp = to_time_msg(self.sim_to_ros(float(self.env.time)))
        arr = MarkerArray()
        for i, (role, pose) in enumerate(self.env.object_poses().items()):  # env role order = obs["privileged"]
            m = Marker()
            m.header.stamp, m.header.frame_id = stamp, "world"
            m.ns, m.id, m.type, m.action = str(role), i, Marker.CUBE, Marker.ADD
            x, y, z, qw, qx, qy, qz = (float(v) for v in pose)
            m.pose.position.x, m.pose.position.y, m.pose.position.z = x, y, z
            m.pose.orientation.w, m.pose.orientation.x = qw, qx
            m.pose.orientation.y, m.pose.orientation.z = qy, qz
            m.scale.x = m.scale.y = m.scale.z = 0.04
            m.color.a = 1.0
            arr.markers.append(m)
        t = Marker()
        t.header.stamp, t.header.frame_id = stamp, "world"
        t.ns, t.id, t.type, t.action, t.text = "task", 0, Marker.TEXT_VIEW_FACING, Marker.ADD, str(self.env.task)
        t.pose.orientation.w = 1.0
        t.scale.z, t.color.a = 0.05, 1.0
        arr.markers.append(t)
        self.pub_objects.publish(arr)

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus()
        status.name, status.hardware_id = "qvgm/sim_node", "mujoco_tabletop"
        status.level = DiagnosticStatus.OK if not self.rejected else DiagnosticStatus.WARN
        status.message = f"{sum(self.rejected.values())} rejected trajectories"
        values = {"accepted_trajectories": self.accepted, "rejected_trajectories": sum(self.rejected.values()),
                  "ticks": self.ticks, "sim_time": round(float(self.env.time), 4), "task": self.env.task,
                  "lockstep_waits": self.lockstep_waits,
                  "success": self.success}
        if self._render_worker is not None:
            values["camera_frames_rendered"] = self._render_worker.rendered
            values["camera_frames_dropped"] = self._render_worker.dropped
        values.update({f"rejected.{k}": v for k, v in sorted(self.rejected.items())})
        values.update({f"safety.{k}": v for k, v in sorted(self.safety.counters.items())})
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self.pub_diag.publish(arr)


    def destroy_node(self) -> None:
        if self._render_worker is not None:
            self._render_worker.stop()
            self._render_worker = None
        super().destroy_node()


class RenderWorker:
    """Renders camera frames off the control thread (MuJoCo releases the GIL while rendering).

    `submit` snapshots MjData at the tick's sim time (mj_copyData, microseconds) and hands it over; while a frame
    is still rendering a new one is dropped (counted), so a slow renderer lowers the camera rate, never the
    control rate. The GL context lives on the worker thread, one mujoco.Renderer per model (task).
    """

    def __init__(self, cameras: list[str], image_size: tuple[int, int], send: Any, logger: Any) -> None:
        self.cameras, self.image_size, self.send, self.logger = cameras, image_size, send, logger
        self.rendered = 0
        self.dropped = 0
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._snapshots: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._run, name="sim_node_render", daemon=True)
        self._thread.start()

    def submit(self, env: Any, infos: dict[str, dict], stamp: TimeMsg) -> None:
        import mujoco

        model = env.model
        snap = mujoco.MjData(model)  # fresh per frame: the worker may still read the previous one
        mujoco.mj_copyData(snap, model, env.data)
        try:
            self._jobs.put_nowait((model, snap, infos, stamp))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        import mujoco

        renderers: dict[int, Any] = {}
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                model, snap, infos, stamp = job
                try:
                    r = renderers.get(id(model))
                    if r is None:
                        r = renderers[id(model)] = mujoco.Renderer(model, self.image_size[0], self.image_size[1])
                    images = {}
                    for cam in self.cameras:
                        r.update_scene(snap, camera=cam)
                        images[cam] = r.render().copy()
                    self.send(images, infos, stamp)
                    self.rendered += 1
                except Exception:
                    self.logger.error("render failed:\n" + traceback.format_exc())
        finally:
            for r in renderers.values():
                r.close()

    def stop(self) -> None:
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join(timeout=10.0)


def main(args: list[str] | None = None) -> None:
    spin_main(SimNode, args)


if __name__ == "__main__":
    main()

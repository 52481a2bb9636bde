"""The learn-from-experience loop, end to end (issue 7): `python -m qvgm_policy_node.loop --work runs/loop`.

Stages (each resumable; a finished stage is skipped when the same work dir is run again):
  demos   noisy scripted-expert demos (critic_trainer.demos.collect_demos) -> WORK/demos
  sft     SFT of the `state` backbone (critic_trainer.sft.train_sft) -> WORK/sft_v0, published as v0 into the
          CheckpointStore WORK/store (made current). Demos, demo noise, SFT steps, StateConfig flags, EMA and
          successful-demos-only come from the task's recipe (critic_trainer.recipes.sft_recipe, the table the
          learning benchmark uses; SFT batch 64, lr 1e-3 as there); every CLI value given overrides it.
          --sft-init CKPT fine-tunes a pretrained checkpoint instead (an imported pi0.5, `critic_trainer
          import-pi05`, or a base SFT'd on other tasks): its architecture, weights and tokenizer, the demos' norm
          stats; v0's parent is its version (critic_trainer.sft.SFTConfig.init).
  round 0 the SFT policy v0 evaluated through ROS on the held-out evaluation seeds BEFORE any improvement
          (WORK/rounds/r0/eval): the baseline every later round is compared with
  rounds  R times, with ONE in-process sim graph (sim_node + policy_node backend `flow` serving the store's current
          version with hot reload + privileged object state):
            collect   E rollouts through ROS (episode_manager sim mode, auto start/label; recorder_node) appended to
                      the round's replay buffer WORK/rounds/rN/buffer (= a copy of the previous round's buffer, or
                      of the demos for round 1); privileged object poses (/qvgm/sim/objects, stamp-matched to the
                      recorded frames) are written as the buffer's side files (the `state` backbone needs them)
            improve   critic_trainer.pipeline.improve (Q-VGM) on that buffer -> publish (parent = serving version)
            reload    the RUNNING policy node hot-reloads it (/qvgm/policy/version must report the new version
                      before the first evaluation episode starts, so every round runs the same scene seeds)
            eval      evaluation episodes through ROS (recorded into WORK/rounds/rN/eval) of the serving version on
                      scene seeds seed + EVAL_SEED + k; only episodes whose every frame that version served count
  Q-VGM settings follow bench/learning.py (critic 256x256, Cal-QL w 0.1, batch 256; actor 300 steps, lr 1e-4,
  batch 64, ascent lr = the task's (critic_trainer.recipes.qvgm_ascent_lr: 0.02, stack 0.005), action box = the
  buffer's range, gate = last 5 of K = 10).
  A table (round 0 = SFT, then each round: serving version, success rate, 95 % Wilson CI, change vs round 0,
  episodes), WORK/summary.json (rows, per-stage wall times, control-loop health of every ROS stage, critic
  quality and actor Q before/after per round) and WORK/loop.png close the run. Progress lines:
  `[loop +ELAPSEDs] stage i/n ...` with an ETA inside each ROS stage.

Ctrl-C (SIGINT) or SIGTERM stops at the next spin: the graph shuts down, the recorder aborts its open episode, the
store only ever holds committed versions; WORK/loop_state.json records which stages finished.
The graph runs on sim time: sim_node publishes /clock (robot time) and every node of the graph (sim_node,
policy_node, recorder_node, episode_manager, the driver's helper node) has use_sim_time=True, so episode time
limits, staleness checks, episode windows and recorded stamps are all in sim seconds, and --real-time-factor
(sim seconds per wall second) can exceed 1. The driver's per-episode bookkeeping (reading each finished episode
back from the growing buffer) runs on a worker thread so the graph keeps spinning.
`--backbone pi05-small` trains the image policy instead (~1.2 s of CPU per SFT step at batch 32; pixel SFT does
not yet learn push on 2 CPU cores, see docs/RESULTS.md).
"""

from __future__ import annotations

from qvgm_policy_node.ros_env import apply_loopback_env

apply_loopback_env(keep_existing_domain=True)  # before rclpy: DDS discovery on loopback, per-run domain

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

STATE_FILE = "loop_state.json"
CAMERA = "front"
EVAL_SEED = 1_000_000  # evaluation scenes: seed + EVAL_SEED + k, the same held-out set every round
# sim_node lockstep: the sim never runs more than this many sim s past the latest chunk's observation stamp; the
# policy node starts the next inference 0.5 s after it (async_start_fraction 0.5 of a 10 x 0.1 s chunk), so a chunk
# may take 0.2 sim s before the sim waits for it: a busy CPU then slows the sim instead of starving the controller
LOCKSTEP_S = 0.7


class Progress:
    """`[loop +12.3s] stage i/n message` lines on stdout (flushed)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, stage: str, msg: str, i: int | None = None, n: int | None = None) -> None:
        frac = f" {i}/{n}" if i is not None and n is not None else ""
        print(f"[loop +{time.monotonic() - self.t0:7.1f}s] {stage}{frac}: {msg}", flush=True)


class LoopState:
    """WORK/loop_state.json: finished stages and per-round results, rewritten atomically after every change."""

    def __init__(self, work: Path) -> None:
        self.path = work / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"rounds": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def round(self, r: int) -> dict[str, Any]:
        return self.data["rounds"].setdefault(str(r), {})


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch intra-op threads = n inside the block (the offline stages; the ROS stages run with 1), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fmt(x: Any, digits: int = 3) -> str:
    """A float for a progress line ('n/a' for None / NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{float(x):.{digits}f}"


# ------------------------------------------------------------------------------------------------- offline stages
def stage_demos(args: argparse.Namespace, work: Path, log: Progress) -> Path:
    """Noisy expert demos with the recorder's camera layout (so rollouts append to a copy of them)."""
    from critic_trainer.demos import collect_demos

    out = work / "demos"
    if (out / "meta" / "info.json").exists() and (work / "demos.done").exists():
        log("demos", f"present in {out}, skipped")
        return out
    shutil.rmtree(out, ignore_errors=True)
    log("demos", f"{args.demos} noisy expert episodes of {args.task} (noise {args.demo_noise} m) -> {out}")
    t0 = time.monotonic()
    s = collect_demos(args.task, args.demos, out, noise=args.demo_noise, seed=args.seed,
                      image_size=(args.image_size, args.image_size), cameras=(CAMERA,), control_hz=10)
    s["stage_wall_s"] = round(time.monotonic() - t0, 1)
    (work / "demos.done").write_text(json.dumps(s))
    log("demos", f"{s['successes']}/{s['episodes']} successful, {s['frames']} frames, {s['wall_s']:.0f}s")
    return out


def stage_sft(args: argparse.Namespace, work: Path, demos: Path, state: LoopState, log: Progress) -> str:
    """SFT -> WORK/sft_v0 -> store version v0 (current). Returns v0's version id."""
    from critic_trainer.sft import SFTConfig, train_sft
    from qvgm.checkpoints import CheckpointStore

    store = CheckpointStore(work / "store", keep_last=None)
    if state.data.get("v0") and state.data["v0"] in {v.version for v in store.versions()}:
        log("sft", f"v0 = {state.data['v0']} present in the store, skipped")
        return str(state.data["v0"])
    out = work / "sft_v0"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        base = f" fine-tuning {args.sft_init}" if args.sft_init else ""
        log("sft", f"{args.sft_steps} steps of `{args.backbone}`{base} on {demos} (batch {args.sft_batch}, "
            f"lr {args.sft_lr}, overrides {args.sft_overrides}, ema {args.ema}, "
            f"successful demos only: {args.success_only})")
        t0 = time.monotonic()
        cfg = SFTConfig(datasets=[str(demos)], config=args.backbone, out=str(out), steps=args.sft_steps,
                        seed=args.seed, work_dir=str(work / "sft_v0.work"), batch_size=args.sft_batch, lr=args.sft_lr,
                        ema_decay=args.ema, success_only=args.success_only, overrides=dict(args.sft_overrides),
                        init=str(args.sft_init) if args.sft_init else None)
        with torch_threads(args.threads):
            res = train_sft(cfg, resume=True, progress=not args.no_progress)
        state.data.setdefault("timing", {})["sft"] = round(time.monotonic() - t0, 1)
        log("sft", f"final flow loss {res['final_loss']:.4f}, {state.data['timing']['sft']:.0f}s")
    v0 = store.publish_dir(out, summary={"kind": "sft", "source": str(out)}, make_current=True)
    state.data["v0"] = v0
    state.save()
    log("sft", f"published v0 = {v0} to {store.root}")
    return v0


def improve_config(args: argparse.Namespace) -> Any:
    """The loop's ImproveConfig: Q-VGM with bench/learning.py's settings and the task's ascent step (CLI values
    override)."""
    from critic_trainer.pipeline import ImproveConfig
    from critic_trainer.recipes import qvgm_ascent_lr

    alpha = qvgm_ascent_lr(args.task) if args.ascent_lr is None else args.ascent_lr
    return ImproveConfig(method="qvgm", critic_steps=args.critic_steps, critic_hidden=tuple(args.critic_hidden),
                         critic_batch=args.critic_batch, reg_weight=args.reg_weight, actor_steps=args.actor_steps,
                         critic_rollout_fraction=args.critic_rollout_fraction,
                         actor_lr=args.actor_lr, actor_batch=args.actor_batch, ascent_lr=alpha,
                         gate_last_m=args.gate_m, seed=args.seed)


def stage_improve(args: argparse.Namespace, work: Path, buffer: Path, serving: str,
                  log: Progress) -> tuple[str, dict[str, Any]]:
    """Q-VGM on `buffer` starting from store version `serving`; publishes (and makes current) the new version.
    Returns (new version, {wall times s, critic quality on the buffer, actor Q before/after})."""
    import torch

    from critic_trainer.pipeline import improve, load_buffer, publish
    from qvgm.checkpoints import CheckpointStore
    from qvgm.policy import load_policy

    store = CheckpointStore(work / "store", keep_last=None)
    init = store.path(serving)
    policy = load_policy(init)
    buf = load_buffer(buffer, policy.horizon, with_images=policy.config.backbone != "state")
    cfg = improve_config(args)
    rwork = buffer.parent / "improve.work"
    shutil.rmtree(rwork, ignore_errors=True)
    log("improve", f"Q-VGM from {serving} on {len(buf)} frames ({len(np.unique(buf.episode))} episodes, "
        f"critic {cfg.critic_steps} steps, actor {cfg.actor_steps} steps)")
    t0 = time.monotonic()
    with torch.inference_mode(False), torch_threads(args.threads):
        actor, critic, summary = improve(policy, buf, cfg, work=rwork, progress=not args.no_progress)
    manifest = publish(actor, critic, summary, init, store=work / "store")
    new = str(manifest["version"])
    if store.current() != new:  # publish makes the new version current; be explicit about what serves next
        store.set_current(new)
    act = summary.get("actor", {})
    ev = summary.get("critic", {}).get("eval", {})
    ev_ro = summary.get("critic", {}).get("eval_rollouts", {})
    wall = time.monotonic() - t0
    info = {"wall_s": round(wall, 1), "actor_s": act.get("actor_wall_s"),
            "critic_s": round(float(summary["wall_s"]) - float(act.get("actor_wall_s") or 0.0), 1),
            "frames": summary.get("frames"), "episodes": summary.get("episodes"),
            "successful_episodes": summary.get("successful_episodes"), "transitions": summary.get("transitions"),
            "critic_mc_corr": ev.get("mc_corr"), "critic_mc_mae": ev.get("mc_mae"),
            "critic_mc_corr_rollouts": ev_ro.get("mc_corr"), "critic_mc_mae_rollouts": ev_ro.get("mc_mae"),
            "rollout_transitions": summary.get("critic", {}).get("rollout_transitions"),
            "q_policy_before": act.get("q_policy_before"), "q_policy_after": act.get("q_policy_after"),
            "action_shift": act.get("action_shift")}
    log("improve", f"published {new} (parent {manifest.get('parent')}) in {wall:.0f}s (features + critic "
        f"{info['critic_s']}s, actor {info['actor_s']}s); critic MC corr {fmt(info['critic_mc_corr'])} (on the "
        f"rollouts alone {fmt(info['critic_mc_corr_rollouts'])}), "
        f"Q of the policy's chunks before {fmt(info['q_policy_before'])} after {fmt(info['q_policy_after'])}")
    return new, info


# ------------------------------------------------------------------------------------------------- the ROS graph
class SimLoop:
    """The in-process graph and the ROS-side stages (collect / wait for reload / eval)."""

    def __init__(self, args: argparse.Namespace, work: Path, log: Progress) -> None:
        from qvgm_policy_node.graph import Graph
        from qvgm_policy_node.profile import load_profile, node_specs

        self.args, self.work, self.log = args, work, log
        size = args.image_size
        # sim time: sim_node is the clock source (/clock), every node runs with use_sim_time, so episode windows,
        # time limits, staleness and recorded stamps are all in sim seconds at any real_time_factor
        sim_ov = {"task": args.task, "seed": args.seed, "cameras": [CAMERA], "image_width": size,
                  "image_height": size, "camera_hz": 10.0, "real_time_factor": args.real_time_factor,
                  "publish_clock": True, "use_sim_time": True, "lockstep_s": LOCKSTEP_S}
        pol_ov = {"backend": "flow", "checkpoint_store": str(work / "store"), "privileged": True,
                  "cameras": [CAMERA], "max_image_age": 1.0, "max_objects_age": 1.0, "seed": args.seed,
                  "reload_budget_s": 2.0, "use_sim_time": True}
        self.graph = Graph(node_specs(load_profile("tabletop_sim"), {"sim_node": sim_ov, "policy_node": pol_ov}))
        self.versions: list[str] = []  # /qvgm/policy/version messages
        self.objects: list[tuple[float, np.ndarray]] = []  # (stamp s, privileged vector) from /qvgm/sim/objects
        self.committed: list[dict[str, Any]] = []  # every committed episode of the last episodes() call
        self.driver_gap_max = 0.0  # longest wall s the last episodes() call kept the graph from spinning

    def __enter__(self) -> SimLoop:
        from rclpy.parameter import Parameter
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from std_msgs.msg import Bool, String
        from visualization_msgs.msg import MarkerArray

        from qvgm_policy_node import topics
        from qvgm_policy_node.episode_manager import ENABLE_TOPIC

        self.graph.__enter__()
        node = self.graph.node("loop_driver", parameter_overrides=[Parameter("use_sim_time", value=True)])
        node.create_subscription(String, topics.POLICY_VERSION, lambda m: self.versions.append(m.data),
                                 QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        node.create_subscription(MarkerArray, topics.OBJECTS, self._on_objects, 50)
        self.enable_pub = node.create_publisher(Bool, ENABLE_TOPIC,
                                                QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.graph.__exit__(*exc)

    def _on_objects(self, msg: Any) -> None:
        from qvgm_policy_node.recorder_node import stamp_seconds

        parts = [np.array([m.pose.position.x, m.pose.position.y, m.pose.position.z, m.pose.orientation.w,
                           m.pose.orientation.x, m.pose.orientation.y, m.pose.orientation.z])
                 for m in msg.markers if m.ns != "task"]
        stamps = [stamp_seconds(m.header.stamp) for m in msg.markers if m.ns != "task"]
        if parts:
            self.objects.append((stamps[0], np.concatenate(parts).astype(np.float32)))

    @property
    def policy(self) -> Any:
        return self.graph.nodes["policy_node"]

    def set_noise_scale(self, scale: float) -> None:
        """The policy node's sampling-noise scale (its run-time parameter, through the same callback as
        `ros2 param set`); RuntimeError with the node's reason when refused."""
        from rclpy.parameter import Parameter

        result = self.policy.set_parameters([Parameter("noise_scale", value=float(scale))])[0]
        if not result.successful:
            raise RuntimeError(f"policy_node refused noise_scale {scale}: {result.reason}")

    def noise_scale(self) -> float:
        """The noise scale the policy node serves now (its parameter)."""
        return float(self.policy.get_parameter("noise_scale").value)

    def health(self) -> dict[str, Any]:
        """Cumulative control-loop counters of the running graph (policy node stats and skips, sim ticks)."""
        pol, sim = self.policy, self.graph.nodes["sim_node"]
        c = {f"policy.{k}": int(v) for k, v in pol.stats.items()}
        c.update({f"policy.skipped.{k}": int(v) for k, v in pol.skipped.items()})
        c["policy.published_chunks"] = int(pol.published)
        c["sim.ticks"] = int(sim.ticks)
        c["sim.lockstep_waits"] = int(sim.lockstep_waits)
        c["sim.accepted_trajectories"] = int(sim.accepted)
        c.update({f"sim.rejected.{k}": int(v) for k, v in sim.rejected.items()})
        worker = getattr(sim, "_render_worker", None)
        if worker is not None:  # frames the render thread dropped because the previous one was still rendering
            c["sim.camera_rendered"], c["sim.camera_dropped"] = int(worker.rendered), int(worker.dropped)
        return c

    def health_report(self, before: dict[str, Any], wall0: float, infos: list[dict[str, Any]]) -> dict[str, Any]:
        """What changed in health() since `before` (started at time.monotonic() = wall0), plus the robot time the
        recorded episodes cover vs the wall time (effective real-time factor, resets included) and the sim_node's
        control-tick interval percentiles (ms, wall clock; nominal 1000 / joint_state_hz) and driver_gap_ms_max, the
        longest time the last episodes() call kept the graph from spinning (its own bookkeeping between spins)."""
        after = self.health()
        delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        wall = time.monotonic() - wall0
        ticks = np.asarray([t for t in self.graph.nodes["sim_node"].tick_times if t >= wall0])
        gaps = np.diff(ticks) * 1e3 if len(ticks) > 2 else np.zeros(1)
        robot_s = sum(float(i["stamps"][-1] - i["stamps"][0]) + 0.1 for i in infos if i.get("stamps"))  # fps 10
        return {"wall_s": round(wall, 1), "robot_s": round(robot_s, 1),
                "effective_rtf": round(robot_s / wall, 2) if wall > 0 else None,
                "tick_ms_p50": round(float(np.percentile(gaps, 50)), 1),
                "tick_ms_p99": round(float(np.percentile(gaps, 99)), 1), "tick_ms_max": round(float(gaps.max()), 1),
                "missed_ticks": delta.get("policy.missed_ticks", 0), "late_chunks": delta.get("policy.late_chunks", 0),
                "dropped_chunks": delta.get("policy.dropped_chunks", 0),
                "holds": sum(v for k, v in delta.items() if k.startswith("policy.holds")),
                "driver_gap_ms_max": round(self.driver_gap_max * 1e3, 1),
                "camera_dropped": delta.get("sim.camera_dropped", 0),
                "lockstep_waits": delta.get("sim.lockstep_waits", 0), "counters": delta}

    def episodes(self, root: Path, n: int, stage: str, seed: int, accept: Any = None) -> list[dict[str, Any]]:
        """Run episodes (episode_manager sim mode, auto start/label) recorded into `root` until `n` committed
        episodes pass `accept(info)`; scene seeds seed, seed+1, ... (sim_node's `seed` parameter, set before each
        reset). Returns [{index, seed, success, frames, versions, stamps}] of the accepted episodes; every
        committed episode (accepted or not, and one that finished while the stage wound down) is in self.committed.

        The per-episode bookkeeping (reading the episode back from the growing buffer, ~0.1-1 s) runs on a worker
        thread while this thread keeps spinning the graph, so the sim and the policy never wait for it."""
        from concurrent.futures import Future, ThreadPoolExecutor

        from rclpy.parameter import Parameter

        from qvgm.data import ReplayReader
        from qvgm.data.video import sim_video
        from qvgm.recording import RUNNING
        from qvgm_policy_node.episode_manager import EpisodeManager
        from qvgm_policy_node.recorder_node import RecorderNode

        a, g = self.args, self.graph
        sim = g.nodes["sim_node"]
        seeds = [seed]  # seed of every started episode, in order (the next one is set before its reset)
        sim.set_parameters([Parameter("seed", value=seed)])

        def params(**kw: Any) -> list[Parameter]:
            return [Parameter(k, value=v) for k, v in kw.items()]

        rec = g.add(RecorderNode(context=g.context, parameter_overrides=params(
            root=str(root), fps=10, cameras=[CAMERA], reference_camera=CAMERA, image_height=a.image_size,
            image_width=a.image_size, max_age=0.25, max_latency=1.0, align_delay=0.2, use_sim_time=True,
            **sim_video())))  # sim renders at model size: full-resolution colour, lossless (qvgm.data.video)
        # the first episode starts at once (sim time): let DDS deliver the latched policy version to the new recorder
        # first, or that episode's first frames are tagged with no version and would not count for an evaluation
        serving = self.policy.version
        if serving is not None and not g.spin_until(lambda: rec.core.version == serving, 30.0):
            # DDS discovery of a new node can take seconds on a loaded machine; the episode still runs, and if its
            # frames carry no version it is not counted (the next seed runs instead)
            self.log(stage, f"the recorder has not heard /qvgm/policy/version {serving} after 30 s; "
                            "the first episode may not count")
        em = g.add(EpisodeManager(context=g.context, parameter_overrides=params(
            time_limit=a.episode_time, sim=True, sim_reset_service="/sim_node/reset",
            auto_start=True, auto_label_timeout=True, use_sim_time=True)))
        accepted: list[dict[str, Any]] = []
        self.committed = []
        pending: list[tuple[int, Future]] = []  # (result number, future of _episode_info) in commit order
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loop-bookkeeping")
        seen = 0
        t0 = time.monotonic()
        wall_cap = (n * 4 + 4) * (a.episode_time / a.real_time_factor + 10.0)
        started = -1

        def eta(k: int) -> str:
            return f", ETA {(time.monotonic() - t0) / k * (n - k):.0f}s" if 0 < k < n else ""
        self.driver_gap_max = 0.0
        spun = time.monotonic()
        try:
            while len(accepted) < n:
                if time.monotonic() - t0 > wall_cap:
                    raise TimeoutError(f"{stage}: only {len(accepted)}/{n} episodes in {wall_cap:.0f}s")
                self.driver_gap_max = max(self.driver_gap_max, time.monotonic() - spun)
                g.spin_once(0.01)
                spun = time.monotonic()  # from here to the next spin the graph waits for this driver's bookkeeping
                if em.sm.state == RUNNING and em.sm.episode != started:  # next reset: the next seed
                    started = em.sm.episode
                    seeds.append(seeds[-1] + 1)
                    sim.set_parameters([Parameter("seed", value=seeds[-1])])
                while seen < len(rec.core.results):  # a finished episode: read it back off this thread
                    res = rec.core.results[seen]
                    seen += 1
                    if res["status"] != "committed":
                        self.log(stage, f"episode not kept: {res['status']}")
                        continue
                    pending.append((seen - 1, pool.submit(self._episode_info, root, int(res["index"]))))
                while pending and pending[0][1].done() and len(accepted) < n:
                    k, fut = pending.pop(0)
                    info = fut.result()
                    info["seed"] = seeds[k] if k < len(seeds) else None
                    self.committed.append(info)
                    ok = accept is None or accept(info)
                    if ok:
                        accepted.append(info)
                    self.log(stage, f"episode {info['index']} seed={info['seed']} success={info['success']} "
                             f"frames={info['frames']} versions={info['versions']}"
                             f"{'' if ok else ' (not counted)'}{eta(len(accepted))}", len(accepted), n)
                    if len(accepted) >= n:
                        em.auto_start = False  # no new episode; an open one is aborted by the recorder's close
        finally:
            for node in (em, rec):
                g.executor.remove_node(node)
                g.nodes.pop(node.get_name(), None)
                node.destroy_node()  # the recorder's close commits an episode that had already ended
            try:
                for k, fut in pending:  # committed but not needed: still in the buffer, so still accounted for
                    info = fut.result()
                    info["seed"] = seeds[k] if k < len(seeds) else None
                    self.committed.append(info)
                for k in range(seen, len(rec.core.results)):
                    res = rec.core.results[k]
                    if res["status"] == "committed":
                        info = self._episode_info(root, int(res["index"]))
                        info["seed"] = seeds[k] if k < len(seeds) else None
                        self.committed.append(info)
            finally:
                pool.shutdown(wait=True)
        ReplayReader(root, decode_images=False, include_discarded=True).close()  # the buffer reads back
        return accepted

    def _episode_info(self, root: Path, index: int) -> dict[str, Any]:
        from qvgm.data import ReplayReader

        r = ReplayReader(root, decode_images=False, include_discarded=True)
        try:
            e = next(i for i, row in enumerate(r.episodes) if int(row["episode_index"]) == index)
            s, t = int(r.ep_start[e]), int(r.ep_end[e])
            return {"index": index, "success": r.episodes[e].get("success") is True, "frames": t - s,
                    "versions": sorted({str(v) for v in r.policy_version[s:t]}),
                    "stamps": r.stamp[s:t].astype(np.float64).tolist()}
        finally:
            r.close()

    def write_privileged(self, root: Path, infos: list[dict[str, Any]]) -> None:
        """Privileged object poses per recorded frame (nearest /qvgm/sim/objects stamp) as the buffer's side files."""
        from critic_trainer.demos import write_privileged

        st = np.array([s for s, _ in self.objects])
        vec = np.stack([v for _, v in self.objects])
        for info in infos:
            stamps = np.asarray(info["stamps"])
            j = np.clip(np.searchsorted(st, stamps), 1, len(st) - 1)
            j = np.where(np.abs(st[j - 1] - stamps) <= np.abs(st[j] - stamps), j - 1, j)
            gap = float(np.abs(st[j] - stamps).max())
            if gap > 0.25:
                raise RuntimeError(f"episode {info['index']}: no object poses within {gap:.2f}s of a frame")
            write_privileged(root, int(info["index"]), vec[j])

    def wait_serving(self, version: str, timeout: float = 60.0) -> None:
        """Spin until the running policy node has published a chunk of `version` (so the recorder tags the next
        episode's frames with it from the first one). Between episodes the node is muted and swaps only at a chunk
        boundary, so if that has not happened within 2 s it is enabled (/qvgm/policy/enable) until it does, then
        muted again: the robot moves outside any episode, and the next episode's reset puts the scene back."""
        from std_msgs.msg import Bool

        def serving() -> bool:  # a chunk of `version` went out (and /qvgm/policy/version, which tags frames, says so)
            return self.policy.version == version

        if self.graph.spin_until(serving, 2.0):
            return
        self.enable_pub.publish(Bool(data=True))
        try:
            ok = self.graph.spin_until(serving, timeout)
        finally:
            self.enable_pub.publish(Bool(data=False))
            self.graph.spin_until(lambda: not self.policy.enabled, 2.0)
        if not ok:
            raise TimeoutError(f"the policy node did not load {version} in {timeout}s")


# ------------------------------------------------------------------------------------------------- main
def run_loop(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage; returns the summary dict (also written to WORK/summary.json)."""
    from qvgm.checkpoints import CheckpointStore

    log = Progress()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state = LoopState(work)
    demos = stage_demos(args, work, log)
    v0 = stage_sft(args, work, demos, state, log)
    store = CheckpointStore(work / "store", keep_last=None)
    for r, rs in sorted(state.data["rounds"].items()):  # one noise scale per table: rounds compare with round 0
        if rs.get("evaluated") and rs.get("eval_noise_scale", 1.0) != args.eval_noise_scale:
            raise SystemExit(f"round {r} in {work} was evaluated at noise scale {rs.get('eval_noise_scale', 1.0):g}; "
                             f"rerun with --eval-noise-scale {rs.get('eval_noise_scale', 1.0):g} or use a new --work")
    if all(state.round(r).get("evaluated") for r in range(0, args.rounds + 1)):
        log("rounds", f"all {args.rounds} rounds finished, skipped")
        return write_summary(args, work, state, log)
    with SimLoop(args, work, log) as sim:
        log("graph", f"up: ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID')}, nodes {sorted(sim.graph.nodes)}, "
            f"real_time_factor {args.real_time_factor}")
        r0 = state.round(0)
        if not r0.get("evaluated"):  # the baseline: v0 on the same held-out seeds every round is evaluated on
            previous = store.current()
            if previous != v0:  # a work dir whose rounds ran before round 0 existed: serve v0 for this stage
                store.set_current(v0)
            evaluate_round(args, sim, state, 0, v0, v0, log)
            if previous is not None and previous != v0:
                store.set_current(previous)
        prev_buffer = demos
        for r in range(1, args.rounds + 1):
            rs = state.round(r)
            rdir = work / "rounds" / f"r{r}"
            buffer = rdir / "buffer"
            serving = rs.get("from") or store.current() or v0
            timing = rs.setdefault("timing", {})
            if not rs.get("collected"):
                shutil.rmtree(rdir, ignore_errors=True)
                rdir.mkdir(parents=True)
                shutil.copytree(prev_buffer, buffer)
                log("collect", f"round {r}/{args.rounds}: {args.rollouts} rollouts of {serving} -> {buffer}")
                sim.objects.clear()
                sim.set_noise_scale(1.0)  # rollouts are sampled as trained, whatever the profile serves
                t0, before = time.monotonic(), sim.health()
                infos = sim.episodes(buffer, args.rollouts, "collect", seed=args.seed + 10_000 * r)
                sim.write_privileged(buffer, sim.committed)  # every episode in the buffer needs its side files
                rs["collect_health"] = sim.health_report(before, t0, infos)
                timing["collect"] = rs["collect_health"]["wall_s"]
                rs.update(collected=True, rollouts=[{k: v for k, v in i.items() if k != "stamps"} for i in infos],
                          collect_noise_scale=sim.noise_scale(), **{"from": serving})
                state.save()
                k = sum(bool(i["success"]) for i in infos)
                log("collect", f"round {r}: {k}/{len(infos)} rollouts successful, {health_line(rs['collect_health'])}")
            else:
                log("collect", f"round {r}: rollouts present, skipped")
            if not rs.get("improved"):
                rs["version"], rs["improve"] = stage_improve(args, work, buffer, serving, log)
                timing.update(improve=rs["improve"]["wall_s"], critic=rs["improve"]["critic_s"],
                              actor=rs["improve"]["actor_s"])
                rs["improved"] = True
                state.save()
            new = rs["version"]
            if store.current() != new:
                store.set_current(new)
            if not rs.get("evaluated"):
                log("reload", f"waiting for the running policy node to serve {new}")
                evaluate_round(args, sim, state, r, new, serving, log)
            prev_buffer = buffer
    return write_summary(args, work, state, log)


def health_line(h: dict[str, Any]) -> str:
    return (f"robot {h['robot_s']:.0f}s in {h['wall_s']:.0f}s wall (effective RTF {h['effective_rtf']}), sim tick "
            f"p99 {h['tick_ms_p99']} ms, missed ticks {h['missed_ticks']}, late chunks {h['late_chunks']}, "
            f"dropped {h['dropped_chunks']}, holds {h['holds']}")


def served_only(info: dict[str, Any], version: str) -> bool:
    """True when every frame of the episode that had an action was served by `version` (frames tagged "" precede the
    episode's first chunk: the recorder's "no_action" frames, the arm holding its reset pose)."""
    return set(info["versions"]) - {""} == {version}


def evaluate_round(args: argparse.Namespace, sim: SimLoop, state: LoopState, r: int, version: str, parent: str,
                   log: Progress) -> None:
    """args.eval_episodes episodes served by `version` (only episodes whose every frame it served count) on the
    held-out scene seeds seed + EVAL_SEED + k, recorded into WORK/rounds/rR/eval; results into state round r."""
    from critic_trainer.pipeline import wilson_interval

    rs = state.round(r)
    rdir = Path(args.work) / "rounds" / f"r{r}"
    shutil.rmtree(rdir / "eval", ignore_errors=True)
    rdir.mkdir(parents=True, exist_ok=True)
    log("eval", f"round {r}: {args.eval_episodes} episodes of {version} on held-out seeds "
        f"{args.seed + EVAL_SEED}.. through ROS")
    n_before = len(sim.versions)
    t0, before = time.monotonic(), sim.health()
    sim.wait_serving(version)  # loaded before the first episode starts: every seed's episode can count
    sim.set_noise_scale(args.eval_noise_scale)  # collection sets its own scale (1) before each round's rollouts
    infos = sim.episodes(rdir / "eval", args.eval_episodes, "eval", seed=args.seed + EVAL_SEED,
                         accept=lambda i, v=version: served_only(i, v))
    if version not in sim.versions[n_before:] and sim.policy.version != version:
        raise RuntimeError(f"/qvgm/policy/version never reported {version}")
    k = sum(bool(i["success"]) for i in infos)
    lo, hi = wilson_interval(k, len(infos))
    health = sim.health_report(before, t0, infos)
    rs.setdefault("timing", {})["eval"] = health["wall_s"]
    rs.update(evaluated=True, serving=version, successes=k, episodes=len(infos), ci=[lo, hi], eval_health=health,
              eval_noise_scale=args.eval_noise_scale,
              eval=[{kk: vv for kk, vv in i.items() if kk != "stamps"} for i in infos],
              version_messages=sim.versions[n_before:], **({} if r else {"from": parent}))
    state.save()
    log("eval", f"round {r}: {version} {k}/{len(infos)} = {k / len(infos):.0%} [{lo:.0%}, {hi:.0%}] at noise scale "
        f"{args.eval_noise_scale:g}; "
        f"{health_line(health)}")


def summary_rows(args: argparse.Namespace, state: LoopState) -> list[dict[str, Any]]:
    """One row per evaluated round (0 = the SFT policy), with the change vs round 0 when it was evaluated."""
    rows: list[dict[str, Any]] = []
    for r in range(0, args.rounds + 1):
        rs = state.data["rounds"].get(str(r), {})
        if not rs.get("evaluated"):
            continue
        rows.append({"round": r, "serving": rs["serving"], "parent": rs.get("from"), "successes": rs["successes"],
                     "episodes": rs["episodes"], "success_rate": rs["successes"] / max(1, rs["episodes"]),
                     "ci95": rs["ci"], "eval_noise_scale": rs.get("eval_noise_scale", 1.0),
                     "rollouts": len(rs.get("rollouts", [])),
                     "rollout_successes": sum(bool(i["success"]) for i in rs.get("rollouts", [])),
                     "timing_s": rs.get("timing", {}), "improve": rs.get("improve"),
                     "collect_health": rs.get("collect_health"), "eval_health": rs.get("eval_health")})
    base = next((row for row in rows if row["round"] == 0), None)
    for row in rows:
        row["delta_vs_round0"] = None if base is None else round(row["success_rate"] - base["success_rate"], 4)
    return rows


def write_summary(args: argparse.Namespace, work: Path, state: LoopState, log: Progress) -> dict[str, Any]:
    """Print the table; write WORK/summary.json and WORK/loop.png (success rate per round with 95 % CIs)."""
    rows = summary_rows(args, state)
    print(f"{'round':>5}  {'serving version':<26} {'success':>8}  {'95% CI':<12} {'vs r0':>6} {'episodes':>8}  "
          "rollouts collected with the parent (successful/total)")
    for row in rows:
        lo, hi = row["ci95"]
        d = row["delta_vs_round0"]
        delta = "" if d is None or row["round"] == 0 else f"{d * 100:+.0f}"
        what = "(SFT v0, before any improvement)" if row["round"] == 0 else \
            f"{row['rollout_successes']}/{row['rollouts']} ({row['parent']})"
        print(f"{row['round']:>5}  {row['serving']:<26} {row['success_rate']:>8.0%}  [{lo:4.0%}, {hi:4.0%}] "
              f"{delta:>6} {row['episodes']:>8}  {what}")
    demos_done = work / "demos.done"
    timing = {"demos": json.loads(demos_done.read_text()).get("stage_wall_s") if demos_done.exists() else None,
              **state.data.get("timing", {}),
              "rounds": {str(row["round"]): row["timing_s"] for row in rows}}
    summary = {"task": args.task, "backbone": args.backbone, "v0": state.data.get("v0"), "rounds": rows,
               "timing_s": timing, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_plot(work / "loop.png", rows, args.task)
    log("summary", f"wrote {work / 'summary.json'} and {work / 'loop.png'}")
    return summary


def write_plot(path: Path, rows: list[dict[str, Any]], task: str) -> None:
    """Success rate per round (round 0 = SFT) with 95 % Wilson error bars -> PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [row["round"] for row in rows]
    ys = [row["success_rate"] for row in rows]
    err = [[y - row["ci95"][0] for y, row in zip(ys, rows, strict=True)],
           [row["ci95"][1] - y for y, row in zip(ys, rows, strict=True)]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4)
    for x, y, row in zip(xs, ys, rows, strict=True):
        ax.annotate(f"{row['successes']}/{row['episodes']}", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xticks(xs, [("0 (SFT)" if x == 0 else str(x)) for x in xs])
    ax.set(xlabel="round", ylabel="success rate (95% Wilson CI)", ylim=(0, 1), title=f"qvgm loop: {task}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    from qvgm.sim import TASKS
    from qvgm.sim.tasks import TIME_LIMIT_S

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/loop", help="work dir (demos, store, buffers, state); rerun resumes")
    p.add_argument("--task", default="pick_place", choices=list(TASKS))
    p.add_argument("--backbone", default=None,
                   help="policy config: state (CPU, default) or pi05-small (slow on CPU); with --sft-init the "
                   "checkpoint's")
    g = p.add_argument_group("SFT (default: the task's recipe, critic_trainer.recipes.sft_recipe)")
    g.add_argument("--sft-init", type=Path, default=None, metavar="CKPT",
                   help="fine-tune this checkpoint (imported pi0.5 or a pretrained base) instead of fresh weights")
    g.add_argument("--demos", type=int, default=None, help="noisy expert demo episodes")
    g.add_argument("--demo-noise", type=float, default=None, help="expert noise std (m)")
    g.add_argument("--sft-steps", type=int, default=None)
    g.add_argument("--ema", type=float, default=None, help="SFT weight-EMA decay (0 = off)")
    g.add_argument("--success-only", default=None, type=lambda v: v.lower() in ("1", "true", "yes"),
                   metavar="0|1", help="SFT on the successful demos only")
    g.add_argument("--sft-batch", type=int, default=64)
    g.add_argument("--sft-lr", type=float, default=1e-3)
    g = p.add_argument_group("rounds")
    g.add_argument("--rounds", type=int, default=2)
    # defaults sized so that 2 rounds fit ~30 min on 2 shared CPU cores (docs/RESULTS.md, loop on sim time):
    # episodes run at ~1.9x
    # real time (a failure lasts the whole 25 sim-s, a success ~5), the critic costs ~0.2 s per update, the actor ~0.2 s
    g.add_argument("--rollouts", type=int, default=20, help="policy rollouts collected through ROS per round")
    g.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes through ROS per round "
                   "(round 0 = SFT included)")
    g.add_argument("--eval-noise-scale", type=float, default=1.0, metavar="S",
                   help="evaluation episodes sample each chunk from x_1 = S * eps (policy_node's noise_scale): 1 "
                        "(default) as trained, 0 deterministically; rollouts are always collected at 1")
    g.add_argument("--episode-time", type=float, default=max(TIME_LIMIT_S.values()), help="robot s per episode")
    g.add_argument("--real-time-factor", type=float, default=2.0,
                   help="sim seconds per wall second (the graph runs on sim time; the sim waits for a late chunk, "
                   "sim_node lockstep). 2 kept the control loop healthy on 2 shared cores, 3-4 did not under load "
                   "(bench/loop_rtf.py, docs/RESULTS.md, loop on sim time)")
    g.add_argument("--image-size", type=int, default=64, help="camera images (px, square, even) recorded")
    g = p.add_argument_group("Q-VGM (default: bench/learning.py's settings)")
    g.add_argument("--critic-steps", type=int, default=1500,
                   help="critic updates per round (the benchmark: 3000; on the loop's rollouts the held-out MC-return "
                   "correlation rose from 0.57 at 800 to 0.73 at 2000, bench/loop_critic.py)")
    g.add_argument("--critic-rollout-fraction", type=float, default=0.0,
                   help="share of every critic batch drawn from the policy's rollouts (the buffer's non-demo "
                   "episodes); 0 = uniform over all transitions")
    g.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    g.add_argument("--critic-batch", type=int, default=256)
    g.add_argument("--reg-weight", type=float, default=0.1, help="Cal-QL regulariser weight w")
    g.add_argument("--actor-steps", type=int, default=300)
    g.add_argument("--actor-lr", type=float, default=1e-4)
    g.add_argument("--actor-batch", type=int, default=64)
    g.add_argument("--ascent-lr", type=float, default=None,
                   help="Q-VGM ascent step alpha (default: the task's, critic_trainer.recipes.qvgm_ascent_lr)")
    g.add_argument("--gate-m", type=int, default=5, help="Q-VGM gate: the last M of K denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of the offline stages (SFT, Q-VGM; the ROS graph is idle then); the "
                   "ROS stages run with 1. 2 only pays on an idle machine: with other jobs on the 2 cores an SFT "
                   "step took 0.4-1.1 s with 2 threads vs 0.07-0.15 s with 1 (docs/RESULTS.md, loop section)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars in SFT / Q-VGM (stage lines stay)")
    return p


def resolve_recipe(args: argparse.Namespace) -> None:
    """Fill the SFT settings and the Q-VGM ascent step not given on the command line from the task's recipe
    (critic_trainer.recipes); the StateConfig flags apply to the `state` backbone only (args.sft_overrides)."""
    from critic_trainer.recipes import qvgm_ascent_lr, sft_recipe

    r = sft_recipe(args.task)
    for key in ("demos", "demo_noise", "sft_steps", "ema", "success_only"):
        if getattr(args, key) is None:
            setattr(args, key, r[key])
    if args.ascent_lr is None:
        args.ascent_lr = qvgm_ascent_lr(args.task)
    if args.backbone is None:
        if args.sft_init is not None:
            from critic_trainer.sft import base_config_name

            args.backbone = base_config_name(args.sft_init)
        else:
            args.backbone = "state"
    # the recipe's StateConfig flags shape fresh `state` weights; a checkpoint to fine-tune brings its own architecture
    args.sft_overrides = dict(r["state_flags"]) if args.backbone == "state" and args.sft_init is None else {}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = build_parser()
    args = p.parse_args(argv)
    if args.sft_init is not None and not (args.sft_init / "manifest.json").is_file():
        p.error(f"--sft-init {args.sft_init}: not a checkpoint directory (no manifest.json)")
    resolve_recipe(args)
    if min(args.demos, args.sft_steps, args.rollouts, args.eval_episodes, args.rounds, args.threads) < 1 \
            or args.image_size % 2:
        p.error("sizes must be >= 1 and --image-size even")
    if not 0.0 <= args.critic_rollout_fraction < 1.0:
        p.error("--critic-rollout-fraction must be in [0, 1)")
    if not args.episode_time > 0:
        p.error("--episode-time must be > 0")
    if not args.real_time_factor > 0:
        p.error("--real-time-factor must be > 0")
    if not np.isfinite(args.eval_noise_scale) or args.eval_noise_scale < 0:
        p.error("--eval-noise-scale must be finite and >= 0")
    torch.set_num_threads(1)  # the ROS stages (policy inference beside the sim); offline stages use --threads

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGINT (even when a launching shell ignored it, as for `cmd &`) and SIGTERM both stop cleanly
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        run_loop(args)
    except KeyboardInterrupt:
        print(f"[loop] interrupted: stages finished so far are in {Path(args.work) / STATE_FILE}; "
              "run again with the same --work to resume", flush=True)
        return 130
    except (ValueError, RuntimeError, TimeoutError, FileNotFoundError) as exc:
        print(f"[loop] failed: {type(exc).__name__}: {exc} (finished stages are kept; fix and rerun to resume)",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

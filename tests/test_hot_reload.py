"""Hot reload in the running policy node over real DDS, with the real sim_node and tiny real checkpoints in a
CheckpointStore: v1 serves, v2 swaps in at a chunk boundary with no missed control tick, ~/rollback, and every
bad checkpoint (hash mismatch, truncated, NaN, wrong shape, pickle file, corrupt safetensors) is refused with a
/diagnostics entry while the serving version keeps serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy")
torch = pytest.importorskip("torch")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from qvgm.checkpoints import CheckpointStore, write_manifest  # noqa: E402
from qvgm.policy import NormStats, make_policy  # noqa: E402
from qvgm.policy.checkpoint_io import write_policy_files  # noqa: E402
from qvgm_policy_node import topics  # noqa: E402
from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.profile import NodeSpec  # noqa: E402
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
HOME = np.array([0.0, -0.4, 0.9, 0.0, 0.9, 0.0, 0.02])


def write_checkpoint(directory: Path, seed: int, **overrides: Any) -> None:
    """A tiny untrained `state` FlowPolicy (7 joints, horizon 10) whose actions stay near HOME."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = int(overrides.get("state_dim", 7))
    stats = NormStats.compute(HOME[:dim] + rng.normal(size=(64, dim)) * 0.05,
                              HOME + rng.normal(size=(64, 7)) * 0.02)
    cfg = dict(state_dim=7, real_action_dim=7, horizon=10, hidden=32, embed_dim=16, head_hidden=32, head_depth=1)
    cfg.update(overrides)
    write_policy_files(make_policy("state", stats, **cfg), directory)


def publish(store: CheckpointStore, seed: int, **overrides: Any) -> str:
    with store.writing() as staged:
        write_checkpoint(staged.path, seed, **overrides)
    assert staged.version is not None
    return staged.version


def _nan(d: Path) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 2)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / "model.safetensors"))
    write_manifest(d, d.name, None)  # hashes match: only the NaN check can catch it


def _hash_mismatch(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))


def _truncated(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle(d: Path) -> None:
    torch.save({"w": torch.zeros(2)}, d / "model.pt")  # written, never loaded


def _garbage(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    write_manifest(d, d.name, None)


# name -> (checkpoint overrides, mutation of the published directory, words the refusal must contain)
BAD = {
    "hash_mismatch": ({}, _hash_mismatch, "sha256 mismatch"),
    "truncated": ({}, _truncated, "sha256 mismatch"),
    "pickle": ({}, _pickle, "pickle"),
    "corrupt_safetensors": ({}, _garbage, "unreadable safetensors"),
    "nan": ({}, _nan, "NaN"),
    "wrong_state_dim": ({"state_dim": 6}, None, "state_dim"),
}


def inject_bad(store: CheckpointStore, seed: int, overrides: dict[str, Any], mutate: Any) -> str:
    """Publish a version as a faulty writer would leave it, then point CURRENT at it."""
    with store.writing(make_current=False) as staged:
        write_checkpoint(staged.path, seed, **overrides)
    version = staged.version
    assert version is not None
    if mutate is not None:
        mutate(store.path(version))
    with store._writer_lock():  # switch like a foreign writer: no manifest check
        store._switch_locked(version)
    return version


SIM = {"cameras": [], "control_hz": 10.0, "joint_state_hz": 50.0, "physics_hz": 500.0}


def policy_params(store_root: Path, **extra: Any) -> dict[str, Any]:
    params = {"backend": "flow", "checkpoint_store": str(store_root), "cameras": [], "num_steps": 3, "seed": 0,
              "chunk_dt": 0.1, "async_start_fraction": 0.5, "reload_watch": "inotify", "reload_budget_s": 1.0,
              "max_image_age": 0.5}
    params.update(extra)
    return params


def test_hot_reload_swap_rollback_and_bad_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    v1 = publish(store, 1)
    chunks: list[JointTrajectory] = []
    versions: list[str] = []
    diag: list[DiagnosticArray] = []
    specs = [NodeSpec("sim_node", "sim_node", SIM),
             NodeSpec("policy_node", "policy_node", policy_params(store.root, noise_scale=0.5))]
    with Graph(specs) as g:
        policy, sim = g.nodes["policy_node"], g.nodes["sim_node"]
        io = g.node("reload_test_io")
        io.create_subscription(JointTrajectory, topics.TRAJECTORY, chunks.append, 10)
        io.create_subscription(String, topics.POLICY_VERSION, lambda m: versions.append(m.data), TRANSIENT_LOCAL)
        io.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, diag.append, 10)
        io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL).publish(String(data="pick the cube"))

        assert g.spin_until(lambda: policy.published_versions.count(v1) >= 3, 20), (dict(policy.skipped),
                                                                                   policy.backend.diagnostic_values())
        assert g.spin_until(lambda: versions and versions[-1] == v1, 5)
        msg = chunks[-1]
        assert len(msg.points) >= 9 and len(msg.points[0].velocities) == 7  # whole chunk, velocities for cubic
        assert msg.header.stamp.sec > 0  # stamped with the observation time

        # v2 published by the trainer: swapped in at a chunk boundary, every later chunk is v2
        v2 = publish(store, 2)
        assert g.spin_until(lambda: policy.published_versions.count(v2) >= 3, 20), \
            policy.backend.diagnostic_values()
        first = policy.published_versions.index(v2)
        assert set(policy.published_versions[first:]) == {v2}
        assert set(policy.published_versions[:first]) == {v1}
        assert g.spin_until(lambda: versions[-1] == v2, 5)
        assert policy.backend.current.noise_scale == 0.5  # a hot-reloaded version keeps the node's noise scale
        assert policy.stats["missed_ticks"] == 0 and policy.stats["dropped_chunks"] == 0
        assert policy.stats["swaps"] == 2
        assert sim.accepted >= policy.published - 1, (sim.accepted, policy.published)
        assert not {k: v for k, v in sim.rejected.items() if k != "before_reset"}, dict(sim.rejected)

        # ~/rollback: the store's CURRENT goes back to v1 and the node serves v1 again
        rollback = io.create_client(Trigger, "/policy_node/rollback")
        reply = g.call(rollback, Trigger.Request())
        assert reply.success, reply.message
        assert store.current() == v1
        n = len(policy.published_versions)
        assert g.spin_until(lambda: policy.published_versions[n:].count(v1) >= 2, 20)
        policy.backend.set_noise_scale(0.25)  # what the node's parameter callback calls at run time
        assert policy.backend.current.noise_scale == 0.25
        v3 = publish(store, 3)
        assert g.spin_until(lambda: policy.published_versions.count(v3) >= 2, 20)
        assert policy.backend.current.noise_scale == 0.25  # versions swapped in later serve the changed scale

        # each bad checkpoint is refused with a clear reason; v3 keeps serving without a gap
        for seed, (name, (overrides, mutate, words)) in enumerate(BAD.items(), start=10):
            bad = inject_bad(store, seed, dict(overrides), mutate)
            assert g.spin_until(lambda bad=bad: bad in policy.backend.reloader.refused, 20), name
            reason = policy.backend.reloader.refused[bad]
            assert words in reason, (name, reason)
            n = len(policy.published_versions)
            assert g.spin_until(lambda n=n: len(policy.published_versions) >= n + 1, 5), name
            assert policy.version == v3, name
        assert policy.stats["missed_ticks"] == 0, dict(policy.stats)

        # /diagnostics names the refusal and the serving version
        def reload_status() -> dict[str, str] | None:
            for d in reversed(diag):
                for st in d.status:
                    if st.name == "qvgm/policy_node":
                        return {kv.key: kv.value for kv in st.values}
            return None

        diag.clear()
        assert g.spin_until(lambda: reload_status() is not None, 5)
        values = reload_status()
        assert values is not None
        assert values["version"] == v3 and values["reload.serving"] == v3
        assert "refused" in values["reload.last_error"] and int(values["reload.refused"]) == len(BAD)
        assert float(values["inference_latency_s.p95"]) > 0
        assert values["noise_scale"] == "0.25"  # the sampling-noise scale set at run time above

        # ~/reload of a refused CURRENT retries it and refuses it again; still serving v3
        reply = g.call(io.create_client(Trigger, "/policy_node/reload"), Trigger.Request())
        assert reply.success
        g.spin_for(0.5)
        assert policy.version == v3


def test_reload_under_load_with_a_publisher_process(tmp_path: Path) -> None:
    """A separate process (the trainer) publishes 4 versions into the store (keep_last=3, so retention prunes
    while the node loads) while the node drives the sim: the node ends up serving the last one, only ever swaps
    forward, never refuses a good version, and its chunk versions change only at chunk boundaries."""
    store = CheckpointStore(tmp_path / "store", keep_last=3)
    v1 = publish(store, 1)
    specs = [NodeSpec("sim_node", "sim_node", SIM),
             NodeSpec("policy_node", "policy_node", policy_params(store.root))]
    with Graph(specs) as g:
        policy = g.nodes["policy_node"]
        io = g.node("reload_load_io")
        io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL).publish(String(data="pick the cube"))
        assert g.spin_until(lambda: v1 in policy.published_versions, 20)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, __file__, "publish", str(store.root), "4", "0.4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        try:
            assert g.spin_until(lambda: proc.poll() is not None, 60)
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            published = out.split()
            assert len(published) == 4
            assert g.spin_until(lambda: policy.version == published[-1], 20), policy.backend.diagnostic_values()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        served = [v for i, v in enumerate(policy.published_versions) if i == 0 or v != policy.published_versions[i - 1]]
        assert served == sorted(served) and set(served) <= {v1, *published}
        assert policy.backend.reloader.counters["refused"] == 0
        assert policy.stats["dropped_chunks"] == 0


def _publisher(root: str, count: int, interval: float) -> None:
    store = CheckpointStore(root, keep_last=3)
    for i in range(count):
        time.sleep(interval)
        print(publish(store, 100 + i), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        _publisher(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")

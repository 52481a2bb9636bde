"""Device selection (qvgm.devices.resolve_device) and the trainers on CUDA.

The CPU tests run everywhere. The CUDA tests run where torch sees a GPU (skipped in CI, which has none; run them
on a GPU machine with `pytest tests/test_devices.py`): SFT, `critic_trainer qvgm` and the policy forward on
cuda agree with the CPU within float tolerance, and the published checkpoints load back on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import FAST, tiny_policy, write_buffer

from critic_trainer.sft import SFTConfig, train_sft
from qvgm.devices import resolve_device
from qvgm.policy import NormStats, load_policy, make_policy, save_policy

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STATE_TINY = {"hidden": 32, "embed_dim": 16, "head_hidden": 64, "head_depth": 2, "time_dim": 16, "horizon": 6}


def cli(argv: list[str]) -> int:
    from critic_trainer import cli as C

    return C.main(argv)


def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", ""):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dev")
    return {"buffer": write_buffer(tmp / "buf", [True, False, True, False, True]), "policy": tiny_policy(tmp),
            "tmp": tmp}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_cuda_without_a_gpu(data, tmp_path, capsys):
    out = tmp_path / "new"
    rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), "--out", str(out),
              "--n-exec", "3", "--device", "cuda", *FAST])
    assert rc == 2 and not out.exists()
    assert "no CUDA device" in capsys.readouterr().err
    rc = cli(["sft", "--dataset", str(data["buffer"]), "--out", str(tmp_path / "sft"), "--steps", "2",
              "--device", "cuda", "--no-progress"])
    assert rc == 2 and not (tmp_path / "sft").exists()
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no CUDA device"):
        load_policy(data["policy"], device="cuda")


@cuda
def test_policy_forward_on_cuda_matches_cpu(tmp_path):
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.uniform(-0.5, 0.5, (64, 7)), rng.uniform(-0.8, 0.8, (64, 7)))
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", stats, tasks=["push the red cube"], state_dim=7, real_action_dim=7,
                      camera_names=["front"])
    save_policy(pol, tmp_path / "ck", version="tiny-v1")
    cpu, gpu = load_policy(tmp_path / "ck"), load_policy(tmp_path / "ck", device="cuda")
    assert gpu.device.type == "cuda" and all(p.is_cuda for p in gpu.parameters())
    obs = [{"images": {"front": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)},
            "state": rng.uniform(-0.5, 0.5, 7).astype(np.float32), "prompt": "push the red cube", "stamp": 0.0}]
    noise = torch.randn(1, cpu.horizon, cpu.action_dim)
    a_cpu = cpu.act(obs, noise=noise)
    a_gpu = gpu.act(obs, noise=noise)
    np.testing.assert_allclose(a_gpu, a_cpu, rtol=1e-3, atol=1e-3)
    bf = load_policy(tmp_path / "ck", device="cuda", dtype=torch.bfloat16)
    a_bf = bf.act(obs, noise=noise.to(torch.bfloat16))
    assert np.isfinite(a_bf).all() and np.abs(a_bf - a_cpu).max() < 0.1 * (np.abs(a_cpu).max() + 1.0)


@cuda
def test_sft_on_cuda_matches_cpu_and_loads_on_cpu(data, tmp_path):
    res = {}
    for name, dev, seed in (("cpu", "cpu", 3), ("cuda", "cuda", 3), ("cpu-other-seed", "cpu", 4)):
        cfg = SFTConfig(datasets=[str(data["buffer"])], config="state", out=str(tmp_path / f"sft-{name}"), steps=20,
                        batch_size=16, seed=seed, checkpoint_every=10, overrides=dict(STATE_TINY), device=dev)
        res[name] = train_sft(cfg, progress=False)
    assert res["cuda"]["manifest"]["summary"]["device"].startswith("cuda")
    assert res["cpu"]["final_loss"] == pytest.approx(res["cuda"]["final_loss"], rel=1e-2)
    w = {n: torch.cat([v.flatten() for v in load_policy(tmp_path / f"sft-{n}").state_dict().values()])
         for n in res}  # a CUDA-trained checkpoint loads on the CPU
    same_seed, other_seed = (w["cpu"] - w["cuda"]).norm(), (w["cpu"] - w["cpu-other-seed"]).norm()
    assert same_seed < 0.01 * other_seed, (same_seed, other_seed)  # same init and batches on both devices


@cuda
def test_critic_trainer_qvgm_on_cuda(data, tmp_path):
    out = tmp_path / "new"
    rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), "--out", str(out),
              "--n-exec", "3", "--device", "cuda", *FAST])
    assert rc == 0
    pol = load_policy(out)
    s = pol.manifest["summary"]
    assert s["device"].startswith("cuda") and np.isfinite(s["critic"]["eval"]["mc_corr"])
    assert all(torch.isfinite(v).all() for v in pol.state_dict().values())
    summary = json.loads((Path(str(out) + ".work") / "summary.json").read_text())
    assert summary["actor"]["q_policy_after"] == pytest.approx(s["actor"]["q_policy_after"])
    for method in ("dql", "qdistill"):
        rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]),
                  "--out", str(tmp_path / method), "--n-exec", "3", "--device", "cuda", "--method", method, *FAST])
        assert rc == 0 and load_policy(tmp_path / method).manifest["summary"]["device"].startswith("cuda")


def _tiny_pi05(tmp_path: Path, device: str) -> tuple:
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.uniform(-0.5, 0.5, (64, 7)), rng.uniform(-0.8, 0.8, (64, 7)))
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", stats, tasks=["push the red cube", "open the drawer"], state_dim=7,
                      real_action_dim=7, camera_names=["front"])
    save_policy(pol, tmp_path / "ck", version="tiny-v1")

    def obs(seed: int, prompt: str = "push the red cube") -> dict:
        r = np.random.default_rng(seed)
        return {"images": {"front": r.integers(0, 256, (48, 64, 3), dtype=np.uint8)},
                "state": r.uniform(-0.5, 0.5, 7).astype(np.float32), "prompt": prompt, "stamp": 0.0}

    return load_policy(tmp_path / "ck", device=device), obs


@cuda
def test_cuda_graph_sampling_matches_eager(tmp_path):
    from qvgm.policy.backend import FlowPolicyBackend
    from qvgm.policy.cuda_graph import CAPTURED

    pol, obs = _tiny_pi05(tmp_path, "cuda")
    assert not pol.cuda_graphs  # opt-in on the policy; FlowPolicyBackend turns it on
    noise = [torch.randn(1, pol.horizon, pol.action_dim) for _ in range(3)]
    eager = [pol.act([obs(i, p)], noise=n) for i, (p, n) in
             enumerate(zip(["push the red cube", "open the drawer", "push the red cube"], noise, strict=True))]
    pol.cuda_graphs = True
    graphed = [pol.act([obs(i, p)], noise=n) for i, (p, n) in
               enumerate(zip(["push the red cube", "open the drawer", "push the red cube"], noise, strict=True))]
    for e, g in zip(eager, graphed, strict=True):  # new observation/prompt/noise each call: nothing stale
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    assert len(CAPTURED[pol]) == 1  # one capture, replayed three times
    two = pol.act([obs(5), obs(6)], noise=torch.cat(noise[:2]))  # another batch size -> its own capture
    assert two.shape == (2, pol.horizon, 7) and len(CAPTURED[pol]) == 2
    pol.cuda_graphs = False
    np.testing.assert_allclose(two, pol.act([obs(5), obs(6)], noise=torch.cat(noise[:2])), rtol=1e-4, atol=1e-5)
    # the policy node's backend: graphs on by default on CUDA, same chunk as eager sampling with the same seed
    be_graph = FlowPolicyBackend(pol, [f"j{i}" for i in range(7)], dt=0.1, seed=7)
    a = be_graph.infer(obs(9)).positions
    be_eager = FlowPolicyBackend(load_policy(tmp_path / "ck", device="cuda"), [f"j{i}" for i in range(7)], dt=0.1,
                                 seed=7, cuda_graphs=False)
    np.testing.assert_allclose(a, be_eager.infer(obs(9)).positions, rtol=1e-4, atol=1e-5)
    # weights recast after a capture -> a fresh capture, not a replay of stale weights
    pol.cuda_graphs = True
    n_before = len(CAPTURED[pol])
    bf = pol.to(torch.bfloat16)
    out = bf.act([obs(1)], noise=noise[0])
    assert np.isfinite(out).all() and len(CAPTURED[bf]) == n_before + 1

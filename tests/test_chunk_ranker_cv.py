"""bench/chunk_ranker_cv.py: the cross-validated ranker finds a planted within-state signal, finds nothing where
there is none, never sees a held-out state's outcomes, and runs end to end on a real ground-truth file."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_critic_ground_truth import N_EXEC, G, tiny_critic, tiny_policy  # noqa: E402

from critic_trainer.pipeline import save_critic  # noqa: E402
from qvgm.policy import save_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_probe():
    spec = importlib.util.spec_from_file_location("chunk_ranker_cv", ROOT / "bench" / "chunk_ranker_cv.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


P = load_probe()


def synthetic(n_states: int, signal: float, bilinear: bool = False, seed: int = 0) -> list[dict]:
    """States of 8 candidates, 6 action dims, 4 state features; p_i = 0.5 + signal * (direction . d_i), the
    direction fixed (linear) or flipped by the sign of z[0] (bilinear), clipped to [0, 1], then 8 Bernoulli draws."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=6)
    w /= np.linalg.norm(w)
    out = []
    for _ in range(n_states):
        a = rng.normal(size=(8, 6))
        d = a - a.mean(0)
        z = rng.normal(size=4)
        direction = w * (np.sign(z[0]) if bilinear else 1.0)
        true = np.clip(0.5 + signal * d @ direction, 0.0, 1.0)
        p = rng.binomial(8, true) / 8.0
        out.append({"d": d, "z": z, "p": p, "true": true})
    return out


def test_design_and_ridge_by_hand() -> None:
    d = np.array([[1.0, -1.0], [-1.0, 1.0]])
    z = np.array([2.0, 3.0])
    assert np.array_equal(P.design("linear", d, z), d)
    assert np.array_equal(P.design("bilinear", d, z)[0], [1.0, 2.0, 3.0, -1.0, -2.0, -3.0])
    with pytest.raises(ValueError, match="unknown model"):
        P.design("mlp", d, z)
    x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = np.array([1.0, 2.0, 0.5])
    alpha = 0.3
    primal = np.linalg.inv(x.T @ x + alpha * np.eye(2)) @ x.T @ y
    assert np.allclose(P.fit_ridge(x, y, alpha), primal)
    wide = np.hstack([x, x ** 2, x + 1.0])  # 6 features > 3 rows: the dual form gives the same weights
    assert np.allclose(P.fit_ridge(wide, y, alpha), np.linalg.inv(wide.T @ wide + alpha * np.eye(6)) @ wide.T @ y)
    assert P.gain(np.array([0.1, 0.9, 0.9]), np.array([0.0, 1.0, 0.5])) == pytest.approx(0.75 - 0.5)


def test_finds_a_planted_signal_and_nothing_where_there_is_none() -> None:
    planted = P.cross_validated(synthetic(120, 0.25), "linear", k=5, repeats=2, boot=300)
    assert planted["gain"]["ci95"][0] > 0.05
    flipped = synthetic(160, 0.25, bilinear=True, seed=1)
    lin = P.cross_validated(flipped, "linear", k=5, repeats=2, boot=300)
    bil = P.cross_validated(flipped, "bilinear", k=5, repeats=2, boot=300)
    assert bil["gain"]["ci95"][0] > 0.0 and bil["gain"]["mean"] > lin["gain"]["mean"] + 0.05
    null = P.cross_validated(synthetic(200, 0.0), "bilinear", k=5, repeats=2, boot=300)
    assert abs(null["gain"]["mean"]) < 0.03 and null["gain"]["ci95"][1] > 0.0
    assert null["in_sample_gain"] > null["gain"]["mean"]  # it fits its training noise, held out it does not carry


def test_held_out_states_are_never_trained_on() -> None:
    """Leave one state out (k = n): state 5's choice comes from a model fit on the other 11 states alone, so
    changing state 5's outcomes changes only how that same choice is judged."""
    states = synthetic(12, 0.25, seed=3)
    poked = [dict(s) for s in states]
    poked[5] = {**poked[5], "p": poked[5]["p"][::-1].copy()}
    base = P.cross_validated(states, "linear", k=12, repeats=1, boot=50)
    again = P.cross_validated(poked, "linear", k=12, repeats=1, boot=50)
    train = np.setdiff1d(np.arange(12), [5])  # by hand: inner leave-one-out on the other 11 picks the ridge strength
    alpha = P.choose_alpha(states, train, "linear", 12, np.random.default_rng(0))
    x, y = P._stack(states, train, "linear")
    pred = states[5]["d"] @ P.fit_ridge(x, y, alpha)
    assert base["per_state"][5] == pytest.approx(P.gain(pred, states[5]["p"]))
    assert again["per_state"][5] == pytest.approx(P.gain(pred, poked[5]["p"]))


def test_end_to_end_on_a_ground_truth_file(tmp_path: Path) -> None:
    """A real ground-truth measurement (tiny SFT, MuJoCo) -> the probe re-draws its candidates and fits."""
    work = tmp_path / "w"
    save_policy(tiny_policy(0), work / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    (work / "critic-push-s0-abc").mkdir()
    save_critic(tiny_critic(0), work / "critic-push-s0-abc", extra={"features": "rl-token"})
    gt = tmp_path / "gt.json"
    G.main(["--work", str(work), "--task", "push", "--seeds", "0", "--states", "3", "--n", "3", "--reps", "2",
            "--n-exec", str(N_EXEC), "--check-replay", "0", "--boot", "50", "--out", str(gt),
            "--max-episode-steps", "12", "--candidate-offset", "0.3"])  # the probe must re-draw the offsets too
    out = tmp_path / "probe.json"
    res = P.main([str(gt), "--work", str(work), "--folds", "3", "--repeats", "1", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["states"] == 3 and on_disk["candidates"] == 3
    assert on_disk["action_features"] == N_EXEC * 7 and on_disk["state_features"] == 7 + 21
    assert set(res["models"]) == {"linear", "bilinear"} and len(res["models"]["linear"]["per_state"]) == 3
    other = tmp_path / "w2"
    save_policy(tiny_policy(1), other / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    with pytest.raises(SystemExit, match="do not reproduce"):
        P.main([str(gt), "--work", str(other)])

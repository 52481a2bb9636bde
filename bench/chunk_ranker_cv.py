"""Can ANY model learn to rank the policy's own chunks at a state from direct outcome data? JSON to stdout (+ --out).

The ground-truth bench (bench/critic_ground_truth.py) measures, at fixed branch states, the success probability
p_i of each of N candidate chunks of the SFT policy (R continuations each) and finds that no TD-trained critic
ranks them better than chance although an oracle gains +0.05 per decision. This probe asks whether the ranking
is learnable from (state, chunk) at that data size when the model is trained on the outcomes themselves,
which is far more direct supervision than a critic ever gets: grouped K-fold over states, a ridge regression of
the within-state centred success y_i = p_i - mean_j p_j on the within-state centred chunk, then best-of-N on the
held-out states (p at the argmax of the prediction, ties averaged, minus mean p: the critic_gain of the ground-truth
bench, judged by outcomes the model never saw).

Models (features of candidate i at state s; d = a_i - mean_j a_j, the normalised critic action of the first
n_exec steps, [n_exec * real]; z = the state features of the SFT policy, standardised):
  - `linear`:   y ~ w . d                  (one "better direction" for every state)
  - `bilinear`: y ~ w . (d (x) [1, z])     (the direction depends linearly on the state)
The ridge strength is chosen by an inner grouped K-fold on the training states only (never on the held-out ones).
Also `in_sample`: the same models judged on their own training states (capacity, not a result).

Inputs: result files of critic_ground_truth.py and the --work dir holding each seed's SFT checkpoint (the one
that measured them: the episodes and candidates are re-drawn and checked to reproduce, as `--rescore`).

    .venv/bin/python bench/chunk_ranker_cv.py GT1.json GT2.json --work W --out probe.json

Flow-time convention (openpi): t = 1 noise, t = 0 clean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from critic_ground_truth import bootstrap_mean, redraw_stored, stored_sft  # noqa: E402

from critic_trainer.features import critic_state_features  # noqa: E402
from critic_trainer.pipeline import policy_observation  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def design(kind: str, d: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Rows of one state's candidates: d [N, A] centred actions, z [F] state features -> [N, P]."""
    if kind == "linear":
        return d
    if kind == "bilinear":
        zz = np.concatenate([[1.0], z])
        return (d[:, :, None] * zz[None, None, :]).reshape(len(d), -1)
    raise ValueError(f"unknown model {kind!r} (linear, bilinear)")


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge weights [P] without intercept (targets and inputs are within-state centred)."""
    p = x.shape[1]
    if p > len(x):  # dual form: cheaper and exact when features outnumber rows
        return x.T @ np.linalg.solve(x @ x.T + alpha * np.eye(len(x)), y)
    return np.linalg.solve(x.T @ x + alpha * np.eye(p), x.T @ y)


def gain(pred: np.ndarray, p: np.ndarray) -> float:
    """p at the argmax set of pred (ties averaged) minus mean p."""
    top = pred >= pred.max() - 1e-12
    return float(p[top].mean() - p.mean())


def _stack(states: list[dict[str, Any]], idx: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    xs = [design(kind, states[i]["d"], states[i]["z"]) for i in idx]
    ys = [states[i]["p"] - states[i]["p"].mean() for i in idx]
    return np.concatenate(xs), np.concatenate(ys)


def folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [f for f in np.array_split(rng.permutation(n), min(k, n)) if len(f)]


def choose_alpha(states: list[dict[str, Any]], idx: np.ndarray, kind: str, k: int, rng: np.random.Generator) -> float:
    """The ridge strength with the best mean best-of-N gain over an inner grouped K-fold of `idx` (ties: larger)."""
    scores = {a: [] for a in ALPHAS}
    for f in folds(len(idx), k, rng):
        test, train = idx[f], np.setdiff1d(idx, idx[f])
        x, y = _stack(states, train, kind)
        for a in ALPHAS:
            w = fit_ridge(x, y, a)
            scores[a] += [gain(design(kind, states[i]["d"], states[i]["z"]) @ w, states[i]["p"]) for i in test]
    return max(ALPHAS, key=lambda a: (float(np.mean(scores[a])), a))


def cross_validated(states: list[dict[str, Any]], kind: str, k: int = 10, repeats: int = 5, seed: int = 0,
                    boot: int = 2000) -> dict[str, Any]:
    """Grouped K-fold (states are the groups) x `repeats` shuffles: per state the mean held-out best-of-N gain over
    the repeats; bootstrap CI over states. Also the gain on the training states (in_sample) and the alphas chosen."""
    rng = np.random.default_rng(seed)
    n = len(states)
    held = np.zeros((repeats, n))
    fitted, chosen = [], []
    for r in range(repeats):
        for f in folds(n, k, rng):
            train = np.setdiff1d(np.arange(n), f)
            alpha = choose_alpha(states, train, kind, k, rng)
            chosen.append(alpha)
            x, y = _stack(states, train, kind)
            w = fit_ridge(x, y, alpha)
            for i in f:
                held[r, i] = gain(design(kind, states[i]["d"], states[i]["z"]) @ w, states[i]["p"])
            fitted.append(float(np.mean([gain(design(kind, states[i]["d"], states[i]["z"]) @ w, states[i]["p"])
                                         for i in train])))
    per_state = held.mean(0)
    room = [i for i, s in enumerate(states) if np.ptp(s["p"]) > 0]
    return {"model": kind, "folds": k, "repeats": repeats,
            "gain": bootstrap_mean(per_state.tolist(), np.random.default_rng(7), boot),
            "gain_states_with_room": bootstrap_mean(per_state[room].tolist(), np.random.default_rng(7), boot),
            "in_sample_gain": float(np.mean(fitted)),
            "alphas_chosen": {str(a): chosen.count(a) for a in ALPHAS if a in chosen},
            "per_state": per_state.tolist()}


@torch.no_grad()
def collect(paths: list[Path], work: Path, features: str, log: Any = print) -> list[dict[str, Any]]:
    """Per stored state: the candidates re-drawn (as critic_ground_truth --rescore, checked to reproduce); returns
    dicts with d [N, A] (centred normalised critic actions), z [F] (state features), p [N] (stored outcomes)."""
    from qvgm.policy import load_policy

    out: list[dict[str, Any]] = []
    for path in paths:
        r = json.loads(Path(path).read_text())
        for seed_key, sr in r["seeds"].items():
            seed = int(seed_key)
            policy = load_policy(stored_sft(work, path, r["task"], seed, sr)).eval()
            for st, obs, cand in redraw_stored(policy, r, seed, sr["states"]):
                inputs = policy.preprocess([policy_observation(obs)])
                z = critic_state_features(policy, policy.encode(inputs), inputs, features)[0].numpy()
                a = cand["critic_action"].astype(np.float64)
                out.append({"seed": seed, "scene_seed": int(st["scene_seed"]), "branch_step": int(st["branch_step"]),
                            "d": a - a.mean(0), "z": z.astype(np.float64),
                            "p": np.asarray(st["outcomes"], float).mean(1)})
                log(json.dumps({"seed": seed, "scene": out[-1]["scene_seed"], "collected": len(out)}))
    zs = np.stack([s["z"] for s in out])
    mu, sd = zs.mean(0), zs.std(0) + 1e-6
    for s in out:
        s["z"] = (s["z"] - mu) / sd
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="critic_ground_truth.py result files")
    ap.add_argument("--work", type=Path, required=True, help="holds sft-<task>-s<seed>-* of each file's seeds")
    ap.add_argument("--features", default="pooled", help="state features: pooled (state tier: state + privileged) "
                                                          "or rl-token")
    ap.add_argument("--models", nargs="+", default=["linear", "bilinear"])
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    states = collect(args.results, args.work, args.features, log=lambda m: print(m, file=sys.stderr, flush=True))
    res: dict[str, Any] = {"bench": "chunk_ranker_cv", "results": [str(p) for p in args.results],
                           "settings": {k: ([str(x) for x in v] if k == "results" else str(v) if isinstance(v, Path)
                                        else v) for k, v in vars(args).items()},
                           "states": len(states), "candidates": int(states[0]["d"].shape[0]),
                           "action_features": int(states[0]["d"].shape[1]), "state_features": int(len(states[0]["z"])),
                           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "models": {}}
    for kind in args.models:
        res["models"][kind] = cross_validated(states, kind, args.folds, args.repeats, args.seed)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=1)
    print(json.dumps({k: ({m: {kk: vv for kk, vv in v.items() if kk != "per_state"} for m, v in res["models"].items()}
                          if k == "models" else v) for k, v in res.items()}, indent=1))
    if args.out:
        args.out.write_text(text)
    return res


if __name__ == "__main__":
    main()

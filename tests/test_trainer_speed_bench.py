"""bench/trainer_speed.py runs and reports every figure (the speeds themselves are in docs/RESULTS.md and
docs/RESULTS.md, trainer speed section)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "trainer_speed.py"


def _git_head() -> bool:
    r = subprocess.run(["git", "cat-file", "-e", "HEAD:critic_trainer/critic.py"], cwd=ROOT, capture_output=True)
    return r.returncode == 0


def test_trainer_speed_bench_state(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("trainer_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    before = ["--critic-before", "HEAD"] if _git_head() else []  # the critic as committed, loaded from git
    try:
        out = mod.main(["--configs", "state", "--reps", "2", "--warmup", "0", "--critic-batch", "32",
                        "--actor-batch", "4", "--critic-threads", "1", "--steps-per-sample", "2", "--phases", *before,
                        "--out", str(tmp_path / "speed.json")])
    finally:
        torch.set_num_threads(n)
    (r,) = out["results"]
    assert r["config"] == "state" and r["params"] > 0
    for key in ("critic_updates_per_s", "qvgm_update_s", "dql_update_s", "dql_over_qvgm", "qvgm_s2_update_s",
                "dql_over_qvgm_s2", "qvgm_over_qvgm_s2", "load_avg_1min_before_actor", "sft_update_s",
                "qvgm_over_sft"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert all(v > 0 for v in r["phases"].values())
    row = r["critic"]["threads_1"]
    assert row["now_updates_per_s"] > 0 and "load_avg_1min_start" in row
    if before:
        assert row["before_updates_per_s"] > 0 and row["speedup"] > 0
    assert (tmp_path / "speed.json").exists()

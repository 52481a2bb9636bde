"""bench/trainer_speed.py runs and reports every figure (the speeds themselves are recorded in docs/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "trainer_speed.py"


def test_trainer_speed_bench_state(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("trainer_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try:
        out = mod.main(["--configs", "state", "--reps", "2", "--warmup", "0", "--critic-batch", "32",
                        "--actor-batch", "4", "--out", str(tmp_path / "speed.json")])
    finally:
        torch.set_num_threads(n)
    (r,) = out["results"]
    assert r["config"] == "state" and r["params"] > 0
    for key in ("critic_updates_per_s", "qvgm_update_s", "dql_update_s", "dql_over_qvgm"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert (tmp_path / "speed.json").exists()

"""bench/learning.py per-task SFT defaults: every sim task has one, each is backed by its calibration JSON on TUNING
seeds (200000+, never evaluation seeds) with the chosen setting inside the 40-75 % band, and CLI values override it."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from qvgm.sim import TASKS

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_learning_defaults", ROOT / "bench" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw) -> argparse.Namespace:
    base = {"demos": None, "demo_noise": None, "sft_steps": None, "state_flags": None, "ema": None,
            "success_only": None}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("task", TASKS)
def test_default_is_backed_by_a_tuning_seed_calibration_in_band(task: str) -> None:
    b = bench()
    d = b.SFT_DEFAULTS[task]
    cal = json.loads((ROOT / "bench" / "results" / f"learning_state_calibration_{task}.json").read_text())
    assert cal["task"] == task and cal["seeds"]["tuning"].startswith("200000")
    chosen = cal["chosen"]
    assert (chosen["n"], chosen["noise"], chosen["steps"], chosen["flags"], chosen["ema"], chosen["success_only"]) == (
        d["demos"], d["demo_noise"], d["sft_steps"], d["state_flags"], d["ema"], d.get("success_only", False))
    keys = ("n", "noise", "steps", "flags", "ema", "success_only", "seed")
    row = [r for r in cal["rows"] if all(r.get(k, 0.0 if k == "ema" else None) == chosen[k] for k in keys)]
    assert row, "the chosen setting must be one of the measured rows"
    assert row[0]["eps"] >= 30 and 0.40 <= row[0]["rate"] <= 0.75


def test_cli_values_override_the_table() -> None:
    b = bench()
    st = b.sft_settings("push", _args())
    d = b.SFT_DEFAULTS["push"]
    assert st == {"demos": [d["demos"]], "demo_noise": [d["demo_noise"]], "sft_steps": d["sft_steps"],
                  "state_flags": d["state_flags"], "ema": d["ema"], "success_only": d.get("success_only", False)}
    st = b.sft_settings("push", _args(demos=[3, 5], demo_noise=[0.0], sft_steps=7, state_flags=[], ema=0.5,
                                      success_only=True))
    assert st == {"demos": [3, 5], "demo_noise": [0.0], "sft_steps": 7, "state_flags": {}, "ema": 0.5,
                  "success_only": True}
    assert b.sft_tag(st) == "-ema0.5-success" and b.sft_tag({"state_flags": {}, "ema": 0.0}) == ""
    assert b.parse_flags(["delta_actions=1", "head_hidden=768", "privileged_norm=0"]) == {
        "delta_actions": True, "head_hidden": 768, "privileged_norm": False}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        b.parse_flags(["delta_actions"])
    assert b.sft_settings("some_other_env", _args())["demos"] == [b.FALLBACK_SFT["demos"]]


def test_qvgm_step_per_task_is_backed_by_its_tuning_run_and_cli_overrides() -> None:
    """The per-task Q-VGM steps (critic_trainer.recipes) were chosen on TUNING scenes: stack's JSON records the
    candidates on scenes 200000+ and the chosen step is the best of them; the default equals ImproveConfig's."""
    from critic_trainer.pipeline import ImproveConfig
    from critic_trainer.recipes import DEFAULT_QVGM_ASCENT_LR, QVGM_ASCENT_LR, qvgm_ascent_lr

    b = bench()
    assert DEFAULT_QVGM_ASCENT_LR == ImproveConfig.ascent_lr == qvgm_ascent_lr("push") == qvgm_ascent_lr("pick_place")
    tune = json.loads((ROOT / "bench" / "results" / "learning_state_stack_ascent_tuning_s12_2026-11-26.json")
                      .read_text())
    assert tune["eval_seeds"].startswith("200000")
    assert all(r["mode"] == "diagnostic (tuning seeds)" for r in tune["runs"])
    best = max(tune["qvgm_by_ascent_lr"].items(), key=lambda kv: kv[1]["successes"])
    assert float(best[0]) == tune["chosen"] == QVGM_ASCENT_LR["stack"] == qvgm_ascent_lr("stack")
    assert b.ascent_lr("stack", argparse.Namespace(ascent_lr=None)) == 0.005
    assert b.ascent_lr("push", argparse.Namespace(ascent_lr=None)) == ImproveConfig.ascent_lr
    assert b.ascent_lr("stack", argparse.Namespace(ascent_lr=0.03)) == 0.03

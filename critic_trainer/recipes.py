"""Per-task SFT recipes and Q-VGM step sizes for the built-in tabletop tasks: one table read by the loop (`make demo`)
and the learning benchmark (bench/learning.py), so both start from the same SFT policy quality and improve it alike.

Chosen on TUNING seeds 200000+ only (never evaluation seeds 900000+ nor bench/sft_success.py's held-out 100000+) so
that SFT of the `state` backbone lands inside the 40-75 % success band the benchmark needs. Source:
bench/results/learning_state_calibration_<task>.json, docs/RESULTS.md. Fields: demos (N noisy expert episodes),
demo_noise (expert noise std, m), sft_steps, state_flags (StateConfig overrides), ema (SFT weight-EMA decay, 0 = off),
success_only (SFT on the demos the sim labels successful only: the noisy expert fails some stack episodes).
Tuning-seed success of each recipe (30 episodes per SFT seed, pooled over SFT seeds 0-2 / 0-1, same demos):
push 45/90 = 50 %, pick_place 33/60 = 55 %, stack 34/60 = 57 %.
The three StateConfig flags stay opt-in in the config (they assume the tabletop arm: FK of joints 1-6, actions =
joint targets), so the recipes turn them on.
"""

from __future__ import annotations

from typing import Any

TABLETOP_FLAGS: dict[str, Any] = {"delta_actions": True, "privileged_norm": True, "tool_features": True}
SFT_RECIPES: dict[str, dict[str, Any]] = {
    "push": {"demos": 100, "demo_noise": 0.01, "sft_steps": 6000, "state_flags": TABLETOP_FLAGS, "ema": 0.0,
             "success_only": False},
    "pick_place": {"demos": 75, "demo_noise": 0.01, "sft_steps": 3000, "state_flags": TABLETOP_FLAGS, "ema": 0.0,
                   "success_only": False},
    "stack": {"demos": 200, "demo_noise": 0.01, "sft_steps": 6000, "state_flags": TABLETOP_FLAGS, "ema": 0.0,
              "success_only": True},
}
# any other task / --env-spec env: the benchmark's earlier defaults, no tabletop flags
FALLBACK_RECIPE: dict[str, Any] = {"demos": 5, "demo_noise": 0.01, "sft_steps": 1000, "state_flags": {}, "ema": 0.0,
                                   "success_only": False}


# Q-VGM ascent step alpha (normalised action units per step) where a task needs its own; others use the default,
# chosen on pick_place tuning scenes. stack: chosen on stack TUNING scenes 200000-200199, training seeds 1-2, from
# {0.0025, 0.005, 0.01, 0.02} (bench/results/learning_state_stack_ascent_tuning_s12_2026-11-26.json); held out it ties
# SFT (51.2 vs 50.4 %) where 0.02 lost 14 points (docs/RESULTS.md, "stack with its own Q-VGM step size").
DEFAULT_QVGM_ASCENT_LR = 0.02  # = critic_trainer.pipeline.ImproveConfig.ascent_lr (a test keeps them equal)
QVGM_ASCENT_LR: dict[str, float] = {"stack": 0.005}


def qvgm_ascent_lr(task: str) -> float:
    """The Q-VGM ascent step alpha of `task` (DEFAULT_QVGM_ASCENT_LR where none was chosen for it)."""
    return QVGM_ASCENT_LR.get(task, DEFAULT_QVGM_ASCENT_LR)


def sft_recipe(task: str) -> dict[str, Any]:
    """A copy of the SFT recipe of `task` (FALLBACK_RECIPE for tasks without a calibrated one)."""
    r = SFT_RECIPES.get(task, FALLBACK_RECIPE)
    return {**r, "state_flags": dict(r["state_flags"])}

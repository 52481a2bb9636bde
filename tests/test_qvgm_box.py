"""Q-VGM's ascent projection box (issue 5/7): a per-coordinate (lo, hi) box instead of a hard-coded [-1, 1], the
shared `action_box` setting of the pipeline, and the no-critic control (J = 0 ascent steps).

Real parts: the toy flow-matching policy of critic_trainer.toy fitted here, an analytic critic with a known optimum,
and (pipeline) a real replay buffer + `state` checkpoint written to disk.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_qvgm import eval_samples, sft_policy  # noqa: F401  (the same toy SFT policy fixture and sampler)

from critic_trainer import pipeline as P
from critic_trainer.critic import critic_action
from critic_trainer.qvgm import QVGMConfig, check_box, q_ascent, qvgm_update, trust_region
from critic_trainer.toy import ToyFlowPolicy
from qvgm.policy import load_policy

OBS, H, D, R, N_EXEC = 6, 4, 4, 3, 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TargetQ(torch.nn.Module):
    """Q(A) = -sum_j w_j (A_j - A*_j)^2 on critic actions [..., A] (state independent; w_j = 0: Q ignores j)."""

    def __init__(self, a_star: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("a_star", a_star)
        self.register_buffer("weight", torch.ones_like(a_star) if weight is None else weight)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return -(self.weight * (a - self.a_star) ** 2).sum(-1)


def test_q_ascent_iterates_stay_in_a_non_unit_box():
    lo = torch.tensor([-3.0, -0.5, -2.0, -1.0])
    hi = torch.tensor([2.5, 0.5, 4.0, 1.5])
    q = TargetQ(torch.tensor([9.0, 9.0, -9.0, 9.0]))  # optimum outside the box on every coordinate
    a0 = torch.zeros(5, 4)
    for steps in range(1, 6):  # each iterate j is the last one of a run with J = j, keep-best off
        cfg = QVGMConfig(ascent_steps=steps, ascent_lr=1.0, keep_best=False)
        a_j, _ = q_ascent(q, a0, cfg, box=(lo, hi))
        assert torch.all(a_j >= lo) and torch.all(a_j <= hi), (steps, a_j)
    a_q, gain = q_ascent(q, a0, QVGMConfig(ascent_steps=8, ascent_lr=1.0), box=(lo, hi))
    torch.testing.assert_close(a_q, torch.tensor([2.5, 0.5, -2.0, 1.5]).expand(5, 4))  # the box's best corner
    assert torch.all(gain > 0)
    # the default box is still [-1, 1]
    a_u, _ = q_ascent(q, a0, QVGMConfig(ascent_steps=8, ascent_lr=1.0))
    torch.testing.assert_close(a_u, torch.tensor([1.0, 1.0, -1.0, 1.0]).expand(5, 4))
    # a batched [B, M, A] start with a box broadcast from [A]
    a_b, _ = q_ascent(q, torch.zeros(2, 3, 4), QVGMConfig(ascent_steps=8, ascent_lr=1.0), box=(lo, hi))
    assert a_b.shape == (2, 3, 4) and torch.all(a_b <= hi) and torch.all(a_b >= lo)


def test_coordinate_outside_unit_but_inside_box_is_not_moved_without_gradient():
    """Q sees coordinate 0 only; coordinate 1 starts at 1.7 (a real action outside [-1, 1]) with zero gradient."""
    q = TargetQ(torch.tensor([0.5, 0.0, 0.0]), weight=torch.tensor([1.0, 0.0, 0.0]))
    start = torch.tensor([[0.0, 1.7, -1.4]])
    box = (torch.tensor([-2.0, -2.0, -2.0]), torch.tensor([2.0, 2.0, 2.0]))
    a_q, gain = q_ascent(q, start, QVGMConfig(ascent_steps=4, ascent_lr=0.05), box=box)
    assert gain.item() > 0 and a_q[0, 0] > 0.1  # the ascent did move coordinate 0 toward 0.5
    assert torch.equal(a_q[:, 1:], start[:, 1:])  # bit-identical: projection never touched them
    # the unit box clips the real action as a side effect of an improving step (the defect this box fixes)
    a_u, _ = q_ascent(q, start, QVGMConfig(ascent_steps=4, ascent_lr=0.05))
    assert a_u[0, 1].item() == 1.0 and a_u[0, 2].item() == -1.0
    # no projection: the same as the data box here
    a_n, _ = q_ascent(q, start, QVGMConfig(ascent_steps=4, ascent_lr=0.05, project=False))
    torch.testing.assert_close(a_n, a_q)


def test_trust_region_stays_inside_a_non_unit_box():
    g = torch.Generator().manual_seed(0)
    lo, hi = torch.tensor([-3.0, -0.2, 0.5]), torch.tensor([1.0, 2.5, 4.0])
    a = lo + (hi - lo) * torch.rand(64, 3, generator=g)
    origin = lo + (hi - lo) * torch.rand(64, 3, generator=g)
    for shift in (0.0, 0.05, 0.5, 10.0):
        out = trust_region(a, origin, shift)
        assert torch.all(out >= lo - 1e-6) and torch.all(out <= hi + 1e-6)
        assert torch.all((out - origin).pow(2).mean(-1).sqrt() <= shift + 1e-6)
    # the full ascent with a trust region around an origin inside the box keeps every target inside it
    q = TargetQ(torch.tensor([9.0, 9.0, 9.0]))
    a_q, _ = q_ascent(q, a, QVGMConfig(ascent_steps=4, ascent_lr=1.0, max_shift=0.3), origin=origin, box=(lo, hi))
    assert torch.all(a_q >= lo - 1e-6) and torch.all(a_q <= hi + 1e-6)


def test_bad_box_is_refused():
    q = TargetQ(torch.zeros(2))
    with pytest.raises(ValueError, match="lo > hi"):
        q_ascent(q, torch.zeros(1, 2), QVGMConfig(), box=(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])))
    with pytest.raises(ValueError, match="non-finite"):
        check_box((torch.tensor([float("nan")]), torch.tensor([1.0])))


def train(base: ToyFlowPolicy, cfg: QVGMConfig, q_fn: TargetQ, updates: int = 60) -> ToyFlowPolicy:
    torch.manual_seed(1)
    actor = copy.deepcopy(base).requires_grad_(True)
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    for _ in range(updates):
        qvgm_update(actor, base, opt, {"state": torch.randn(32, OBS)}, q_fn, cfg)
    return actor.requires_grad_(False)


def test_no_critic_control_stays_at_the_reference(sft_policy):  # noqa: F811 (fixture imported above)
    """J = 0: A_Q = A_base, h = 0, so the update only re-distils the frozen reference; with the critic (J = 4) the
    same update moves the samples toward the critic's optimum. The control's samples are the reference's."""
    a_star = torch.full((N_EXEC * R,), 0.8)
    q_fn = TargetQ(a_star)
    base = eval_samples(sft_policy)
    ctrl = eval_samples(train(sft_policy, QVGMConfig(n_exec=N_EXEC, ascent_steps=0), q_fn))
    full = eval_samples(train(sft_policy, QVGMConfig(n_exec=N_EXEC), q_fn))
    c_base, c_ctrl, c_full = (critic_action(x, N_EXEC, R) for x in (base, ctrl, full))
    # statistically at the reference: per-coordinate mean within 2 standard errors (here: identical samples)
    se = c_base.std(0) / c_base.shape[0] ** 0.5
    assert torch.all((c_ctrl.mean(0) - c_base.mean(0)).abs() <= 2 * se)
    assert (ctrl - base).abs().max() < 1e-6
    # the critic's version moves clearly toward A*
    d = lambda c: (c - a_star).norm(dim=-1).mean().item()  # noqa: E731
    assert d(c_full) < 0.8 * d(c_base), (d(c_base), d(c_full))


# ---------------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from tests.test_pipeline import tiny_policy, write_buffer

    tmp = tmp_path_factory.mktemp("qbox")
    return {"buffer": write_buffer(tmp / "buf", [True, False, True, False, False, True]),
            "policy": tiny_policy(tmp), "tmp": tmp}


def test_action_box_setting_is_shared_and_dql_box_is_an_alias(pipe):
    pol = load_policy(pipe["policy"])
    buf = P.load_buffer(pipe["buffer"], pol.horizon)
    a = torch.as_tensor(P.normalised_actions(pol, buf.action))
    r = pol.real_action_dim
    lo, hi = P.action_box(pol, buf, P.ImproveConfig(n_exec=3, action_box="data"))
    assert lo.shape == hi.shape == (3 * r,)
    torch.testing.assert_close(lo[:r], a.min(0).values.clamp(max=-1.0))
    torch.testing.assert_close(hi[r:2 * r], a.max(0).values.clamp(min=1.0))
    assert bool((a.abs() > 1).any()), "the test buffer should hold actions outside [-1, 1]"
    lo_u, hi_u = P.action_box(pol, buf, P.ImproveConfig(n_exec=3, action_box="unit"))
    assert torch.all(lo_u == -1) and torch.all(hi_u == 1)
    assert P.ImproveConfig(dql_box="unit").action_box == "unit"  # deprecated alias
    # chosen defaults (docs/RESULTS.md, Q-VGM's projection box): data box, alpha 0.02; Q-distillation keeps its
    # tuned alpha 0.05
    d = P.ImproveConfig()
    assert (d.action_box, d.qvgm().ascent_lr, d.distill().ascent_lr) == ("data", 0.02, 0.05)
    assert P.ImproveConfig(distill_ascent_lr=None).distill().ascent_lr == 0.02
    with pytest.raises(ValueError, match="ascent_lr"):
        P.ImproveConfig(ascent_lr=-0.1)
    with pytest.raises(ValueError, match="action_box"):
        P.ImproveConfig(action_box="huge")
    import argparse

    ap = argparse.ArgumentParser()
    P.add_baseline_arguments(ap)
    assert P.baseline_settings(ap.parse_args(["--dql-box", "unit"]))["action_box"] == "unit"
    assert P.baseline_settings(ap.parse_args([]))["action_box"] == P.ImproveConfig().action_box
    assert P.baseline_settings(ap.parse_args(["--distill-ascent-lr", "none"]))["distill_ascent_lr"] is None


def test_pipeline_no_critic_control_leaves_the_policy_unchanged(pipe, tmp_path):
    """The bench's qvgm-nocritic (method qvgm, ascent_steps 0) on a real buffer and `state` checkpoint: the actor's
    chunks equal the SFT policy's (the loss is exactly 0 at the reference); Q-VGM with the critic moves them."""
    pol = load_policy(pipe["policy"])
    buf = P.load_buffer(pipe["buffer"], pol.horizon)
    kw = dict(method="qvgm", n_exec=3, critic_steps=20, critic_hidden=(32, 32), actor_steps=3, actor_batch=16,
              actor_lr=1e-3, num_steps=4)
    _, critic, s_full = P.improve(pol, buf, P.ImproveConfig(**kw), work=tmp_path / "full")
    _, _, s_ctrl = P.improve(pol, buf, P.ImproveConfig(**kw, ascent_steps=0), work=tmp_path / "ctrl", critic=critic)
    assert s_ctrl["actor"]["action_shift"] == 0.0
    assert s_full["actor"]["action_shift"] > 0.0
    assert s_full["config"]["action_box"] == "data"
    # the shuffled-state control: the same batches and critic, states permuted -> other targets, other weights
    a_shuf, _, s_shuf = P.improve(pol, buf, P.ImproveConfig(**kw, shuffle_critic_states=True), work=tmp_path / "shuf",
                                  critic=critic)
    a_full, _, _ = P.improve(pol, buf, P.ImproveConfig(**kw), work=tmp_path / "full2", critic=critic)
    assert s_shuf["actor"]["action_shift"] > 0.0 and s_shuf["config"]["shuffle_critic_states"]
    w_s, w_f = a_shuf.state_dict(), a_full.state_dict()
    assert any(not torch.equal(w_s[k], w_f[k]) for k in w_f)


def test_bench_declares_the_no_critic_control():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_learning", Path(__file__).parents[1] / "bench" / "learning.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert {"qvgm-nocritic", "qvgm-shuffled"} <= set(mod.ALL_METHODS)
    cfg = P.ImproveConfig(**{**P.ImproveConfig().__dict__, **mod.METHOD_OVERRIDES["qvgm-nocritic"]})
    assert cfg.method == "qvgm" and cfg.qvgm().ascent_steps == 0 and not cfg.shuffle_critic_states
    cfg = P.ImproveConfig(**{**P.ImproveConfig().__dict__, **mod.METHOD_OVERRIDES["qvgm-shuffled"]})
    assert cfg.method == "qvgm" and cfg.shuffle_critic_states and cfg.qvgm().ascent_steps > 0
    assert np.isfinite(cfg.ascent_lr)

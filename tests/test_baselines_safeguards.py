"""Q-distillation and Diffusion-QL with the safeguards Q-VGM gets (issue 5/7): on a toy problem with a known Q whose
optimum lies OUTSIDE the normalised action box, the trained policy moves toward the box's best point and stays in
the box; without the safeguards it leaves it (the pick_place collapse: action_shift 3-5 and 4e10)."""

from __future__ import annotations

import copy

import pytest
import torch

from critic_trainer.baselines import diffusion_ql_loss, distill_targets, q_distill_loss
from critic_trainer.critic import critic_action
from critic_trainer.qvgm import QVGMConfig, trust_region
from critic_trainer.toy import ToyFlowPolicy, fit_toy_policy

OBS, H, D, R, N_EXEC = 6, 4, 4, 3, 2
A_STAR = 1.5  # every critic coordinate's optimum, outside [-1, 1]: the box's best point is the corner +1


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def q_fn(a: torch.Tensor) -> torch.Tensor:
    """Known critic Q(A) = -||A - A*||^2 on the flattened critic coordinates [..., N_EXEC * R] -> [...]."""
    return -((a - A_STAR) ** 2).sum(-1)


@pytest.fixture(scope="module")
def policy() -> ToyFlowPolicy:
    """Frozen toy flow policy on chunks 0.5 tanh(W s) + 0.3 noise (critic coordinates around 0, inside the box)."""
    torch.set_num_threads(1)
    return fit_toy_policy(OBS, H, D, R, noise=0.3, steps=300)[0]


def held_out(policy: ToyFlowPolicy, actor: ToyFlowPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic coordinates [256, N_EXEC * R] of the reference and of the actor from the same states and noise."""
    g = torch.Generator().manual_seed(7)
    states, noise = torch.randn(256, OBS, generator=g), torch.randn(256, H, D, generator=g)
    with torch.no_grad():
        ref = policy.sample(policy.encode({"state": states}), noise=noise)
        new = actor.sample(actor.encode({"state": states}), noise=noise)
    return critic_action(ref, N_EXEC, R), critic_action(new, N_EXEC, R)


def train(policy: ToyFlowPolicy, method: str, steps: int = 40, **kw) -> ToyFlowPolicy:
    """`steps` Adam steps (lr 1e-3, gradient norm clipped to 1 as in the pipeline) of one baseline from `policy`."""
    torch.manual_seed(3)
    actor = copy.deepcopy(policy).requires_grad_(True)
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    for _ in range(steps):
        inputs = {"state": torch.randn(32, OBS)}
        if method == "dql":
            with torch.no_grad():  # BC data: the reference policy's own chunks (an SFT policy's buffer)
                bc = policy.sample(policy.encode(inputs))
            loss, info = diffusion_ql_loss(actor, inputs, q_fn, N_EXEC, eta=1.0, bc_actions=bc, **kw)
        else:
            loss, info = q_distill_loss(actor, inputs, q_fn, QVGMConfig(n_exec=N_EXEC, max_shift=0.3), **kw)
        assert torch.isfinite(loss) and info["loss"] == pytest.approx(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        opt.step()
    return actor


def outside(a: torch.Tensor, margin: float = 0.1, half_width: float = 1.0) -> float:
    """Fraction of coordinates more than `margin` outside [-half_width, half_width]."""
    return (a.abs() > half_width + margin).float().mean().item()


def test_distill_targets_respect_box_trust_region_and_keep_best(policy):
    actor = train(policy, "qdistill", steps=30, reference=None, noise=None)  # an actor that has already moved
    g = torch.Generator().manual_seed(11)
    inputs, noise = {"state": torch.randn(64, OBS, generator=g)}, torch.randn(64, H, D, generator=g)
    cfg = QVGMConfig(n_exec=N_EXEC, max_shift=0.1, ascent_steps=4, ascent_lr=0.05)
    target, gain, centre = distill_targets(actor, inputs, q_fn, cfg, reference=policy, noise=noise)
    with torch.no_grad():
        ref = policy.sample(policy.encode(inputs), noise=noise)
        start = critic_action(actor.sample(actor.encode(inputs), noise=noise), N_EXEC, R)
    tq = critic_action(target, N_EXEC, R)
    torch.testing.assert_close(centre, critic_action(ref, N_EXEC, R))  # the reference's sample, same noise
    assert torch.all((tq - centre).pow(2).mean(-1).sqrt() <= 0.1 + 1e-5)  # trust region around the reference
    # Q-VGM's projection: a target is an ascent iterate inside the box (where its centre is), or the start kept
    kept = torch.isclose(tq, trust_region(start, centre, 0.1), atol=1e-6).all(-1)
    in_box = tq.abs().le(1.0 + 1e-6).all(-1)
    assert torch.all(kept | in_box | centre.abs().gt(1.0).any(-1)) and in_box.float().mean() > 0.8
    assert torch.all(gain >= 0)  # keep-best: never worse than its start
    assert (q_fn(tq) > q_fn(centre)).float().mean() > 0.9  # and better than the reference's own chunk
    rest = torch.ones(H, D, dtype=torch.bool)
    rest[:N_EXEC, :R] = False
    torch.testing.assert_close(target[:, rest], ref[:, rest])  # coordinates the critic does not see: the reference
    # Q-VGM's ascent without the trust region still projects: the start is clamped, every step too
    free, gain, _ = distill_targets(actor, inputs, q_fn, QVGMConfig(n_exec=N_EXEC), noise=noise)
    fq = critic_action(free, N_EXEC, R)
    assert torch.all(fq.abs().le(1.0 + 1e-6).all(-1) | (gain == 0)) and torch.all(gain >= 0)


def test_qdistill_moves_toward_optimum_inside_box_and_trust_region(policy):
    ref, before = held_out(policy, policy)
    actor = train(policy, "qdistill", reference=policy)
    _, after = held_out(policy, actor)
    assert after.mean() > before.mean() + 0.15  # toward A* (and the box corner)
    assert q_fn(after).mean() > q_fn(before).mean() + 2.0
    assert outside(after) < 0.02
    shift = (after - ref).pow(2).mean(-1).sqrt().mean().item()
    assert shift < 0.3 * 1.5  # bounded by the trust region (0.3) around the reference: no compounding
    # centred on the actor's own sample instead, the same 40 updates compound far past the region
    drift = train(policy, "qdistill", reference=None)
    _, far = held_out(policy, drift)
    assert (far - ref).pow(2).mean(-1).sqrt().mean().item() > 2 * shift


def test_dql_moves_toward_optimum_and_stays_in_box(policy):
    _, before = held_out(policy, policy)
    actor = train(policy, "dql")
    _, after = held_out(policy, actor)
    assert after.mean() > before.mean() + 0.3  # toward A* through the whole chain
    assert q_fn(after.clamp(-1, 1)).mean() > q_fn(before).mean() + 5.0
    assert outside(after) < 0.15
    # the paper's loss without projection follows the critic out of the box
    free = train(policy, "dql", project=False)
    _, out = held_out(policy, free)
    assert outside(out) > 0.5 > outside(after) * 3
    # a given box (the pipeline passes the buffer's own action range) is the one respected
    narrow = train(policy, "dql", box=(torch.full((N_EXEC * R,), -0.5), torch.full((N_EXEC * R,), 0.5)))
    _, inside = held_out(policy, narrow)
    assert inside.mean() > before.mean() + 0.2 and outside(inside, half_width=0.5) < 0.15


def test_dql_normalises_q_and_reports_the_box(policy):
    """-Q / mean|Q| (detached): scaling the critic by 100 leaves the loss and its gradient unchanged."""
    g = torch.Generator().manual_seed(5)
    inputs, noise = {"state": torch.randn(16, OBS, generator=g)}, 2.0 * torch.randn(16, H, D, generator=g)
    grads = []
    for scale in (1.0, 100.0):
        actor = copy.deepcopy(policy).requires_grad_(True)
        loss, info = diffusion_ql_loss(actor, inputs, lambda a, s=scale: s * q_fn(a), N_EXEC, eta=0.5, noise=noise)
        assert info["q_loss"] == pytest.approx(1.0)  # Q < 0 everywhere here: -mean(Q) / mean|Q| = 1
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in actor.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert 0.0 < info["outside_box"] <= 1.0 and info["box_loss"] > 0  # noise * 2: samples leave the box


def test_baseline_settings_are_named_and_validated():
    import argparse

    from critic_trainer import pipeline as P

    ap = argparse.ArgumentParser()
    P.add_arguments(ap)
    args = ap.parse_args(["--dataset", "d", "--policy", "p", "--dql-eta", "0.3", "--distill-max-shift", "none",
                          "--distill-ascent-steps", "8"])
    cfg = P.ImproveConfig(method="qdistill", **P.baseline_settings(args))
    assert cfg.dql_eta == 0.3 and cfg.distill_max_shift is None and cfg.distill().ascent_steps == 8
    d = P.ImproveConfig()
    assert d.distill().max_shift == d.distill_max_shift and d.qvgm().max_shift == d.max_shift  # Q-VGM's own
    for bad in ({"dql_eta": -1.0}, {"distill_max_shift": -0.1}, {"dql_box_weight": -1.0}):
        with pytest.raises(ValueError):
            P.ImproveConfig(**bad)

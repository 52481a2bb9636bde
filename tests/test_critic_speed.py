"""The fast critic forward (split first layer, one pass for all action samples) is the old concatenated math.

The reference below is the formulation QEnsemble.q_from_state / CriticTrainer.loss used before the speed-up
(commit b94e8b8): the state repeated over the S actions, [h || A] concatenated into every injected layer, and
one critic call each for the data, uniform, reference and next-reference actions. Float64, 1e-10.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from critic_trainer.critic import (
    CriticBatch,
    CriticConfig,
    CriticTrainConfig,
    CriticTrainer,
    QEnsemble,
    calql_regulariser,
    td_target,
)
from critic_trainer.pipeline import CRITIC_CONFIG, CRITIC_WEIGHTS, load_critic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_q(params: dict[str, torch.Tensor], cfg: CriticConfig, s: torch.Tensor,
                actions: torch.Tensor) -> torch.Tensor:
    """The concatenated formulation: s [N, B, ds], actions [B, (S,) A] -> [N, B, (S)]; params by state_dict key."""
    n, b, ds = s.shape
    multi = actions.dim() == 3
    if multi:
        ns = actions.shape[1]
        s = s.unsqueeze(2).expand(n, b, ns, ds).reshape(n, b * ns, ds)
        actions = actions.reshape(b * ns, -1)
    a = actions.unsqueeze(0).expand(n, -1, -1)
    h = s
    act = torch.relu if cfg.activation == "relu" else F.silu
    for i in range(len(cfg.hidden)):
        inject = cfg.per_layer_injection or i == 0
        x = torch.cat([h, a], dim=-1) if inject else h
        h = torch.baddbmm(params[f"hidden.{i}.bias"].unsqueeze(1), x, params[f"hidden.{i}.weight"])
        if cfg.layer_norm:
            h = F.layer_norm(h, (h.shape[-1],))
        h = act(h)
    x = torch.cat([h, a], dim=-1) if cfg.per_layer_injection else h
    q = torch.baddbmm(params["out.bias"].unsqueeze(1), x, params["out.weight"]).squeeze(-1)
    return q.reshape(n, b, -1) if multi else q


def reference_state(params: dict[str, torch.Tensor], cfg: CriticConfig, z: torch.Tensor,
                    p: torch.Tensor | None) -> torch.Tensor:
    n = cfg.num_q
    zs = z.unsqueeze(0).expand(n, -1, -1)
    if cfg.proprio_dim:
        zs = torch.cat([zs, torch.bmm(p.unsqueeze(0).expand(n, -1, -1), params["proj.weight"])], dim=-1)
    s = F.layer_norm(zs, (zs.shape[-1],))
    return s * params["ln_weight"].unsqueeze(1) + params["ln_bias"].unsqueeze(1)


def reference_loss(critic: QEnsemble, target: QEnsemble, tcfg: CriticTrainConfig, batch: CriticBatch) -> torch.Tensor:
    """Cal-QL / CQL loss as before: four critic calls (data, uniform, reference at s, reference at s')."""
    cfg = critic.cfg
    params = dict(critic.named_parameters())
    tparams = dict(target.named_parameters())
    b = batch.actions.shape[0]
    s = reference_state(params, cfg, batch.z, batch.p)
    q_data = reference_q(params, cfg, s, batch.actions)
    with torch.no_grad():
        s_next = reference_state(tparams, cfg, batch.z_next, batch.p_next)
        next_q = reference_q(tparams, cfg, s_next, batch.ref_next_actions[:, 0]).min(0).values
        y = td_target(batch.rewards, batch.done, next_q, tcfg.gamma, batch.n_steps)
    td = ((q_data - y[None]) ** 2).mean(-1).sum()
    unif = torch.rand(b, tcfg.num_uniform, batch.actions.shape[-1], dtype=batch.actions.dtype) * 2.0 - 1.0
    q_unif = reference_q(params, cfg, s, unif)
    q_ref = reference_q(params, cfg, s, batch.ref_actions)
    q_ref_next = reference_q(params, cfg, s, batch.ref_next_actions)
    reg = calql_regulariser(q_data, q_unif, q_ref, q_ref_next, batch.mc_return,
                            calibrate=tcfg.objective == "calql").mean(-1).sum()
    return td + tcfg.reg_weight * reg


def make_batch(cfg: CriticConfig, b: int, n_ref: int, g: torch.Generator) -> CriticBatch:
    a, dt = cfg.action_dim, torch.float64

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dt)

    p = r(b, cfg.proprio_dim) if cfg.proprio_dim else None
    p_next = r(b, cfg.proprio_dim) if cfg.proprio_dim else None
    return CriticBatch(z=r(b, cfg.feature_dim), p=p, actions=torch.rand(b, a, generator=g, dtype=dt) * 2 - 1,
                       rewards=torch.rand(b, cfg.n_exec, generator=g, dtype=dt), done=(r(b) > 0.5).double(),
                       z_next=r(b, cfg.feature_dim), p_next=p_next, mc_return=r(b),
                       ref_actions=torch.rand(b, n_ref, a, generator=g, dtype=dt) * 2 - 1,
                       ref_next_actions=torch.rand(b, n_ref, a, generator=g, dtype=dt) * 2 - 1)


CONFIGS = [
    dict(),
    dict(per_layer_injection=False),
    dict(layer_norm=True, activation="relu"),
    dict(proprio_dim=0, hidden=(12,), num_q=1),
    dict(hidden=(16, 8, 8), num_q=2),
]


def small_cfg(**kw) -> CriticConfig:
    base = dict(feature_dim=6, proprio_dim=3, n_exec=2, real_action_dim=3, num_q=3, hidden=(16, 8),
                proprio_proj_dim=4)
    base.update(kw)
    return CriticConfig(**base)


@pytest.mark.parametrize("kw", CONFIGS)
def test_q_equals_the_concatenated_formulation(kw):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    critic = QEnsemble(cfg).double()
    g = torch.Generator().manual_seed(1)
    z, p = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    params = dict(critic.named_parameters())
    s = critic.encode_state(z, p if cfg.proprio_dim else None)
    torch.testing.assert_close(s, reference_state(params, cfg, z, p), rtol=0, atol=1e-10)
    for shape in [(5, cfg.action_dim), (5, 1, cfg.action_dim), (5, 7, cfg.action_dim)]:
        a = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
        q = critic.q_from_state(s, a)
        q_ref = reference_q(params, cfg, s, a)
        assert q.shape == q_ref.shape == (cfg.num_q, *shape[:-1])
        torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-10)
        # grad_A Q (what the Q-VGM ascent uses) matches too
        (ga,) = torch.autograd.grad(q.sum(), a)
        (ga_ref,) = torch.autograd.grad(q_ref.sum(), a)
        torch.testing.assert_close(ga, ga_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("objective", ["calql", "cql"])
@pytest.mark.parametrize("kw", CONFIGS)
def test_loss_and_gradients_equal_the_four_pass_formulation(kw, objective):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    critic = QEnsemble(cfg).double()
    tcfg = CriticTrainConfig(objective=objective, reg_weight=0.7, num_uniform=5)
    trainer = CriticTrainer(critic, tcfg)
    with torch.no_grad():  # a target that differs from the critic, as after some EMA steps
        for pt in trainer.target.parameters():
            pt.add_(0.1 * torch.randn_like(pt))
    batch = make_batch(cfg, b=6, n_ref=3, g=torch.Generator().manual_seed(2))

    torch.manual_seed(123)  # same uniform draws in both formulations
    loss, metrics = trainer.loss(batch)
    grads = torch.autograd.grad(loss, list(critic.parameters()))
    torch.manual_seed(123)
    loss_ref = reference_loss(critic, trainer.target, tcfg, batch)
    grads_ref = torch.autograd.grad(loss_ref, list(critic.parameters()))
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-10)
    assert metrics["reg"] != 0.0
    for (name, _), g_new, g_ref in zip(critic.named_parameters(), grads, grads_ref, strict=True):
        assert g_ref.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(g_new, g_ref, rtol=0, atol=1e-10, msg=name)


def test_iql_value_net_without_actions_still_works():
    torch.manual_seed(0)
    trainer = CriticTrainer(QEnsemble(small_cfg()).double(), CriticTrainConfig(objective="iql"))
    assert trainer.value is not None and trainer.value.cfg.action_dim == 0
    batch = make_batch(small_cfg(), b=4, n_ref=2, g=torch.Generator().manual_seed(3))
    v = trainer.value(batch.z, batch.p, batch.z.new_zeros(4, 0))
    params = dict(trainer.value.named_parameters())
    s = reference_state(params, trainer.value.cfg, batch.z, batch.p)
    torch.testing.assert_close(v, reference_q(params, trainer.value.cfg, s, batch.z.new_zeros(4, 0)),
                               rtol=0, atol=1e-10)
    m = trainer.update(batch)
    assert torch.isfinite(torch.tensor(m["loss"])) and m["value_loss"] >= 0


def test_a_checkpoint_in_the_old_layout_loads_and_gives_the_same_q(tmp_path: Path):
    """critic.safetensors written key by key in the pre-speed-up layout: [N, in, out] weights, action rows last."""
    cfg = small_cfg()
    n, a, ds = cfg.num_q, cfg.action_dim, cfg.feature_dim + cfg.proprio_proj_dim
    shapes = {"proj.weight": (n, cfg.proprio_dim, cfg.proprio_proj_dim), "ln_weight": (n, ds), "ln_bias": (n, ds),
              "hidden.0.weight": (n, ds + a, 16), "hidden.0.bias": (n, 16),
              "hidden.1.weight": (n, 16 + a, 8), "hidden.1.bias": (n, 8),
              "out.weight": (n, 8 + a, 1), "out.bias": (n, 1)}
    g = torch.Generator().manual_seed(4)
    tensors = {k: torch.randn(*shape, generator=g) for k, shape in shapes.items()}
    save_file(tensors, str(tmp_path / CRITIC_WEIGHTS))
    c = {k: getattr(cfg, k) for k in ("feature_dim", "proprio_dim", "n_exec", "real_action_dim", "num_q",
                                      "proprio_proj_dim", "per_layer_injection", "activation")}
    c["hidden"] = list(cfg.hidden)
    (tmp_path / CRITIC_CONFIG).write_text(json.dumps({"config": c}))
    critic, _ = load_critic(tmp_path)
    loaded = load_file(str(tmp_path / CRITIC_WEIGHTS))
    z, p = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    acts = torch.rand(4, 5, a, generator=g) * 2 - 1
    with torch.no_grad():
        q = critic(z, p, acts)
        q_ref = reference_q(loaded, cfg, reference_state(loaded, cfg, z, p), acts)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    assert {k: tuple(v.shape) for k, v in critic.state_dict().items()} == shapes


def test_shape_errors_are_clear():
    critic = QEnsemble(small_cfg())
    s = critic.encode_state(torch.randn(3, 6), torch.randn(3, 3))
    with pytest.raises(ValueError, match="action_dim"):
        critic.q_from_state(s, torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="batch"):
        critic.q_from_state(s, torch.randn(2, 6))


def test_dropout_critic_train_and_eval():
    """Dropout masks are drawn once per layer over all B*S rows (same distribution as before, other draws)."""
    torch.manual_seed(0)
    cfg = small_cfg(dropout=0.3)
    critic = QEnsemble(cfg).double()
    g = torch.Generator().manual_seed(5)
    z, p = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    a = torch.rand(4, 6, cfg.action_dim, generator=g, dtype=torch.float64) * 2 - 1
    params = dict(critic.named_parameters())
    q_ref = reference_q(params, cfg, reference_state(params, cfg, z, p), a)  # no dropout: the eval-mode function
    q_train = critic(z, p, a)
    assert torch.isfinite(q_train).all() and not torch.allclose(q_train, q_ref)
    torch.testing.assert_close(critic.eval()(z, p, a), q_ref, rtol=0, atol=1e-10)

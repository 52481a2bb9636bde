"""Critic: an ensemble of Q-networks with per-layer action injection, trained by Cal-QL (or CQL / IQL).

METHOD.md §3. State s = LayerNorm([z_rl || W_p p]) with z_rl the RL-token (critic) features [B, F] and
p the proprioception [B, P]. The critic action A is the first `n_exec` executed steps of a normalised chunk,
real action dims only, flattened: [B, n_exec * real_action_dim] (see `critic_action`). Actions are in the
model's normalised units ([-1, 1] nominal). Flow time does not appear here: the critic only ever sees clean
chunks (t = 0 in the openpi convention).

Every ensemble member has its own weights; the members run in one batched matmul per layer (weights
[N, in, out]), not a Python loop. Outputs are [N, B] (or [N, B, S] for S actions per state).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from critic_trainer.distributed import average_gradients, broadcast_parameters, finite_on_all_ranks

Aggregate = Literal["mean", "min", "lcb"]
Objective = Literal["calql", "cql", "iql"]


def critic_action(chunk: torch.Tensor, n_exec: int, real_action_dim: int) -> torch.Tensor:
    """Normalised chunk [..., H, D] -> critic action [..., n_exec * real_action_dim] (first n_exec steps, real dims)."""
    if chunk.shape[-2] < n_exec or chunk.shape[-1] < real_action_dim:
        raise ValueError(f"chunk {tuple(chunk.shape)} is smaller than n_exec={n_exec} x real={real_action_dim}")
    return chunk[..., :n_exec, :real_action_dim].flatten(-2)


def aggregate(q: torch.Tensor, how: Aggregate = "mean", lcb_beta: float = 1.0) -> torch.Tensor:
    """Ensemble Q [N, ...] -> [...]: mean, min, or lower confidence bound mean - beta * std (population std).

    With N = 2 and beta = 1 the LCB equals the min.
    """
    if how == "mean":
        return q.mean(0)
    if how == "min":
        return q.min(0).values
    if how == "lcb":
        return q.mean(0) - lcb_beta * q.std(0, correction=0)
    raise ValueError(f"unknown ensemble aggregation {how!r} (mean / min / lcb)")


class BatchedLinear(nn.Module):
    """N independent linear layers applied at once: x [N, B, in] -> [N, B, out]. nn.Linear's default init."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(max(in_features, 1))
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


@dataclass
class CriticConfig:
    """Architecture of the Q ensemble. action_dim = n_exec * real_action_dim (e.g. 5 x 7 = 35)."""

    feature_dim: int  # F, size of z_rl
    proprio_dim: int  # P, size of p (0: no proprioception)
    n_exec: int = 5
    real_action_dim: int = 7
    num_q: int = 2
    hidden: tuple[int, ...] = (1024, 512)
    proprio_proj_dim: int = 64
    per_layer_injection: bool = True  # concatenate A to the input of every hidden layer and the output layer
    activation: Literal["relu", "silu"] = "silu"
    layer_norm: bool = False  # LayerNorm (no affine) on every hidden activation, before the nonlinearity
    dropout: float = 0.0  # dropout on every hidden activation (training mode only)

    @property
    def action_dim(self) -> int:
        return self.n_exec * self.real_action_dim


class QEnsemble(nn.Module):
    """Q_i(s, A), i = 1..N, with s = LayerNorm([z || W_p p]) (per-member W_p and LayerNorm affine)."""

    def __init__(self, cfg: CriticConfig) -> None:
        super().__init__()
        if cfg.num_q < 1 or not cfg.hidden:
            raise ValueError("need num_q >= 1 and at least one hidden layer")
        self.cfg = cfg
        n = cfg.num_q
        self.proj = BatchedLinear(n, cfg.proprio_dim, cfg.proprio_proj_dim, bias=False) if cfg.proprio_dim else None
        self.state_dim = cfg.feature_dim + (cfg.proprio_proj_dim if cfg.proprio_dim else 0)
        self.ln_weight = nn.Parameter(torch.ones(n, self.state_dim))
        self.ln_bias = nn.Parameter(torch.zeros(n, self.state_dim))
        a = cfg.action_dim
        layers = []
        prev = self.state_dim
        for i, width in enumerate(cfg.hidden):
            inject = cfg.per_layer_injection or i == 0
            layers.append(BatchedLinear(n, prev + (a if inject else 0), width))
            prev = width
        self.hidden = nn.ModuleList(layers)
        self.out = BatchedLinear(n, prev + (a if cfg.per_layer_injection else 0), 1)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.SiLU()
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"critic dropout must be in [0, 1), got {cfg.dropout}")

    @property
    def num_q(self) -> int:
        return self.cfg.num_q

    def encode_state(self, z: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, F], p [B, P] -> s [N, B, state_dim] = LayerNorm([z || W_p p]) per member."""
        n = self.cfg.num_q
        zs = z.unsqueeze(0).expand(n, -1, -1)
        if self.proj is not None:
            if p is None:
                raise ValueError("this critic expects proprioception p")
            zs = torch.cat([zs, self.proj(p.unsqueeze(0).expand(n, -1, -1))], dim=-1)
        s = F.layer_norm(zs, (self.state_dim,))
        return s * self.ln_weight.unsqueeze(1) + self.ln_bias.unsqueeze(1)

    def _injects(self) -> list[bool]:
        """Per layer (hidden..., out): whether the action A is part of its input (appended after the state part)."""
        per = self.cfg.per_layer_injection and self.cfg.action_dim > 0
        return [per or (i == 0 and self.cfg.action_dim > 0) for i in range(len(self.hidden))] + [per]

    def q_from_state(self, s: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """s [N, B, state_dim] (from encode_state), actions [B, A] or [B, S, A] -> Q [N, B] or [N, B, S].

        Every layer's weight is [N, in, out] with the injected action's rows LAST ([W_x; W_a], the checkpoint
        layout), so layer(cat[x, A]) = x W_x + A W_a + b. Computed that way, without the concatenation: the
        action parts of all injected layers and all members in one matmul over the B*S actions, and the state
        part of the first layer once per state (B rows), broadcast over its S actions. Same function as the
        concatenated form (tests/test_critic_speed.py checks it against that formulation in float64).
        """
        n, b, ds = s.shape
        adim = self.cfg.action_dim
        if actions.shape[0] != b or actions.shape[-1] != adim:
            raise ValueError(f"actions {tuple(actions.shape)} do not match batch {b} x action_dim {adim}")
        multi = actions.dim() == 3
        ns = actions.shape[1] if multi else 1
        m = b * ns
        layers = [*self.hidden, self.out]
        injects = self._injects()
        pa: list[torch.Tensor | None] = [None] * len(layers)
        if any(injects):
            idx = [i for i, inj in enumerate(injects) if inj]
            widths = [layers[i].weight.shape[-1] for i in idx]
            w_a = torch.cat([layers[i].weight[:, -adim:] for i in idx], dim=-1)  # [N, A, sum(out)]
            b_a = torch.cat([layers[i].bias for i in idx], dim=-1)  # [N, sum(out)]
            proj = torch.baddbmm(b_a.unsqueeze(1), actions.reshape(1, m, adim).expand(n, m, adim), w_a)
            for i, part in zip(idx, proj.split(widths, dim=-1), strict=True):
                pa[i] = part  # [N, M, out_i]: A W_a + b of layer i
        h = s
        for i, layer in enumerate(layers):
            w = layer.weight[:, :-adim] if injects[i] else layer.weight  # W_x: the rows of the non-action input
            if i == 0:
                hs = torch.bmm(h, w)  # [N, B, out]: the state part, once per state
                if pa[0] is not None:
                    h = (pa[0].view(n, b, ns, -1) + hs.unsqueeze(2)).view(n, m, -1)
                else:
                    h = (hs + layer.bias.unsqueeze(1)).unsqueeze(2).expand(n, b, ns, -1).reshape(n, m, -1)
            else:
                h = torch.baddbmm(pa[i] if pa[i] is not None else layer.bias.unsqueeze(1), h, w)
            if i == len(layers) - 1:
                break
            if self.cfg.layer_norm:
                h = F.layer_norm(h, (h.shape[-1],))
            h = self.act(h)
            if self.cfg.dropout > 0.0:
                h = F.dropout(h, self.cfg.dropout, self.training)
        q = h.squeeze(-1)  # [N, M]
        return q.view(n, b, ns) if multi else q

    def forward(self, z: torch.Tensor, p: torch.Tensor | None, actions: torch.Tensor) -> torch.Tensor:
        """Q [N, B] (or [N, B, S]) for features z [B, F], proprio p [B, P], critic actions [B, (S,) A]."""
        return self.q_from_state(self.encode_state(z, p), actions)


# --------------------------------------------------------------------------------------------------------------
# Targets and regularisers (pure functions, tested by hand)
# --------------------------------------------------------------------------------------------------------------
def td_target(rewards: torch.Tensor, done: torch.Tensor, next_q: torch.Tensor, gamma: float,
              n_steps: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk TD target y = sum_{j<n} gamma^j r_j + gamma^n (1 - done) next_q.

    rewards [B, n] (per control step of the executed part of the chunk; zero-padded after a terminal step),
    done [B] (1 if the episode terminated inside the chunk), next_q [B] (e.g. min_i Qtarg_i(s', A')),
    n_steps [B] optional number of steps actually executed (default n = rewards.shape[1]).
    """
    n = rewards.shape[1]
    disc = gamma ** torch.arange(n, dtype=rewards.dtype, device=rewards.device)
    ret = (rewards * disc).sum(-1)
    if n_steps is None:
        boot = torch.full_like(ret, gamma**n)
    else:
        boot = torch.pow(torch.as_tensor(gamma, dtype=ret.dtype, device=ret.device), n_steps.to(ret.dtype))
    return ret + boot * (1.0 - done.to(ret.dtype)) * next_q


def calql_regulariser(q_data: torch.Tensor, q_unif: torch.Tensor, q_ref: torch.Tensor, q_ref_next: torch.Tensor,
                      mc_return: torch.Tensor | None, calibrate: bool = True) -> torch.Tensor:
    """Cal-QL / CQL conservative term per member and sample: [N, B].

    logsumexp over {Q(s, a_unif) x S, Q(s, a_ref(s)) x S, Q(s, a_ref(s')) x S} - Q(s, a_data), no importance
    weights (flow policies have no likelihood). With `calibrate`, the reference-policy samples' Q values are
    first raised to at least the Monte-Carlo return-to-go mc_return [B] (Cal-QL); uniform samples are not.
    q_data [N, B]; q_unif, q_ref, q_ref_next [N, B, S].
    """
    if calibrate:
        if mc_return is None:
            raise ValueError("Cal-QL calibration needs the Monte-Carlo return-to-go")
        lower = mc_return.to(q_ref.dtype)[None, :, None]
        q_ref = torch.maximum(q_ref, lower)
        q_ref_next = torch.maximum(q_ref_next, lower)
    cat = torch.cat([q_unif, q_ref, q_ref_next], dim=-1)
    return torch.logsumexp(cat, dim=-1) - q_data


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """IQL asymmetric L2: |expectile - 1(diff < 0)| * diff^2 (diff = target - prediction)."""
    w = torch.where(diff > 0, expectile, 1.0 - expectile)
    return w * diff**2


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------
@dataclass
class CriticBatch:
    """One critic minibatch; all actions are critic actions (normalised, [.., n_exec * real_action_dim]).

    z, p: features at s [B, F], [B, P] (p None if no proprio); z_next, p_next at s'.
    actions [B, A] executed (data) actions; rewards [B, n] per step; done [B] terminal inside the chunk;
    mc_return [B] discounted Monte-Carlo return-to-go from s (per-step discount gamma);
    ref_actions [B, S, A] reference-policy samples at s; ref_next_actions [B, S, A] at s'
    (ref_next_actions[:, 0] is the A' of the TD target); n_steps [B] optional executed step count;
    group [B] optional int64: rows with the same id >= 0 start in the same state (branch rollouts) and feed the
    within-state contrast term; -1 = no group.
    """

    z: torch.Tensor
    p: torch.Tensor | None
    actions: torch.Tensor
    rewards: torch.Tensor
    done: torch.Tensor
    z_next: torch.Tensor
    p_next: torch.Tensor | None
    mc_return: torch.Tensor | None = None
    ref_actions: torch.Tensor | None = None
    ref_next_actions: torch.Tensor | None = None
    n_steps: torch.Tensor | None = None
    group: torch.Tensor | None = None


def contrast_loss(q: torch.Tensor, mc_return: torch.Tensor, group: torch.Tensor) -> torch.Tensor | None:
    """Within-state contrast: for every ordered pair (i, j), i != j, of rows in the same group (same state,
    different actions), ((Q_i - Q_j) - (G_i - G_j))^2 with G the Monte-Carlo return-to-go; mean over pairs, summed
    over ensemble members. q [N, B], mc_return [B], group [B] (-1 = none). E[G_i - G_j] = Q(s, a_i) - Q(s, a_j), so
    this regresses the action dependence of Q directly, where TD + Cal-QL mostly fit the state value. None when
    the batch holds no pair."""
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return None
    dq = q[:, :, None] - q[:, None, :]  # [N, B, B]
    dg = (mc_return[:, None] - mc_return[None, :]).to(q.dtype)  # [B, B]
    sq = (dq - dg[None]) ** 2
    return (sq * same[None]).sum(dim=(1, 2)).div(same.sum()).sum()


@dataclass
class CriticTrainConfig:
    """Critic objective and optimisation. objective: calql (default) / cql (no calibration) / iql.
    contrast_weight > 0 adds contrast_loss on the batch's groups (CriticBatch.group) to any objective."""

    objective: Objective = "calql"
    gamma: float = 0.99  # per control step; a chunk of n steps bootstraps with gamma^n
    reg_weight: float = 1.0  # w of the Cal-QL / CQL term
    num_uniform: int = 10  # uniform samples per state in [-1, 1]
    target_tau: float = 5e-3  # EMA rate of the target networks
    lr: float = 3e-4
    grad_clip: float | None = 10.0
    iql_expectile: float = 0.7
    value_hidden: tuple[int, ...] = (256, 256)
    contrast_weight: float = 0.0


class CriticTrainer:
    """Holds the ensemble, its EMA target, (IQL) a value net, and an Adam optimiser; `update(batch)` trains."""

    def __init__(self, critic: QEnsemble, cfg: CriticTrainConfig | None = None) -> None:
        self.cfg = cfg or CriticTrainConfig()
        if self.cfg.objective not in ("calql", "cql", "iql"):
            raise ValueError(f"unknown critic objective {self.cfg.objective!r} (calql / cql / iql)")
        if not (self.cfg.contrast_weight >= 0 and math.isfinite(self.cfg.contrast_weight)):
            raise ValueError(f"contrast_weight must be a finite number >= 0, got {self.cfg.contrast_weight}")
        self.critic = critic
        self.target = copy.deepcopy(critic).requires_grad_(False)
        params = list(critic.parameters())
        self.value: QEnsemble | None = None
        if self.cfg.objective == "iql":
            c = critic.cfg
            self.value = QEnsemble(CriticConfig(feature_dim=c.feature_dim, proprio_dim=c.proprio_dim, n_exec=0,
                                                real_action_dim=0, num_q=1, hidden=self.cfg.value_hidden,
                                                proprio_proj_dim=c.proprio_proj_dim, per_layer_injection=False,
                                                activation=c.activation))
            p0 = next(critic.parameters())
            self.value.to(dtype=p0.dtype, device=p0.device)
            params += list(self.value.parameters())
        broadcast_parameters(params)  # data-parallel: every rank starts from rank 0's weights
        broadcast_parameters(self.target.parameters())
        self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr)

    def _no_action(self, b: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(b, 0)

    def loss(self, batch: CriticBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss (sum over members of mean TD MSE + w * regulariser) and scalar metrics."""
        cfg = self.cfg
        b = batch.actions.shape[0]
        s = self.critic.encode_state(batch.z, batch.p)
        metrics: dict[str, float] = {}
        if cfg.objective == "iql":
            q_data = self.critic.q_from_state(s, batch.actions)  # [N, B]
            assert self.value is not None
            with torch.no_grad():
                q_t = self.target(batch.z, batch.p, batch.actions).min(0).values  # [B]
                v_next = self.value(batch.z_next, batch.p_next, self._no_action(b, batch.z))[0]
                y = td_target(batch.rewards, batch.done, v_next, cfg.gamma, batch.n_steps)
            v = self.value(batch.z, batch.p, self._no_action(b, batch.z))[0]
            v_loss = expectile_loss(q_t - v, cfg.iql_expectile).mean()
            td = ((q_data - y[None]) ** 2).mean(-1).sum()
            loss = td + v_loss
            metrics["value_loss"] = v_loss.item()
        else:
            if batch.ref_actions is None or batch.ref_next_actions is None:
                raise ValueError(f"{cfg.objective} needs reference-policy samples at s and s'")
            with torch.no_grad():
                next_q = self.target(batch.z_next, batch.p_next, batch.ref_next_actions[:, 0]).min(0).values
                y = td_target(batch.rewards, batch.done, next_q, cfg.gamma, batch.n_steps)
            unif = torch.rand(b, cfg.num_uniform, batch.actions.shape[-1], dtype=batch.actions.dtype,
                              device=batch.actions.device) * 2.0 - 1.0
            # one critic pass for the data action and every regulariser sample: [B, 1 + U + R + R', A]
            sizes = [1, cfg.num_uniform, batch.ref_actions.shape[1], batch.ref_next_actions.shape[1]]
            acts = torch.cat([batch.actions.unsqueeze(1), unif, batch.ref_actions, batch.ref_next_actions], dim=1)
            q_data, q_unif, q_ref, q_ref_next = self.critic.q_from_state(s, acts).split(sizes, dim=-1)
            q_data = q_data.squeeze(-1)  # [N, B]
            td = ((q_data - y[None]) ** 2).mean(-1).sum()
            reg = calql_regulariser(q_data, q_unif, q_ref, q_ref_next, batch.mc_return,
                                    calibrate=cfg.objective == "calql").mean(-1).sum()
            loss = td + cfg.reg_weight * reg
            metrics["reg"] = reg.item()
            metrics["q_ref"] = q_ref.mean().item()
        if cfg.contrast_weight > 0 and batch.group is not None:
            if batch.mc_return is None:
                raise ValueError("the contrast term needs Monte-Carlo returns in the batch")
            con = contrast_loss(q_data, batch.mc_return, batch.group)
            if con is not None:
                loss = loss + cfg.contrast_weight * con
                metrics["contrast"] = con.item()
        metrics.update(td_loss=td.item(), q_data=q_data.mean().item(), target=y.mean().item())
        return loss, metrics

    def update(self, batch: CriticBatch) -> dict[str, float]:
        """One gradient step + EMA target update. Raises FloatingPointError (without stepping) on a NaN loss.

        Under torchrun (initialised process group) gradients are averaged over ranks before the step.
        """
        loss, metrics = self.loss(batch)
        if not finite_on_all_ranks(loss):
            raise FloatingPointError(f"critic loss is not finite (here: {loss.item()}); no step taken")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        average_gradients(params)  # no-op in one process
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("critic gradient is not finite; no step taken")
        metrics["grad_norm"] = float(norm)
        self.optimizer.step()
        self.update_target()
        metrics["loss"] = loss.item()
        return metrics

    @torch.no_grad()
    def update_target(self) -> None:
        """Qtarg <- (1 - tau) Qtarg + tau Q."""
        for pt, p in zip(self.target.parameters(), self.critic.parameters(), strict=True):
            pt.lerp_(p, self.cfg.target_tau)


@torch.no_grad()
def reference_actions(policy, context, num_samples: int, n_exec: int, num_steps: int = 10) -> torch.Tensor:
    """Sample `num_samples` chunks per observation from a FlowPolicy -> critic actions [B, S, n_exec * real]."""
    out = [critic_action(policy.sample(context, num_steps=num_steps), n_exec, policy.real_action_dim)
           for _ in range(num_samples)]
    return torch.stack(out, dim=1)

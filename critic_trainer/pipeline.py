"""Offline improvement pipeline: replay buffer + SFT checkpoint -> critic -> improved checkpoint.

    critic_trainer qvgm --dataset DIR --policy CKPT (--out DIR | --store STORE) [--method qvgm|qdistill|dql|
                        filtered-bc|sft] [--critic-objective calql|cql|iql] [--ensemble N]
                        [--aggregate mean|min|lcb] [--gate last-M|smooth] [--no-projection] [--no-clipping]
                        [--no-keep-best] [--critic-steps N] [--actor-steps N] [--seed S]
                        [--critic-features rl-token|pooled] [--no-per-layer-injection] [--lcb-beta B]
                        [--max-shift S] [--holdout F] [--actor-eval-every N] [--actor-patience P]
                        [--action-box data|unit] [--dql-eta A] [--dql-box-weight W] [--distill-max-shift S|none]
                        [--distill-ascent-steps J] [--distill-ascent-lr A|none] [--distill-bc-weight W] ...

Stages (each a public function, reused by bench/learning.py):
 1. `load_buffer`: every frame of the kept (non-discarded) episodes: observations (state, privileged state from
    the `critic_trainer demos` side files, prompts, images for pixel backbones), executed actions (robot units),
    next.reward, next.done, episode ids and success labels.
 2. `extract_features`: the FROZEN input policy runs over the buffer once -> FeatureCache with
    z_rl [T, F] (policy.critic_features of the encoded context), proprio [T, state_dim] (normalised state) and
    ref_actions [T, S, n_exec * real] (S reference-policy samples per frame, normalised critic actions; sample 0
    at s' is the A' of the TD target). The cache key is the checkpoint's weight hash + buffer fingerprint +
    settings, so a new checkpoint (or buffer) rebuilds it.
 3. `fit_critic` (critic_trainer.fit) on chunk transitions (n_exec steps, gamma per control step).
 4. Actor update by `--method`, actor init = the input policy, reference = a frozen copy:
    qvgm (METHOD.md §4), qdistill (flow matching onto critic-improved terminal chunks: Q-VGM's ascent, projection
    and a trust region around the reference's sample), dql (BC + eta * -Q/mean|Q| of the box-clamped sample,
    backprop through all K denoising steps), filtered-bc (flow matching on successful episodes), sft (all frames).
 5. The new checkpoint (save_policy or CheckpointStore.writing) with parent = the input version, a training
    summary in its manifest, and the critic (critic.safetensors + critic.json) for the test-time baselines
    (`BestOfNPolicy`, `QGuidedPolicy`). A non-finite loss stops training and publishes nothing.
 6. `evaluate`: closed-loop episodes in TabletopEnv executing n_exec steps per inference; success rate with a 95 %
    Wilson interval.
Flow-time convention (openpi): t = 1 noise, t = 0 clean; x_t = t * eps + (1 - t) * a; Euler dt = -1/K from t = 1.
All actions inside the trainer are normalised (quantile stats of the input checkpoint, [-1, 1] nominal; real
actions of the buffer can lie outside it, hence the data-derived action box of the critic methods, `action_box`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from critic_trainer.baselines import best_of_n, diffusion_ql_loss, q_distill_loss, q_guided_sample
from critic_trainer.critic import CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble, critic_action
from critic_trainer.features import CRITIC_FEATURES, FeatureCache, critic_state_features, resolve_critic_features
from critic_trainer.fit import check_training_data, evaluate_critic, fit_critic
from critic_trainer.qvgm import QVGMConfig, bind_critic, qvgm_update
from critic_trainer.scalars import ScalarLog
from critic_trainer.sft import DemoData, batch_inputs, encode_inputs
from critic_trainer.transitions import ChunkTransitions, chunk_transitions
from qvgm.data import DatasetError, ReplayReader
from qvgm.data.video import sim_video
from qvgm.devices import DEVICE_CHOICES_HELP, resolve_device
from qvgm.policy.flow import FlowPolicyBase

HELP = "improve a policy offline from a replay buffer: critic + Q-VGM (or a same-backbone baseline)"
METHODS = ("qvgm", "qdistill", "dql", "filtered-bc", "sft")
CRITIC_METHODS = ("qvgm", "qdistill", "dql")
DEMO_VERSION = "expert"  # policy_version of scripted-expert demo frames (critic_trainer.demos)
CRITIC_WEIGHTS, CRITIC_CONFIG = "critic.safetensors", "critic.json"


# ---------------------------------------------------------------------------------------------------- buffer
@dataclass
class BufferData:
    """Frames of the kept episodes of one replay buffer, in episode order.

    demo: observations + H-step action chunks (robot units) for flow matching (see critic_trainer.sft.DemoData);
    action [T, real] executed actions (robot units); reward [T] next.reward; done [T] next.done;
    episode [T] buffer episode_index; success [T] bool label of the frame's episode (False when unlabelled);
    version [T] str policy_version of each frame ("expert" = scripted demo), None when not read;
    root [T] the episode each frame's episode branched from (collect_rollouts branches: notes "branch_of"; its own
    index otherwise), None when not read: held-out splits keep an episode and its branches together.
    branch_group [T] int64: frames that are the SAME simulator state with different actions taken there (a branch
    episode's first frame and the frame of its root episode at "branch_step") share a group id >= 0; -1 for
    every other frame. Groups with fewer than two frames are -1. None when not read.
    """

    demo: DemoData
    action: np.ndarray
    reward: np.ndarray
    done: np.ndarray
    episode: np.ndarray
    success: np.ndarray
    path: str
    version: np.ndarray | None = None
    root: np.ndarray | None = None
    branch_group: np.ndarray | None = None

    def rollout_frames(self) -> np.ndarray:
        """bool [T]: frames of policy rollouts, i.e. of episodes with any frame not from the scripted expert
        (version != "expert"); all False when the versions were not read."""
        if self.version is None:
            return np.zeros(len(self.action), dtype=bool)
        not_expert = self.version != DEMO_VERSION
        eps = np.unique(self.episode[not_expert])
        return np.isin(self.episode, eps)

    def __len__(self) -> int:
        return len(self.action)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.demo.fingerprint().encode())
        for a in (self.reward, self.done, self.episode):
            h.update(np.ascontiguousarray(a).tobytes())
        if self.demo.privileged is not None:
            h.update(np.ascontiguousarray(self.demo.privileged).tobytes())
        return h.hexdigest()


def load_buffer(dataset: str | Path, horizon: int, with_images: bool = False) -> BufferData:
    """Read a replay buffer (see critic_trainer.demos for the privileged side files). Raises ValueError for an
    empty buffer, FileNotFoundError / DatasetError for a missing or unreadable one."""
    from critic_trainer.demos import load_privileged

    if not Path(dataset).exists():
        raise FileNotFoundError(f"dataset {dataset} does not exist")
    r = ReplayReader(dataset, decode_images=with_images)
    try:
        eps = [e for e in range(len(r.episodes)) if r.episode_mask[e]]
        if not eps or all(r.ep_end[e] == r.ep_start[e] for e in eps):
            raise ValueError(f"the replay buffer {dataset} is empty (no kept episodes with frames)")
        priv_all = load_privileged(r)
        rows, chunks, valid, succ, roots = [], [], [], [], []
        starts: dict[int, int] = {}  # episode_index -> its first row in the loaded frames
        points: dict[tuple[int, int], list[int]] = {}  # (root episode, branch step) -> loaded rows in that state
        n_loaded = 0
        for e in eps:
            starts[int(r.episodes[e]["episode_index"])] = n_loaded
            n_loaded += int(r.ep_end[e] - r.ep_start[e])
        for e in eps:
            root, step = branch_point(r.episodes[e])
            if step is not None and root in starts and r.ep_end[e] > r.ep_start[e]:
                points.setdefault((root, step), []).append(starts[int(r.episodes[e]["episode_index"])])
        for e in eps:
            s, t = int(r.ep_start[e]), int(r.ep_end[e])
            g = np.arange(s, t)
            idx = g[:, None] + np.arange(horizon)[None]
            chunks.append(r.action[np.minimum(idx, t - 1)])
            valid.append(idx < t)
            rows.append(g)
            succ.append(np.full(t - s, r.episodes[e].get("success") is True))
            roots.append(np.full(t - s, branch_root(r.episodes[e])))
        g_all = np.concatenate(rows)
        group = np.full(len(g_all), -1, dtype=np.int64)
        ep_len = {idx: int(np.sum(r.episode_index[g_all] == idx)) for idx in starts} if points else {}
        for gid, ((root, step), members) in enumerate(sorted(points.items())):
            if step < ep_len[root]:  # the root episode's own frame in that state
                members = [starts[root] + step, *members]
            group[members] = gid if len(members) >= 2 else -1
        if (group >= 0).any():  # dense ids 0..G-1
            keep = group >= 0
            group[keep] = np.unique(group[keep], return_inverse=True)[1]
        images: dict[str, np.ndarray] = {}
        if with_images and r.video_keys:
            dec = r.images(g_all.tolist())
            for cam in dec[int(g_all[0])]:
                images[cam] = np.stack([dec[int(g)][cam] for g in g_all])
        demo = DemoData(state=r.state[g_all].astype(np.float32), actions=np.concatenate(chunks).astype(np.float32),
                        valid=np.concatenate(valid), privileged=None if priv_all is None else priv_all[g_all],
                        prompts=[r.tasks[int(i)] for i in r.task_index[g_all]], images=images,
                        episode=r.episode_index[g_all].copy(), datasets=[str(dataset)], fps=r.fps)
        return BufferData(demo=demo, action=r.action[g_all].astype(np.float32),
                          reward=r.reward[g_all].astype(np.float32), done=r.done[g_all].copy(),
                          episode=r.episode_index[g_all].copy(), success=np.concatenate(succ), path=str(dataset),
                          version=np.asarray([str(v) for v in np.asarray(r.policy_version)[g_all]]),
                          root=np.concatenate(roots), branch_group=group)
    finally:
        r.close()


def branch_point(row: dict[str, Any]) -> tuple[int, int | None]:
    """(episode index it branched from, control step of the branch state) of an episode row (collect_rollouts:
    notes JSON "branch_of", "branch_step"); (its own index, None) for an episode that is not a branch."""
    try:
        notes = json.loads(row.get("notes") or "{}")
    except (TypeError, ValueError):  # free-text notes of other writers
        notes = {}
    if not isinstance(notes, dict):
        return int(row["episode_index"]), None
    of, step = notes.get("branch_of"), notes.get("branch_step")
    if not isinstance(of, int) or isinstance(of, bool):
        return int(row["episode_index"]), None
    ok = isinstance(step, int) and not isinstance(step, bool) and step >= 0
    return int(of), int(step) if ok else None


def branch_root(row: dict[str, Any]) -> int:
    """The episode index an episode row branched from (collect_rollouts: notes JSON "branch_of"), else its own."""
    return branch_point(row)[0]


def transition_groups(buf: BufferData, tr: ChunkTransitions) -> np.ndarray | None:
    """int64 [M]: the branch group (BufferData.branch_group) of each transition's first frame, -1 outside a group
    and for groups left with one transition (windows are dropped at episode ends); None when the buffer has none."""
    if buf.branch_group is None or not (buf.branch_group >= 0).any():
        return None
    g = buf.branch_group[tr.index].copy()
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    g[np.isin(g, ids[counts < 2])] = -1
    return g if (g >= 0).any() else None


def check_compatible(policy: FlowPolicyBase, buf: BufferData) -> None:
    """Refuse a buffer recorded with another action/state space than the policy's (ValueError naming both)."""
    cfg = policy.config
    if buf.action.shape[1] != policy.real_action_dim:
        raise ValueError(f"buffer {buf.path} has {buf.action.shape[1]}-dim actions, the policy expects "
                         f"{policy.real_action_dim}: incompatible action space")
    if buf.demo.state.shape[1] != cfg.state_dim:
        raise ValueError(f"buffer {buf.path} has {buf.demo.state.shape[1]}-dim states, the policy expects "
                         f"{cfg.state_dim}: incompatible robot")
    pdim = int(getattr(cfg, "privileged_dim", 0) or 0)
    if pdim:
        if buf.demo.privileged is None:
            raise ValueError(f"the `state` policy needs privileged object state, buffer {buf.path} has none "
                             "(no meta/qvgm_privileged side files)")
        if buf.demo.privileged.shape[1] != pdim:
            raise ValueError(f"buffer {buf.path} has {buf.demo.privileged.shape[1]}-dim privileged state, the "
                             f"policy expects {pdim}")


def check_outcomes(buf: BufferData) -> None:
    """A critic needs both outcomes to rank: refuse a buffer whose episodes all succeeded or all failed."""
    eps = np.unique(buf.episode)
    ok = np.unique(buf.episode[buf.success])
    if ok.size == 0 or ok.size == eps.size:
        what = "no successful" if ok.size == 0 else "no failed"
        raise ValueError(f"buffer {buf.path} has {what} episodes ({ok.size}/{eps.size} successful): the critic needs "
                         "both successful and failed episodes")


def normalised_actions(policy: FlowPolicyBase, action: np.ndarray) -> np.ndarray:
    """Robot-unit actions [T, real] -> normalised float32 [T, real] (the policy's quantile stats)."""
    return policy.processor.normalize_actions(action[:, None, :])[:, 0, : policy.real_action_dim].numpy()


def buffer_transitions(policy: FlowPolicyBase, buf: BufferData, n_exec: int, gamma: float) -> ChunkTransitions:
    """Chunk transitions over the buffer's frame rows (critic actions normalised with the policy's stats)."""
    return chunk_transitions(buf.episode, normalised_actions(policy, buf.action), buf.reward, buf.done, n_exec,
                             gamma)


# ---------------------------------------------------------------------------------------------------- features
def checkpoint_key(policy: FlowPolicyBase) -> str:
    """sha256 identity of the frozen policy: the manifest's weight + norm-stats hashes when loaded from a
    checkpoint, else a hash of the state_dict bytes."""
    files = (getattr(policy, "manifest", None) or {}).get("files") or {}
    if "model.safetensors" in files:
        return f"{files['model.safetensors']}:{files.get('norm_stats.json', '')}"
    h = hashlib.sha256()
    for k, v in sorted(policy.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def extract_features(policy: FlowPolicyBase, buf: BufferData, cache_dir: str | Path, n_exec: int,
                     num_ref: int = 4, num_steps: int = 10, seed: int = 0, batch: int = 512,
                     progress: bool = False, features: str = "rl-token") -> tuple[FeatureCache, str | None]:
    """Run the frozen policy over every buffer frame once -> (FeatureCache, why it was (re)built or None).

    Fields: z_rl float32 [T, F] (the critic state features of kind `features`, see
    critic_trainer.features.critic_state_features), proprio float32 [T, state_dim] (normalised), ref_actions
    float32 [T, num_ref, n_exec * real] (normalised critic actions of reference samples, noise seeded by `seed`).
    The key holds the resolved feature kind: an "rl-token" and a "pooled" cache never collide.
    """
    kind = resolve_critic_features(policy, features)
    key = json.dumps({"policy": checkpoint_key(policy), "buffer": buf.fingerprint(), "n_exec": n_exec,
                      "num_ref": num_ref, "num_steps": num_steps, "seed": seed, "features": kind}, sort_keys=True)

    def build() -> dict[str, np.ndarray]:
        policy.eval()
        gen = torch.Generator().manual_seed(seed)
        z, p, ref = [], [], []
        rng = range(0, len(buf), batch)
        for s in tqdm(rng, desc="features", disable=not progress, dynamic_ncols=True):
            inputs = policy.preprocess(buf.demo.observations(range(s, min(s + batch, len(buf)))))
            ctx = policy.encode(inputs)
            b = inputs["state"].shape[0]
            z.append(critic_state_features(policy, ctx, inputs, features).cpu())
            p.append(inputs["state"].float().cpu())
            samples = []
            for _ in range(num_ref):
                eps = torch.randn(b, policy.horizon, policy.action_dim, generator=gen).to(policy.device)
                chunk = policy.sample(ctx, num_steps=num_steps, noise=eps)
                samples.append(critic_action(chunk, n_exec, policy.real_action_dim).float().cpu())
            ref.append(torch.stack(samples, 1))
        return {"z_rl": torch.cat(z).numpy(), "proprio": torch.cat(p).numpy(), "ref_actions": torch.cat(ref).numpy()}

    return FeatureCache.load_or_build(cache_dir, key, build)


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class ImproveConfig:
    """Settings of one offline improvement run. Steps are optimiser steps; lr are Adam learning rates."""

    method: str = "qvgm"
    n_exec: int = 5
    num_steps: int = 10  # K
    gamma: float = 0.99
    seed: int = 0
    # critic
    critic_objective: str = "calql"
    ensemble: int = 2
    aggregate: str = "mean"
    critic_hidden: tuple[int, ...] = (256, 256)
    critic_steps: int = 2000
    critic_batch: int = 256
    critic_lr: float = 3e-4
    reg_weight: float = 0.1  # Cal-QL w: 0.1 ranks held-out outcomes far better than 1 on push (docs/RESULTS.md)
    num_ref: int = 4
    critic_features: str = "rl-token"  # rl-token (policy.critic_features) / pooled, see critic_trainer.features
    per_layer_injection: bool = True  # A into every critic layer (False: first layer only)
    critic_layer_norm: bool = False  # LayerNorm on the critic's hidden activations
    critic_dropout: float = 0.0
    # share of every critic batch drawn from the policy's own rollouts (the buffer's non-expert episodes, where
    # the failures are) when the buffer also holds scripted demos; 0 = uniform over all transitions
    critic_rollout_fraction: float = 0.0
    # within-state contrast (critic_trainer.critic.contrast_loss) on the buffer's branch groups (collect_rollouts
    # branches): its weight next to TD + Cal-QL (0 = off; a buffer without branches has no groups), and how many
    # groups join every critic batch
    critic_contrast_weight: float = 0.0
    critic_contrast_groups: int = 16
    holdout: float = 0.0  # fraction of episodes held out of critic training: critic evaluation + actor early stop
    # actor
    actor_steps: int = 300
    actor_batch: int = 64
    actor_lr: float = 1e-4
    gate: str = "last_m"
    gate_last_m: int = 5
    ascent_steps: int = 4
    # alpha: 0.02 chosen on tuning seeds (docs/RESULTS.md, Q-VGM's projection box; METHOD.md's 0.05 and 0.1
    # exploit the critic more)
    ascent_lr: float = 0.02
    project: bool = True  # project ascent iterates (Q-VGM, Q-distillation) / DQL samples onto the action box
    # the ONE action box of Q-VGM's and Q-distillation's ascent projection and of Diffusion-QL's sample clamp:
    # "data" = per action dim the range of the buffer's executed actions (and at least [-1, 1]), "unit" = [-1, 1]
    action_box: str = "data"
    clip_grad: bool = True
    keep_best: bool = True
    lcb_beta: float = 1.0  # aggregate "lcb" = mean - lcb_beta * std over the ensemble
    max_shift: float | None = None  # trust region: RMS bound on A_Q - A_base per critic coordinate (normalised)
    trust_origin: str = "base"  # centre of the trust region: base (A_base per step) / reference (its own sample)
    actor_eval_every: int = 0  # > 0: every N actor steps measure the held-out LCB Q of the actor's own actions,
    actor_patience: int = 3  # keep the best actor by it and stop after `actor_patience` checks without a gain
    anchor_weight: float = 1.0
    bc_weight: float = 0.0
    steps_per_sample: int | None = None  # Q-VGM: None = all K steps; S = S drawn steps per sample (unbiased)
    # control (critic methods): bind the critic to OTHER frames' states (a random permutation within each actor
    # batch), so the ascent follows a gradient of the real critic's scale and action structure that says nothing
    # about this state. With ascent_steps = 0 (the no-critic control) these two controls bracket the critic's part.
    shuffle_critic_states: bool = False
    # same-backbone baselines (values chosen on tuning seeds only: docs/RESULTS.md, baselines section)
    dql_eta: float = 0.001  # Diffusion-QL alpha: weight of -Q(s, a_pi) / mean|Q| next to the BC flow loss (weight 1)
    dql_box_weight: float = 10.0  # Diffusion-QL: pull-back of sample coordinates outside the box (with project)
    dql_box: str | None = None  # deprecated alias of action_box (given: it sets action_box)
    distill_max_shift: float | None = 0.01  # Q-distillation trust region: RMS bound of target - reference sample
    distill_ascent_steps: int | None = None  # Q-distillation ascent steps J (None: ascent_steps)
    distill_ascent_lr: float | None = 0.05  # Q-distillation ascent step alpha, as tuned (None: ascent_lr)
    distill_bc_weight: float = 0.0  # Q-distillation: weight of a BC flow loss on buffer chunks
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.gate in ("last-M", "last-m"):
            self.gate = "last_m"
        if self.gate not in ("last_m", "smooth"):
            raise ValueError(f"unknown gate {self.gate!r} (last-M / smooth)")
        if self.aggregate not in ("mean", "min", "lcb"):
            raise ValueError(f"unknown aggregate {self.aggregate!r} (mean / min / lcb)")
        if self.critic_objective not in ("calql", "cql", "iql"):
            raise ValueError(f"unknown critic objective {self.critic_objective!r} (calql / cql / iql)")
        if self.ensemble < 1 or self.n_exec < 1 or self.num_steps < 1 or self.actor_steps < 0 or self.critic_steps < 0:
            raise ValueError("ensemble, n_exec, num_steps must be >= 1 and step counts >= 0")
        if self.critic_features not in CRITIC_FEATURES:
            raise ValueError(f"unknown critic features {self.critic_features!r} (rl-token / pooled)")
        if not (self.critic_contrast_weight >= 0 and math.isfinite(self.critic_contrast_weight)) \
                or self.critic_contrast_groups < 1:
            raise ValueError(f"critic_contrast_weight must be finite and >= 0 and critic_contrast_groups >= 1, got "
                             f"{self.critic_contrast_weight}, {self.critic_contrast_groups}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        if self.trust_origin not in ("base", "reference"):
            raise ValueError(f"unknown trust origin {self.trust_origin!r} (base / reference)")
        if self.max_shift is not None and self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")
        if self.dql_box is not None:  # deprecated alias: one box for every method
            self.action_box, self.dql_box = self.dql_box, None
        if self.action_box not in ("data", "unit"):
            raise ValueError(f"unknown action_box {self.action_box!r} (data / unit)")
        if self.dql_eta < 0 or self.distill_bc_weight < 0 or self.dql_box_weight < 0:
            raise ValueError(f"dql_eta, dql_box_weight and distill_bc_weight must be >= 0, got {self.dql_eta}, "
                             f"{self.dql_box_weight}, {self.distill_bc_weight}")
        if self.distill_max_shift is not None and self.distill_max_shift < 0:
            raise ValueError(f"distill_max_shift must be >= 0, got {self.distill_max_shift}")
        if self.ascent_lr < 0 or (self.distill_ascent_lr is not None and self.distill_ascent_lr < 0):
            raise ValueError(f"ascent_lr and distill_ascent_lr must be >= 0, got {self.ascent_lr}, "
                             f"{self.distill_ascent_lr}")
        if self.distill_ascent_steps is not None and self.distill_ascent_steps < 0:
            raise ValueError(f"distill_ascent_steps must be >= 0, got {self.distill_ascent_steps}")
        if self.actor_eval_every < 0 or self.actor_patience < 1:
            raise ValueError("actor_eval_every must be >= 0 and actor_patience >= 1")
        if self.steps_per_sample is not None and self.steps_per_sample < 1:
            raise ValueError(f"steps_per_sample must be >= 1 (or None for all K), got {self.steps_per_sample}")

    def qvgm(self) -> QVGMConfig:
        return QVGMConfig(n_exec=self.n_exec, num_steps=self.num_steps, ascent_steps=self.ascent_steps,
                          ascent_lr=self.ascent_lr, clip_grad=self.clip_grad, project=self.project,
                          keep_best=self.keep_best, max_shift=self.max_shift, trust_origin=self.trust_origin,
                          gate=self.gate,
                          gate_last_m=self.gate_last_m, anchor_weight=self.anchor_weight, bc_weight=self.bc_weight,
                          steps_per_sample=self.steps_per_sample)

    def distill(self) -> QVGMConfig:
        """The ascent settings of Q-distillation: Q-VGM's, with its own trust region and number of steps."""
        steps = self.ascent_steps if self.distill_ascent_steps is None else self.distill_ascent_steps
        lr = self.ascent_lr if self.distill_ascent_lr is None else self.distill_ascent_lr
        return replace(self.qvgm(), max_shift=self.distill_max_shift, ascent_steps=steps, ascent_lr=lr)


# ---------------------------------------------------------------------------------------------------- critic
def build_critic(policy: FlowPolicyBase, features: FeatureCache, cfg: ImproveConfig) -> QEnsemble:
    return QEnsemble(CriticConfig(feature_dim=features["z_rl"].shape[1], proprio_dim=features["proprio"].shape[1],
                                  n_exec=cfg.n_exec, real_action_dim=policy.real_action_dim, num_q=cfg.ensemble,
                                  hidden=tuple(cfg.critic_hidden), per_layer_injection=cfg.per_layer_injection,
                                  layer_norm=cfg.critic_layer_norm, dropout=cfg.critic_dropout))


def subset_transitions(tr: ChunkTransitions, keep: np.ndarray) -> ChunkTransitions:
    """The transitions where the bool mask keep [M] is True (frame rows unchanged)."""
    return ChunkTransitions(**{k: getattr(tr, k)[keep] for k in ("index", "next_index", "actions", "rewards", "done",
                                                                  "n_steps", "mc_return")})


def holdout_episodes(buf: BufferData, frac: float, seed: int = 0) -> np.ndarray:
    """Episode ids held out (critic evaluation, actor early stopping): a seeded `frac` of the buffer's episodes,
    at least one successful and one failed episode when frac > 0 and both exist (stratified by outcome). Branch
    episodes (buf.root) go wherever the episode they branched from goes: a held-out state is never trained on."""
    if frac <= 0:
        return np.zeros(0, dtype=buf.episode.dtype)
    root = buf.episode if buf.root is None else buf.root
    rng = np.random.default_rng(seed + 31)
    out = []
    ok = set(np.unique(buf.episode[buf.success]).tolist())
    roots = np.unique(root)
    for group in ([e for e in roots if e in ok], [e for e in roots if e not in ok]):
        if len(group) >= 2:
            k = min(len(group) - 1, max(1, round(frac * len(group))))
            out += rng.choice(group, size=k, replace=False).tolist()
    return np.unique(buf.episode[np.isin(root, out)]).astype(buf.episode.dtype)


def split_transitions(buf: BufferData, tr: ChunkTransitions,
                      held: np.ndarray) -> tuple[ChunkTransitions, ChunkTransitions | None]:
    """(training transitions, held-out transitions or None) by the episode of each transition's first frame."""
    if held.size == 0:
        return tr, None
    mask = np.isin(buf.episode[tr.index], held)
    return subset_transitions(tr, ~mask), subset_transitions(tr, mask)


def train_critic(policy: FlowPolicyBase, features: FeatureCache, transitions: ChunkTransitions, cfg: ImproveConfig,
                 log: ScalarLog | None = None, progress: bool = False,
                 heldout: ChunkTransitions | None = None,
                 rollouts: np.ndarray | None = None,
                 groups: np.ndarray | None = None) -> tuple[QEnsemble, dict[str, Any]]:
    """Fit the critic ensemble on cached features; returns (critic in eval mode, {fit metrics, evaluation}).

    heldout: transitions of episodes the critic never trains on; their evaluation is reported as "heldout"
    (MC-return correlation, calibration) next to "eval" on the training transitions.
    rollouts: bool [M] per training transition, True for the policy's own rollouts: cfg.critic_rollout_fraction of
    every batch is drawn from them (critic_trainer.fit.batch_sampler), and the critic is also evaluated on them
    alone ("eval_rollouts", when they hold both outcomes).
    groups: int [M] branch group per training transition (transition_groups), used when
    cfg.critic_contrast_weight > 0; the contrast term then needs them (ValueError without any group).
    """
    torch.manual_seed(cfg.seed)
    if cfg.critic_contrast_weight > 0 and (groups is None or not (np.asarray(groups) >= 0).any()):
        raise ValueError("critic_contrast_weight > 0 needs same-state groups of transitions: a buffer recorded "
                         "with branches (collect_rollouts(branches=K), bench/learning.py --branches K)")
    dev = policy.device  # the critic trains where the policy lives; batches are gathered on the CPU, then moved
    critic = build_critic(policy, features, cfg).to(dev)
    check_training_data(critic, transitions)
    contrast = cfg.critic_contrast_weight > 0
    trainer = CriticTrainer(critic, CriticTrainConfig(objective=cfg.critic_objective, gamma=cfg.gamma,
                                                      reg_weight=cfg.reg_weight, lr=cfg.critic_lr,
                                                      contrast_weight=cfg.critic_contrast_weight))
    bar = tqdm(total=cfg.critic_steps, desc="critic", disable=not progress, dynamic_ncols=True)
    last: dict[str, float] = {}

    def on_step(step: int, m: dict[str, float]) -> None:
        last.update(m)
        bar.update(1)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.critic_steps):
            log.log("critic", step + 1, m)
            bar.set_postfix(loss=f"{m['loss']:.3f}")

    try:
        fit_critic(trainer, features, transitions, cfg.critic_steps, batch_size=cfg.critic_batch, seed=cfg.seed,
                   device=dev, log=on_step, emphasis=rollouts, emphasis_fraction=cfg.critic_rollout_fraction,
                   groups=groups if contrast else None, groups_per_batch=cfg.critic_contrast_groups)
    finally:
        bar.close()
    critic.eval().requires_grad_(False)
    ev = evaluate_critic(critic, features, transitions, device=dev)
    out: dict[str, Any] = {"final": last, "eval": ev, "features": cfg.critic_features}
    if contrast:
        g = np.asarray(groups)
        out["contrast"] = {"weight": cfg.critic_contrast_weight, "groups": int(len(np.unique(g[g >= 0]))),
                           "grouped_transitions": int((g >= 0).sum())}
    if rollouts is not None and rollouts.any():
        ro = subset_transitions(transitions, rollouts)
        out["rollout_transitions"] = int(rollouts.sum())
        if float(np.ptp(ro.mc_return)) > 0:  # both outcomes among the rollouts: a correlation means something
            out["eval_rollouts"] = evaluate_critic(critic, features, ro, device=dev)
    if log is not None:
        log.log("critic_eval", cfg.critic_steps, ev)
    if heldout is not None and len(heldout):
        out["heldout"] = evaluate_critic(critic, features, heldout, device=dev)
        out["heldout_transitions"] = len(heldout)
        if log is not None:
            log.log("critic_heldout", cfg.critic_steps, out["heldout"])
    return critic, out


def save_critic(critic: QEnsemble, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """critic.safetensors (ensemble weights) + critic.json (CriticConfig) into a checkpoint directory."""
    save_file({k: v.detach().cpu().contiguous() for k, v in critic.state_dict().items()},
              str(directory / CRITIC_WEIGHTS))
    c = asdict(critic.cfg)
    c["hidden"] = list(c["hidden"])
    (directory / CRITIC_CONFIG).write_text(json.dumps({"config": c, **(extra or {})}, indent=1))


def load_critic(directory: str | Path) -> tuple[QEnsemble, dict[str, Any]]:
    """Load the critic saved with a checkpoint (safetensors, no pickle) -> (critic in eval mode, critic.json)."""
    directory = Path(directory)
    if not (directory / CRITIC_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no critic ({CRITIC_CONFIG}); it was not trained by "
                                "`critic_trainer qvgm` with a critic method")
    meta = json.loads((directory / CRITIC_CONFIG).read_text())
    c = dict(meta["config"])
    c["hidden"] = tuple(c["hidden"])
    critic = QEnsemble(CriticConfig(**c))
    critic.load_state_dict(load_file(str(directory / CRITIC_WEIGHTS)), strict=True)
    return critic.eval().requires_grad_(False), meta


# ---------------------------------------------------------------------------------------------------- actor
def _rows_z(features: FeatureCache, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(features["z_rl"][rows])), torch.as_tensor(np.asarray(features["proprio"][rows])))


@torch.no_grad()
def policy_q_stats(policy: FlowPolicyBase, inputs: dict[str, torch.Tensor], critic: QEnsemble,
                   features: FeatureCache, rows: np.ndarray, cfg: ImproveConfig, seed: int = 1234) -> dict[str, float]:
    """Critic statistics of the policy's own chunks at buffer frames `rows` (fixed noise: comparable over calls).

    Returns mean (ensemble-mean Q), lcb (mean of ensemble mean - cfg.lcb_beta * std), std (ensemble std).
    """
    was_training = policy.training
    policy.eval()
    gen = torch.Generator().manual_seed(seed)
    z, p = _rows_z(features, rows)
    ctx = policy.encode(batch_inputs(inputs, torch.as_tensor(rows), policy.device))
    eps = torch.randn(len(rows), policy.horizon, policy.action_dim, generator=gen)  # CPU: same draws on any device
    chunk = policy.sample(ctx, num_steps=cfg.num_steps, noise=eps)
    q = critic(z.to(chunk.device), p.to(chunk.device), critic_action(chunk, cfg.n_exec, policy.real_action_dim))
    q = q.cpu()  # [N, B]
    std = q.std(0, correction=0)
    policy.train(was_training)
    return {"mean": float(q.mean()), "lcb": float((q.mean(0) - cfg.lcb_beta * std).mean()), "std": float(std.mean())}


def policy_q(policy: FlowPolicyBase, inputs: dict[str, torch.Tensor], critic: QEnsemble, features: FeatureCache,
             rows: np.ndarray, cfg: ImproveConfig, seed: int = 1234) -> float:
    """Mean ensemble-mean Q of the policy's own chunks at buffer frames `rows` (fixed noise: comparable)."""
    return policy_q_stats(policy, inputs, critic, features, rows, cfg, seed)["mean"]


class DifferentiableSampler:
    """View of a FlowPolicyBase whose `sample` keeps the autograd graph through all K Euler steps.

    FlowPolicyBase.sample runs under torch.no_grad (inference), so passed as is to
    baselines.diffusion_ql_loss the Q term would carry no gradient and only the BC term would train. Same Euler
    scheme (openpi: t = 1 noise -> t = 0, dt = -1/K); everything else is delegated to the policy.
    """

    def __init__(self, policy: FlowPolicyBase) -> None:
        self.policy = policy
        self.real_action_dim, self.horizon, self.action_dim = policy.real_action_dim, policy.horizon, policy.action_dim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def sample(self, context: Any, num_steps: int = 10, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised chunks [B, H, D] from noise [B, H, D] (drawn if None), differentiable in the weights."""
        b = self.policy.batch_size(context)
        dev = self.policy.device
        x = torch.randn(b, self.horizon, self.action_dim, device=dev) if noise is None else noise.to(dev)
        ts = torch.linspace(1.0, 0.0, num_steps + 1, device=dev)
        for k in range(num_steps):
            x = x + (-1.0 / num_steps) * self.policy.velocity(x, ts[k].expand(b), context)
        return x


def action_box(policy: FlowPolicyBase, buf: BufferData, cfg: ImproveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The action box (lo, hi) of the critic methods, each [n_exec * real] normalised (critic coordinates: step-major,
    the per-dim bounds repeated over the n_exec steps): cfg.action_box "data" = per action dim the min / max of the
    buffer's executed actions widened to include [-1, 1] (the region the critic was trained on), "unit" = [-1, 1].
    Q-VGM's and Q-distillation's ascent iterates are projected onto it, Diffusion-QL's samples clamped to it."""
    r = policy.real_action_dim
    if cfg.action_box == "unit":
        return -torch.ones(cfg.n_exec * r), torch.ones(cfg.n_exec * r)
    a = torch.as_tensor(normalised_actions(policy, buf.action), dtype=torch.float32)
    lo, hi = a.min(0).values.minimum(torch.full((r,), -1.0)), a.max(0).values.maximum(torch.ones(r))
    dev = policy.device
    return lo.repeat(cfg.n_exec).to(dev), hi.repeat(cfg.n_exec).to(dev)


def train_actor(policy: FlowPolicyBase, buf: BufferData, cfg: ImproveConfig, critic: QEnsemble | None,
                features: FeatureCache | None, log: ScalarLog | None = None,
                progress: bool = False,
                heldout_rows: np.ndarray | None = None) -> tuple[FlowPolicyBase, dict[str, Any]]:
    """Train a copy of `policy` by cfg.method (the input stays untouched, the reference is a frozen copy).

    Early stopping (cfg.actor_eval_every > 0, critic methods): every N steps the LCB Q (ensemble mean -
    lcb_beta * std) of the actor's own chunks is measured at held-out frames (`heldout_rows`, e.g. frames of
    episodes the critic never saw; default: 256 seeded frames removed from the actor's training pool); the actor
    with the best value (the input policy counts as step 0) is returned, and training stops after
    cfg.actor_patience checks without a gain. Exploiting the critic raises its mean Q but not its LCB.
    Returns (actor in eval mode, summary). Raises FloatingPointError on a non-finite loss (nothing to publish).
    """
    torch.manual_seed(cfg.seed + 7)
    rng = np.random.default_rng(cfg.seed + 7)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    # The critic methods roll out the actor's own denoising path and compare it with the frozen reference and the
    # critic on the same inputs, so the actor must see what the deployed policy sees: it trains in eval mode, without
    # training-time input noise (Pi05Config.patch_token_dropout; with it, Q-VGM at max_shift 0 would not start at
    # loss 0 and its rollouts would follow paths the deployed policy never takes). sft / filtered-bc continue the
    # SFT in training mode.
    train_mode = cfg.method not in CRITIC_METHODS
    actor = copy.deepcopy(policy).train(train_mode).requires_grad_(True)
    dev = actor.device
    inputs = encode_inputs(actor, buf.demo)
    chunks = actor.processor.normalize_actions(buf.demo.actions)  # [T, H, D]
    valid = torch.from_numpy(buf.demo.valid)
    if cfg.method == "filtered-bc":
        pool = np.flatnonzero(buf.success)
        if pool.size == 0:
            raise ValueError(f"filtered-bc: buffer {buf.path} has no successful episodes to imitate")
    else:
        pool = np.arange(len(buf))
    if cfg.method in CRITIC_METHODS and (critic is None or features is None):
        raise ValueError(f"method {cfg.method} needs a critic")
    qcfg = cfg.qvgm()
    box = action_box(actor, buf, cfg) if cfg.method in CRITIC_METHODS else None
    opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr)
    eval_rows = np.random.default_rng(cfg.seed + 99).choice(len(buf), size=min(256, len(buf)), replace=False)
    summary: dict[str, Any] = {}
    if critic is not None and features is not None:
        summary["q_policy_before"] = policy_q(reference, inputs, critic, features, eval_rows, cfg)
    stop_rows = None
    if cfg.actor_eval_every > 0 and critic is not None and features is not None:
        if heldout_rows is not None and len(heldout_rows):
            stop_rows = np.random.default_rng(cfg.seed + 98).choice(
                heldout_rows, size=min(256, len(heldout_rows)), replace=False)
        else:
            stop_rows = eval_rows
        pool = np.setdiff1d(pool, stop_rows)
        if pool.size == 0:
            raise ValueError("early stopping left no frames to train the actor on")
    best = None
    if stop_rows is not None:
        assert critic is not None and features is not None
        s0 = policy_q_stats(reference, inputs, critic, features, stop_rows, cfg, seed=4321)
        best = {"step": 0, "lcb": s0["lcb"], "state": copy.deepcopy(actor.state_dict()), "since": 0}
        summary["early_stop"] = {"curve": [{"step": 0, **s0}], "heldout_frames": int(len(stop_rows))}
    history: list[dict[str, float]] = []
    shuffle_rng = np.random.default_rng(cfg.seed + 13)  # own stream: the batches are the same with or without it
    bar = tqdm(range(cfg.actor_steps), desc=f"actor {cfg.method}", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in bar:
            rows = rng.choice(pool, size=min(cfg.actor_batch, pool.size), replace=pool.size < cfg.actor_batch)
            trows = torch.as_tensor(rows)
            b_in = batch_inputs(inputs, trows, dev)
            q_fn = None
            if critic is not None and features is not None:
                z, p = _rows_z(features, rows)
                if cfg.shuffle_critic_states:
                    perm = torch.as_tensor(shuffle_rng.permutation(len(rows)))
                    z, p = z[perm], p[perm]
                q_fn = bind_critic(critic, z.to(dev), p.to(dev), how=cfg.aggregate, lcb_beta=cfg.lcb_beta)
            actor.train(train_mode)
            if cfg.method == "qvgm":
                assert q_fn is not None
                info = qvgm_update(actor, reference, opt, b_in, q_fn, qcfg,
                                   bc_actions=chunks[trows].to(dev) if cfg.bc_weight > 0 else None, box=box)
                m = {"loss": info["loss"], "ascent_gain": float(np.mean(info["ascent_gain"])),
                     "dv_norm": float(np.mean(info["dv_norm"])), "h_norm": float(np.mean(info["h_norm"])),
                     "grad_norm": info["grad_norm"]}
            else:
                opt.zero_grad(set_to_none=True)
                if cfg.method == "qdistill":
                    assert q_fn is not None
                    loss, m = q_distill_loss(actor, b_in, q_fn, cfg.distill(), reference=reference,
                                             bc_actions=chunks[trows].to(dev), bc_mask=valid[trows].to(dev),
                                             bc_weight=cfg.distill_bc_weight, box=box)
                elif cfg.method == "dql":
                    assert q_fn is not None
                    loss, m = diffusion_ql_loss(DifferentiableSampler(actor), b_in, q_fn, cfg.n_exec,
                                                num_steps=cfg.num_steps, eta=cfg.dql_eta,
                                                bc_actions=chunks[trows].to(dev), bc_mask=valid[trows].to(dev),
                                                project=cfg.project, box_weight=cfg.dql_box_weight, box=box)
                else:  # filtered-bc / sft: flow matching on buffer chunks
                    loss = actor.flow_loss(b_in, chunks[trows].to(dev), action_mask=valid[trows].to(dev))
                    m = {"loss": loss.item()}
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{cfg.method} loss is not finite ({loss.item()}) at step {step}")
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"{cfg.method} gradient is not finite at step {step}")
                m["grad_norm"] = float(norm)
                opt.step()
            history.append(m)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.actor_steps:
                if log is not None:
                    log.log(f"actor_{cfg.method}", step + 1, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            if best is not None and (step + 1) % cfg.actor_eval_every == 0:
                assert critic is not None and features is not None and stop_rows is not None
                st = policy_q_stats(actor, inputs, critic, features, stop_rows, cfg, seed=4321)
                summary["early_stop"]["curve"].append({"step": step + 1, **st})
                if log is not None:
                    log.log("actor_heldout", step + 1, st)
                if st["lcb"] > best["lcb"]:
                    best = {"step": step + 1, "lcb": st["lcb"], "state": copy.deepcopy(actor.state_dict()), "since": 0}
                else:
                    best["since"] += 1
                    if best["since"] >= cfg.actor_patience:
                        break
    finally:
        bar.close()
    if best is not None:
        actor.load_state_dict(best["state"])
        summary["early_stop"].update(best_step=best["step"], best_lcb=best["lcb"], steps_run=len(history),
                                     stopped_early=len(history) < cfg.actor_steps)
    actor.eval().requires_grad_(False)
    summary["actor_wall_s"] = round(time.perf_counter() - t0, 2)
    if history:
        tail = history[-max(1, len(history) // 10):]
        summary["actor_final"] = {k: float(np.mean([h[k] for h in tail if k in h])) for k in tail[-1]}
        summary["actor_first"] = history[0]
    with torch.no_grad():  # how far the actor moved from the reference, on the same inputs/noise
        gen = torch.Generator().manual_seed(cfg.seed + 5)
        b_in = batch_inputs(inputs, torch.as_tensor(eval_rows), dev)
        eps = torch.randn(len(eval_rows), actor.horizon, actor.action_dim, generator=gen)
        a_new = actor.sample(actor.encode(b_in), num_steps=cfg.num_steps, noise=eps)
        a_ref = reference.sample(reference.encode(b_in), num_steps=cfg.num_steps, noise=eps)
        summary["action_shift"] = float((a_new - a_ref)[..., : actor.real_action_dim].abs().mean())
        d = critic_action(a_new - a_ref, cfg.n_exec, actor.real_action_dim)
        summary["action_shift_rms_critic"] = float(d.pow(2).mean(-1).sqrt().mean())  # compare with max_shift
    if critic is not None and features is not None:
        summary["q_policy_after"] = policy_q(actor, inputs, critic, features, eval_rows, cfg)
        if log is not None:
            log.log("actor_eval", cfg.actor_steps, {k: summary[k] for k in ("q_policy_before", "q_policy_after")})
    return actor, summary


# ---------------------------------------------------------------------------------------------------- whole run
def improve(policy: FlowPolicyBase, buf: BufferData, cfg: ImproveConfig, work: Path | None = None,
            cache_dir: Path | None = None, progress: bool = False,
            critic: QEnsemble | None = None) -> tuple[FlowPolicyBase, QEnsemble | None, dict[str, Any]]:
    """Features -> critic -> actor for one buffer; returns (actor, critic or None, summary). `critic` reuses an
    already fitted critic (the benchmark trains every method against the same one)."""
    check_compatible(policy, buf)
    policy.eval()
    log = ScalarLog(work)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"kind": "qvgm-pipeline", "method": cfg.method, "buffer": buf.path,
                               "frames": len(buf), "episodes": int(len(np.unique(buf.episode))),
                               "successful_episodes": int(len(np.unique(buf.episode[buf.success]))),
                               "device": str(policy.device),
                               "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}
    try:
        features, heldout_rows = None, None
        if cfg.method in CRITIC_METHODS:
            check_outcomes(buf)
            tr = buffer_transitions(policy, buf, cfg.n_exec, cfg.gamma)
            cache_dir = cache_dir or (work / "features" if work is not None else None)
            if cache_dir is None:
                raise ValueError("a critic method needs a feature cache directory (work or cache_dir)")
            features, rebuilt = extract_features(policy, buf, cache_dir, cfg.n_exec, num_ref=cfg.num_ref,
                                                 num_steps=cfg.num_steps, seed=cfg.seed, progress=progress,
                                                 features=cfg.critic_features)
            summary["features"] = {"path": str(cache_dir), "rebuilt": rebuilt is not None, "key": features.key,
                                   "kind": resolve_critic_features(policy, cfg.critic_features)}
            summary["transitions"] = len(tr)
            held = holdout_episodes(buf, cfg.holdout, cfg.seed)
            tr_fit, tr_held = split_transitions(buf, tr, held)
            if held.size:
                summary["heldout_episodes"] = held.tolist()
                heldout_rows = np.flatnonzero(np.isin(buf.episode, held))
            if critic is None:
                critic, cinfo = train_critic(policy, features, tr_fit, cfg, log=log, progress=progress,
                                             heldout=tr_held, rollouts=buf.rollout_frames()[tr_fit.index],
                                             groups=transition_groups(buf, tr_fit))
                summary["critic"] = cinfo
            else:
                critic = critic.to(policy.device)
                check_training_data(critic, tr)
                summary["critic"] = {"reused": True,
                                     "eval": evaluate_critic(critic, features, tr, device=policy.device)}
        actor, ainfo = train_actor(policy, buf, cfg, critic, features, log=log, progress=progress,
                                   heldout_rows=heldout_rows)
        summary["actor"] = ainfo
    finally:
        log.close()
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return actor, critic, summary


def _critic_meta(summary: dict[str, Any]) -> dict[str, Any]:
    """critic.json extras: which state features the critic reads (test-time wrappers must compute the same)."""
    cfg = summary.get("config") or {}
    return {"features": cfg.get("critic_features", "rl-token"), "aggregate": cfg.get("aggregate", "mean"),
            "lcb_beta": cfg.get("lcb_beta", 1.0)}


def publish(actor: FlowPolicyBase, critic: QEnsemble | None, summary: dict[str, Any], init_dir: Path,
            out: Path | None = None, store: Path | None = None, version: str | None = None) -> dict[str, Any]:
    """Write the improved checkpoint: a new directory `out` (parent = the input's version) or a new version in
    the CheckpointStore `store` (parent = the input's store version; an input from outside the store is first
    published into it, not made current). Returns the manifest. Refuses non-finite weights."""
    from qvgm.checkpoints import CheckpointStore, atomic_directory, write_manifest
    from qvgm.policy.checkpoint_io import write_policy_files

    init_dir = Path(init_dir)
    parent_manifest = json.loads((init_dir / "manifest.json").read_text())
    summary = {**summary, "init_checkpoint": str(init_dir), "init_version": parent_manifest.get("version")}
    if (out is None) == (store is None):
        raise ValueError("give exactly one of --out DIR and --store STORE")
    if out is not None:
        with atomic_directory(Path(out)) as tmp:
            write_policy_files(actor, tmp)
            if critic is not None:
                save_critic(critic, tmp, _critic_meta(summary))
            return write_manifest(tmp, version or f"{parent_manifest.get('version')}+{summary['method']}",
                                  parent_manifest.get("version"), summary)
    st = CheckpointStore(store)
    if init_dir.resolve().parent == st.versions_dir.resolve():
        parent = init_dir.name
    else:
        parent = st.publish_dir(init_dir, summary=parent_manifest.get("summary"), make_current=False)
    with st.writing(parent=parent, summary=summary) as staged:
        write_policy_files(actor, staged.path)
        if critic is not None:
            save_critic(critic, staged.path, _critic_meta(summary))
    return staged.manifest


# ---------------------------------------------------------------------------------------------------- test time
class ScaledNoisePolicy:
    """A FlowPolicy sampled from x_1 = scale * eps (FlowPolicyBase.initial_noise): scale 1 is the policy as trained,
    0 its deterministic flow; the weights are unchanged. For evaluate / run_episode (the policy node's parameter
    `noise_scale` does the same when serving)."""

    def __init__(self, policy: FlowPolicyBase, scale: float) -> None:
        from qvgm.policy.flow import check_noise_scale

        self.policy, self.scale = policy, check_noise_scale(scale)
        self.horizon, self.action_dim, self.real_action_dim = policy.horizon, policy.action_dim, policy.real_action_dim
        self.version = f"{getattr(policy, 'version', '?')}@noise-{self.scale:g}"

    def act(self, observations: list[dict[str, Any]]) -> np.ndarray:
        """Observations -> chunks in robot units [B, H, real]; the noise comes from the global torch RNG."""
        return self.policy.act(observations, noise_scale=self.scale)


class BestOfNPolicy:
    """Test-time best-of-N: sample n chunks from `policy`, execute the one with the highest aggregated Q."""

    def __init__(self, policy: FlowPolicyBase, critic: QEnsemble, n: int = 8, n_exec: int = 5,
                 aggregate: str = "mean", num_steps: int = 10, features: str = "rl-token") -> None:
        self.policy, self.critic, self.n, self.n_exec = policy, critic, n, n_exec
        self.aggregate, self.num_steps, self.features = aggregate, num_steps, features
        self.horizon, self.action_dim, self.real_action_dim = policy.horizon, policy.action_dim, policy.real_action_dim
        self.version = f"{getattr(policy, 'version', '?')}+best-of-{n}"

    @torch.no_grad()
    def act(self, observations: list[dict[str, Any]], noise: torch.Tensor | None = None) -> np.ndarray:
        """Observations -> chunks in robot units [B, H, real]; noise optional [n, B, H, D]."""
        inputs = self.policy.preprocess(observations)
        ctx = self.policy.encode(inputs)
        q_fn = bind_critic(self.critic, critic_state_features(self.policy, ctx, inputs, self.features),
                               inputs["state"], how=self.aggregate)
        chunk, _ = best_of_n(self.policy, ctx, q_fn, self.n, self.n_exec, self.num_steps, noise=noise)
        return self.policy.postprocess(chunk)


class QGuidedPolicy:
    """Test-time Q-gradient guidance on every sampling step; the policy's weights are unchanged."""

    def __init__(self, policy: FlowPolicyBase, critic: QEnsemble, scale: float = 0.5, n_exec: int = 5,
                 aggregate: str = "mean", num_steps: int = 10, features: str = "rl-token") -> None:
        self.policy, self.critic, self.scale, self.n_exec = policy, critic, scale, n_exec
        self.aggregate, self.num_steps, self.features = aggregate, num_steps, features
        self.horizon, self.action_dim, self.real_action_dim = policy.horizon, policy.action_dim, policy.real_action_dim
        self.version = f"{getattr(policy, 'version', '?')}+qguided-{scale}"

    def act(self, observations: list[dict[str, Any]], noise: torch.Tensor | None = None) -> np.ndarray:
        """Observations -> chunks in robot units [B, H, real]; noise optional [B, H, D] at t = 1."""
        with torch.no_grad():
            inputs = self.policy.preprocess(observations)
            ctx = self.policy.encode(inputs)
            q_fn = bind_critic(self.critic, critic_state_features(self.policy, ctx, inputs, self.features),
                               inputs["state"], how=self.aggregate)
        b = inputs["state"].shape[0]
        if noise is None:
            noise = torch.randn(b, self.horizon, self.action_dim, device=self.policy.device)
        chunk = q_guided_sample(self.policy, ctx, q_fn, self.scale, self.n_exec, noise, num_steps=self.num_steps)
        return self.policy.postprocess(chunk)


# ---------------------------------------------------------------------------------------------------- evaluation
def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval for a binomial proportion; (0, 1) when n = 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds at the ends (no rounding residue)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def paired_comparison(a: Sequence[bool | int], b: Sequence[bool | int]) -> dict[str, float]:
    """Two methods evaluated on the same scenes (outcome lists, 1 = success, same order): wins of a (a succeeded,
    b failed), losses, and the exact two-sided sign test (McNemar) p-value on the discordant scenes. Pairing
    removes the scene-to-scene variance that two separate Wilson intervals carry."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs outcomes on the same scenes, got {len(a)} and {len(b)}")
    wins = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    losses = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(0, min(wins, losses) + 1)) / 2**n if n else 1.0
    return {"wins": wins, "losses": losses, "p_value": min(1.0, 2.0 * tail)}


def policy_observation(obs: dict[str, Any]) -> dict[str, Any]:
    """Env observation -> the observation dict a policy reads (images, state, prompt, privileged)."""
    return {"images": obs.get("images", {}), "state": obs["state"], "prompt": obs["prompt"],
            "privileged": obs["privileged"]}


def run_episode(actor: Any, env: Any, task: str, seed: int, n_exec: int = 5, noise_seed: int = 0,
                record: Any = None, on_step: Any = None, on_chunk: Any = None) -> dict[str, Any]:
    """One closed-loop episode (scene seed `seed`): infer a chunk, execute its first n_exec actions, repeat until
    success or the time limit. `actor.act([obs]) -> [1, H, real]` robot units; sampling noise comes from the
    global torch RNG seeded with noise_seed. `record`: optional EpisodeWriter (frames + privileged returned).
    `on_step(action float32 [7], obs)`: optional, called after every env step with the executed action and the
    observation it led to. `on_chunk(steps, obs)`: optional, called before every inference (a chunk boundary,
    `steps` control steps into the episode)."""
    torch.manual_seed(noise_seed)
    obs, _ = env.reset(seed=seed, options={"task": task})
    return run_from(actor, env, obs, n_exec=n_exec, record=record, on_step=on_step, on_chunk=on_chunk)


def run_from(actor: Any, env: Any, obs: dict[str, Any], n_exec: int = 5, record: Any = None, on_step: Any = None,
             on_chunk: Any = None, steps: int = 0) -> dict[str, Any]:
    """run_episode's loop from the env's current state (`obs`, `steps` control steps into the episode) with the
    global torch RNG as it is: until success or the env's time limit. Returns {success, steps (executed here),
    privileged (per recorded frame)}."""
    start, ok, priv = steps, False, []
    version = str(getattr(actor, "version", "policy"))
    while True:
        if on_chunk is not None:
            on_chunk(steps, obs)
        chunk = actor.act([policy_observation(obs)])[0]
        done = False
        for a in chunk[: max(1, n_exec)]:
            a = a.astype(np.float32)
            prev = obs
            obs, reward, term, trunc, _ = env.step(a)
            steps += 1
            if on_step is not None:
                on_step(a, obs)
            if record is not None:
                record.add_frame({"images": prev.get("images", {}), "state": prev["state"], "prompt": prev["prompt"],
                                  "stamp": prev["stamp"]}, a, reward=reward, done=term, policy_version=version)
                priv.append(prev["privileged"])
            if term or trunc:
                ok, done = bool(term), True
                break
        if done:
            break
    return {"success": ok, "steps": steps - start, "privileged": priv}


def branch_noise_seed(noise_seed: int, seed: int, branch: int) -> int:
    """Torch seed of branch `branch` (1-based) of scene `seed` in collect_rollouts (63 bit, SeedSequence)."""
    ss = np.random.SeedSequence([int(noise_seed), int(seed), int(branch), 11])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def constant_action_offsets(n: int, action_dim: int, real_action_dim: int, sigma: float, seed: int) -> torch.Tensor:
    """n N(0, sigma^2) offsets float32 [n, 1, 1, action_dim] in a policy's normalised action space (sigma in those
    units), constant over a chunk, zero on the padded dims >= real_action_dim; drawn from torch.Generator(seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    off = torch.randn(n, 1, 1, int(action_dim), generator=gen) * float(sigma)
    off[..., int(real_action_dim):] = 0.0
    return off


def branch_offset_seed(noise_seed: int, seed: int, branch: int) -> int:
    """Generator seed of branch `branch`'s first-chunk offset in collect_rollouts(branch_offset=S) (63 bit)."""
    ss = np.random.SeedSequence([int(noise_seed), int(seed), int(branch), 17])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


class FirstChunkOffset:
    """Actor wrapper: the first chunk it returns is `actor`'s sample plus `offset` [1, 1, D] (normalised action
    space, added before postprocess), every later chunk is `actor.act`'s own. The first chunk draws its noise exactly
    as actor.act does (sample(ctx) from the global torch RNG), so a zero offset reproduces the plain actor bit for
    bit. `actor` must be a flow policy (preprocess / encode / sample / postprocess)."""

    def __init__(self, actor: Any, offset: torch.Tensor) -> None:
        self.check(actor)
        self.actor, self.offset = actor, offset
        self.version = getattr(actor, "version", "policy")

    @staticmethod
    def check(actor: Any) -> None:
        """ValueError unless `actor` is a flow policy (what the offset is added inside)."""
        missing = [m for m in ("preprocess", "encode", "sample", "postprocess") if not hasattr(actor, m)]
        if missing:
            raise ValueError(f"a first-chunk offset needs a flow policy; {type(actor).__name__} has no {missing}")

    @torch.no_grad()
    def act(self, observations: list[dict[str, Any]]) -> np.ndarray:
        if self.offset is None:
            return self.actor.act(observations)
        p, off, self.offset = self.actor, self.offset, None
        chunk = p.sample(p.encode(p.preprocess(observations)))
        return p.postprocess(chunk + off.to(chunk.device, chunk.dtype))


def branch_rep_noise_seed(noise_seed: int, seed: int, branch: int, rep: int) -> int:
    """Torch seed of continuation `rep` (>= 2) of branch `branch` after its first chunk (collect_rollouts)."""
    ss = np.random.SeedSequence([int(noise_seed), int(seed), int(branch), int(rep), 13])
    return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))


def evaluate(actor: Any, task: str, seeds: Sequence[int], n_exec: int = 5, render: bool = False,
             image_size: tuple[int, int] = (224, 224), noise_seed: int = 0, env: Any = None,
             progress: bool = False, max_episode_steps: int | None = None, colors: str = "random") -> dict[str, Any]:
    """Closed-loop success of `actor` (a FlowPolicy or a test-time wrapper) on scene seeds `seeds`.

    Returns {success_rate, ci95: [lo, hi] (Wilson), successes, episodes, seeds, outcomes (1/0 per seed, same order:
    methods on the same seeds compare pairwise with paired_comparison), mean_steps, wall_s}.
    render=False for the `state` backbone (no cameras); pixel policies need render=True. max_episode_steps: time
    limit in control steps for an env built here (default: the task's); colors: its scene colours (TabletopEnv's
    "random", the task, or the "fixed" diagnostic).
    """
    from qvgm.sim import TabletopEnv

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    cams = tuple(getattr(getattr(actor, "policy", actor), "config", None).camera_names or ()) if render else ()
    own = env is None
    if own:
        env = TabletopEnv(task=task, cameras=cams or ("front",), image_size=image_size, render=render,
                          max_episode_steps=max_episode_steps, colors=colors)
    t0 = time.perf_counter()
    results = []
    try:
        for s in tqdm(seeds, desc=f"eval {task}", disable=not progress, dynamic_ncols=True):
            results.append(run_episode(actor, env, task, s, n_exec=n_exec, noise_seed=noise_seed + s))
    finally:
        if own:
            env.close()
    k = sum(r["success"] for r in results)
    lo, hi = wilson_interval(k, len(results))
    return {"success_rate": k / len(results), "ci95": [lo, hi], "successes": k, "episodes": len(results),
            "seeds": seeds, "outcomes": [int(bool(r["success"])) for r in results],
            "mean_steps": float(np.mean([r["steps"] for r in results])),
            "wall_s": round(time.perf_counter() - t0, 2)}


def collect_rollouts(actor: Any, task: str, seeds: Sequence[int], out: str | Path, n_exec: int = 5,
                     noise_seed: int = 0, progress: bool = False,
                     max_episode_steps: int | None = None, env: Any = None, render: bool = False,
                     cameras: Sequence[str] = ("front", "wrist"), image_size: tuple[int, int] = (224, 224),
                     append: bool = False, branches: int = 0, branch_frac: float = 0.7,
                     branch_reps: int = 1, branch_offset: float = 0.0, colors: str = "random") -> dict[str, Any]:
    """Run `actor` on scene seeds and record every episode into a replay buffer at `out` (sparse reward, success
    label from the sim detector, privileged side files). Returns a summary.
    max_episode_steps: time limit in control steps (default: the task's). env: an env to run in instead of a
    TabletopEnv built here (e.g. a qvgm.envs.GymEnvAdapter; the caller closes it).
    render=False: a state-only buffer (no cameras). render=True: the TabletopEnv built here renders `cameras` at
    image_size (H, W) px, even (video encoding), and every frame's images go into the buffer's videos through the
    same EpisodeWriter path as critic_trainer.demos (a given `env` must render; its `cameras` / `image_size` are
    used). append=True adds the episodes to the dataset already at `out` (e.g. a copy of the SFT demos), whose
    cameras and fps must match; otherwise `out` must not hold a dataset. colors: the scene colours of a TabletopEnv
    built here ("random", the task, or the "fixed" diagnostic).

    branches=K > 0 (simulation only: the env must have get_sim_state / set_sim_state, as TabletopEnv): after each
    episode, K more episodes from one of its states, so the buffer holds K + 1 different chunks at that state and
    what followed each (within-state contrasts for the critic, which the plain rollouts never show). The branch
    state is the chunk boundary b = n_exec * k, k uniform (default_rng([seed, 5])) with b < branch_frac * steps;
    branch i restores it bit for bit and runs `actor` with the torch RNG seeded branch_noise_seed(noise_seed, seed,
    i) until success or the time limit (the step counter is restored too). Each branch is a buffer episode of its
    own (start_stamp b / control_hz, notes JSON {"branch_of": episode_index, "branch_step": b, "scene_seed": seed}).
    branch_reps=R > 1: every branch chunk is continued R times: the first chunk is the same in all R (the RNG seeded
    as above), the rest of continuation r >= 2 draws from branch_rep_noise_seed(noise_seed, seed, i, r), so each
    branch chunk has R outcomes (notes add "branch": i, "rep": r). R = 1 is the plain branch above, unchanged.
    branch_offset=S > 0 (exploration for the critic): branch i's first chunk (shared by its R continuations) gets a
    constant N(0, S^2) offset in the actor's normalised action space (constant_action_offsets, seeded
    branch_offset_seed(noise_seed, seed, i); `actor` must be a flow policy), the rest is the actor's own; the
    buffer records the executed (offset) actions, and notes add "offset": S. S = 0 is the plain branch, unchanged.
    """
    from critic_trainer.demos import write_privileged
    from qvgm.data import ReplayBuffer
    from qvgm.sim import TabletopEnv

    own = env is None
    h, w = int(image_size[0]), int(image_size[1])
    if branches < 0 or not 0.0 < branch_frac <= 1.0:
        raise ValueError(f"branches must be >= 0 and 0 < branch_frac <= 1, got {branches}, {branch_frac}")
    if branch_reps < 1:
        raise ValueError(f"branch_reps must be >= 1, got {branch_reps}")
    if not np.isfinite(branch_offset) or branch_offset < 0:
        raise ValueError(f"branch_offset must be a finite S >= 0, got {branch_offset}")
    if branch_offset and not branches:
        raise ValueError("branch_offset needs branches >= 1 (it offsets each branch's first chunk)")
    if branch_offset:
        FirstChunkOffset.check(actor)  # before anything is recorded
    if branches and not own and not (hasattr(env, "get_sim_state") and hasattr(env, "set_sim_state")):
        raise ValueError(f"branches need an env that can save and restore its state (get_sim_state / set_sim_state, "
                         f"simulation only); {type(env).__name__} cannot")
    if render and own:
        if not cameras:
            raise ValueError("render=True needs at least one camera")
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(f"image size must be even and >= 2 px for video encoding, got {h}x{w}")
    if own:
        env = (TabletopEnv(task=task, cameras=tuple(cameras), image_size=(h, w), render=True,
                           max_episode_steps=max_episode_steps, colors=colors) if render
               else TabletopEnv(task=task, render=False, max_episode_steps=max_episode_steps, colors=colors))
    cams = ({str(c): tuple(int(x) for x in getattr(env, "image_size", (h, w))) for c in getattr(env, "cameras", ())}
            if render else {})
    try:
        if append:
            buf = ReplayBuffer.open(out)
            if buf.cameras != cams or buf.fps != int(env.control_hz):
                buf.close()
                raise ValueError(f"{out}: existing dataset has cameras {buf.cameras} at {buf.fps} Hz, the rollouts "
                                 f"record {cams} at {int(env.control_hz)} Hz")
        else:
            buf = ReplayBuffer.create(out, fps=int(env.control_hz), cameras=cams,
                                      state_names=getattr(env, "state_names", env.joint_names),
                                      action_names=getattr(env, "action_names", env.joint_names),
                                      **sim_video())  # rendered at model size: keep full-resolution colour
    except BaseException:
        if own:
            env.close()
        raise
    t0 = time.perf_counter()
    totals = {"successes": 0, "frames": 0, "branch_episodes": 0, "branch_successes": 0, "branch_frames": 0}
    stamp_dt = 1.0 / float(env.control_hz)

    def record(start_stamp: float, notes: str | None, branch: bool, run: Any, *run_args: Any) -> tuple[int, dict]:
        """run(episode_writer, *run_args) -> run_episode's dict; commit it as one buffer episode."""
        ep = buf.begin_episode(task=env.prompt, start_stamp=start_stamp)
        try:
            r = run(ep, *run_args)
        except BaseException:
            ep.abort()
            raise
        index = ep.finish(success=r["success"], label_source="auto", notes=notes)
        write_privileged(Path(out), index, np.stack(r["privileged"]))
        pre = "branch_" if branch else ""
        totals[f"{pre}successes"] += int(r["success"])
        totals[f"{pre}frames"] += r["steps"]
        totals["branch_episodes"] += int(branch)
        return index, r

    def episode(ep: Any, seed: int, snaps: dict[int, Any] | None) -> dict[str, Any]:
        keep = None if snaps is None else (lambda k, _obs: snaps.__setitem__(k, env.get_sim_state()))
        return run_episode(actor, env, task, seed, n_exec=n_exec, noise_seed=noise_seed + seed, record=ep,
                           on_chunk=keep)

    def branch(ep: Any, seed: int, state: Any, b: int, i: int, r: int = 1) -> dict[str, Any]:
        env.reset(seed=seed, options={"task": task})  # layout, colours, prompt of the scene
        obs = env.set_sim_state(state)
        torch.manual_seed(branch_noise_seed(noise_seed, seed, i))

        def reseed(steps: int, _obs: Any) -> None:  # after the shared first chunk: this continuation's own noise
            if steps == b + n_exec:
                torch.manual_seed(branch_rep_noise_seed(noise_seed, seed, i, r))

        runner = actor
        if branch_offset:
            off = constant_action_offsets(1, actor.action_dim, actor.real_action_dim, branch_offset,
                                          branch_offset_seed(noise_seed, seed, i))[0]
            runner = FirstChunkOffset(actor, off)
        return run_from(runner, env, obs, n_exec=n_exec, record=ep, steps=b, on_chunk=reseed if r > 1 else None)

    try:
        for s in tqdm([int(s) for s in seeds], desc=f"rollouts {task}", disable=not progress, dynamic_ncols=True):
            snaps: dict[int, Any] = {}
            index, r = record(0.0, None, False, episode, s, snaps if branches else None)
            if not branches:
                continue
            bounds = sorted(k for k in snaps if k < branch_frac * r["steps"]) or [0]
            b = int(bounds[np.random.default_rng([s, 5]).integers(len(bounds))])
            for i in range(1, branches + 1):
                for rep in range(1, branch_reps + 1):
                    info = {"branch_of": index, "branch_step": b, "scene_seed": s}
                    if branch_reps > 1:
                        info.update(branch=i, rep=rep)
                    if branch_offset:
                        info.update(branch=i, offset=float(branch_offset))
                    record(b * stamp_dt, json.dumps(info), True, branch, s, snaps[b], b, i, rep)
    finally:
        buf.close()
        if own:
            env.close()
    out_info: dict[str, Any] = {"episodes": len(list(seeds)), "successes": totals["successes"],
                                "frames": totals["frames"], "seeds": [int(s) for s in seeds]}
    if branches:
        out_info.update({"branches": int(branches), "branch_frac": float(branch_frac),
                         **({"branch_reps": int(branch_reps)} if branch_reps > 1 else {}),
                         **({"branch_offset": float(branch_offset)} if branch_offset else {}),
                         **{k: totals[k] for k in ("branch_episodes", "branch_successes", "branch_frames")}})
    return {**out_info, "wall_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------------- cli
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", "--buffer", required=True, help="replay-buffer dataset directory")
    p.add_argument("--policy", "--init", required=True, help="input (SFT) checkpoint directory")
    p.add_argument("--out", default=None, help="new checkpoint directory (must not exist)")
    p.add_argument("--store", default=None, help="CheckpointStore root to publish the new version into")
    p.add_argument("--method", default="qvgm", choices=METHODS)
    p.add_argument("--critic-objective", default="calql", choices=["calql", "cql", "iql"])
    p.add_argument("--ensemble", type=int, default=2, help="number of Q heads")
    p.add_argument("--aggregate", default="mean", choices=["mean", "min", "lcb"])
    p.add_argument("--gate", default="last-M", choices=["last-M", "smooth"])
    p.add_argument("--gate-m", type=int, default=5, help="M of the last-M gate")
    p.add_argument("--no-projection", action="store_true")
    p.add_argument("--no-clipping", action="store_true")
    p.add_argument("--no-keep-best", action="store_true")
    p.add_argument("--critic-features", default="rl-token", choices=list(CRITIC_FEATURES),
                   help="critic state: the policy's RL token (state backbone: encoder embedding) or pooled features "
                        "(pi05: mean of the prefix embeddings; state: raw normalised state + privileged)")
    p.add_argument("--no-per-layer-injection", action="store_true", help="critic action into the first layer only")
    p.add_argument("--lcb-beta", type=float, default=1.0, help="--aggregate lcb: mean - beta * std")
    p.add_argument("--max-shift", type=float, default=None,
                   help="trust region: RMS bound on A_Q - A_base per critic coordinate (normalised units)")
    p.add_argument("--trust-origin", default="base", choices=["base", "reference"],
                   help="--max-shift around A_base at each step or around the reference policy's own sample")
    p.add_argument("--critic-layer-norm", action="store_true", help="LayerNorm on the critic's hidden layers")
    p.add_argument("--critic-dropout", type=float, default=0.0)
    p.add_argument("--gamma", type=float, default=0.99, help="discount per control step")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of episodes held out of critic training (critic evaluation, actor early stop)")
    p.add_argument("--actor-eval-every", type=int, default=0,
                   help="early stopping: every N actor steps, held-out LCB Q of the actor's actions (0: off)")
    p.add_argument("--actor-patience", type=int, default=3)
    p.add_argument("--n-exec", type=int, default=5, help="executed steps per chunk (critic action length)")
    p.add_argument("--critic-steps", type=int, default=2000)
    p.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--critic-batch", type=int, default=256)
    p.add_argument("--critic-contrast", type=float, default=0.0, metavar="W",
                   help="weight of the within-state contrast term on the buffer's branch groups (0 = off)")
    p.add_argument("--reg-weight", type=float, default=0.1,
                   help="w of the Cal-QL / CQL term (0.1: see docs/RESULTS.md, critic quality)")
    p.add_argument("--actor-steps", type=int, default=300)
    p.add_argument("--actor-lr", type=float, default=1e-4)
    p.add_argument("--ascent-lr", type=float, default=ImproveConfig.ascent_lr,
                   help="Q-VGM ascent step alpha, normalised units (chosen on pick_place tuning seeds: "
                        "docs/RESULTS.md, Q-VGM's projection box; the built-in stack task uses 0.005, "
                        "critic_trainer.recipes)")
    p.add_argument("--ascent-steps", type=int, default=4, help="J")
    p.add_argument("--bc-weight", type=float, default=0.0)
    p.add_argument("--steps-per-sample", type=int, default=None,
                   help="Q-VGM: evaluate the loss at S drawn flow steps per sample (gated and anchor-only sets "
                        "each), an unbiased estimate; default all K")
    add_baseline_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="feature cache + logs (default OUT.work or STORE/work)")
    p.add_argument("--version", default=None, help="version string for --out (default INIT+METHOD)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help=f"where the policy and critic train: {DEVICE_CHOICES_HELP}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--watch", action="store_true",
                   help="keep improving: a round now and after every --watch-min-episodes new labelled episodes, each "
                        "from the store's current version, published into --store (critic_trainer/watch.py)")
    p.add_argument("--watch-min-episodes", type=int, default=10)
    p.add_argument("--watch-poll", type=float, default=10.0, help="seconds between buffer checks")
    p.add_argument("--watch-rounds", type=int, default=0, help="exit after N published rounds (0: until stopped)")


def add_baseline_arguments(p: argparse.ArgumentParser) -> None:
    """--action-box (alias --dql-box, deprecated), --dql-eta, --dql-box-weight, --distill-max-shift,
    --distill-ascent-steps, --distill-bc-weight (defaults: ImproveConfig's)."""
    d = ImproveConfig()
    p.add_argument("--dql-eta", type=float, default=d.dql_eta,
                   help="Diffusion-QL alpha: weight of -Q/mean|Q| next to the BC flow loss")
    p.add_argument("--dql-box-weight", type=float, default=d.dql_box_weight,
                   help="Diffusion-QL: weight of the pull-back of sample coordinates outside the action box")
    p.add_argument("--action-box", "--dql-box", dest="action_box", default=d.action_box, choices=["data", "unit"],
                   help="action box of Q-VGM's / Q-distillation's ascent projection and Diffusion-QL's clamp: the "
                        "buffer's per-dim action range (data) or [-1, 1] (unit); --dql-box is a deprecated alias")
    p.add_argument("--distill-max-shift", type=lambda v: None if v.lower() == "none" else float(v),
                   default=d.distill_max_shift, metavar="S|none",
                   help="Q-distillation trust region: RMS bound of the target from the reference's sample")
    p.add_argument("--distill-ascent-steps", type=int, default=d.distill_ascent_steps,
                   help="Q-distillation ascent steps (default: --ascent-steps)")
    p.add_argument("--distill-ascent-lr", type=lambda v: None if v.lower() == "none" else float(v),
                   default=d.distill_ascent_lr, metavar="A|none",
                   help="Q-distillation ascent step alpha (none: --ascent-lr)")
    p.add_argument("--distill-bc-weight", type=float, default=d.distill_bc_weight,
                   help="Q-distillation: weight of a BC flow loss on buffer chunks")


def baseline_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ImproveConfig fields set by add_baseline_arguments."""
    return {k: getattr(args, k) for k in ("dql_eta", "dql_box_weight", "action_box", "distill_max_shift",
                                          "distill_ascent_steps", "distill_ascent_lr", "distill_bc_weight")}


def run(args: argparse.Namespace) -> int:
    from qvgm.policy import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.out is None) == (args.store is None):
        raise ValueError("give exactly one of --out DIR and --store STORE")
    if args.out is not None and Path(args.out).exists():
        raise FileExistsError(f"output checkpoint {args.out} already exists")
    cfg = ImproveConfig(method=args.method, n_exec=args.n_exec, seed=args.seed, critic_objective=args.critic_objective,
                        ensemble=args.ensemble, aggregate=args.aggregate, critic_hidden=tuple(args.critic_hidden),
                        critic_steps=args.critic_steps, critic_batch=args.critic_batch, reg_weight=args.reg_weight,
                        critic_contrast_weight=args.critic_contrast,
                        actor_steps=args.actor_steps, actor_lr=args.actor_lr,
                        gate=args.gate, gate_last_m=args.gate_m, ascent_steps=args.ascent_steps,
                        ascent_lr=args.ascent_lr, project=not args.no_projection, clip_grad=not args.no_clipping,
                        keep_best=not args.no_keep_best, bc_weight=args.bc_weight,
                        critic_features=args.critic_features, per_layer_injection=not args.no_per_layer_injection,
                        lcb_beta=args.lcb_beta, max_shift=args.max_shift, trust_origin=args.trust_origin,
                        critic_layer_norm=args.critic_layer_norm,
                        critic_dropout=args.critic_dropout, gamma=args.gamma, holdout=args.holdout,
                        actor_eval_every=args.actor_eval_every, actor_patience=args.actor_patience,
                        steps_per_sample=args.steps_per_sample, **baseline_settings(args))
    if args.watch:
        from critic_trainer.watch import watch

        if args.store is None:
            raise ValueError("--watch publishes into a checkpoint store: give --store STORE")
        if args.watch_min_episodes < 1 or args.watch_poll <= 0:
            raise ValueError("--watch-min-episodes must be >= 1 and --watch-poll > 0")
        rounds = watch(Path(args.dataset), Path(args.store), Path(args.policy), cfg,
                       Path(args.work_dir) if args.work_dir else Path(args.store) / "work",
                       min_new=args.watch_min_episodes, poll_s=args.watch_poll, rounds=args.watch_rounds,
                       device=resolve_device(args.device),
                       progress=not args.no_progress, log=lambda m: print(m, flush=True))
        print(json.dumps({"watch_rounds": rounds}))
        return 0
    policy = load_policy(args.policy, device=args.device)
    backbone = policy.config.backbone
    buf = load_buffer(args.dataset, policy.horizon, with_images=backbone != "state")
    work = Path(args.work_dir) if args.work_dir else (Path(str(args.out) + ".work") if args.out
                                                        else Path(args.store) / "work")
    try:
        actor, critic, summary = improve(policy, buf, cfg, work=work, progress=not args.no_progress)
    except FloatingPointError as e:
        raise ValueError(f"training diverged, nothing published: {e}") from None
    manifest = publish(actor, critic, summary, Path(args.policy), out=Path(args.out) if args.out else None,
                       store=Path(args.store) if args.store else None, version=args.version)
    (work / "summary.json").write_text(json.dumps(manifest["summary"], indent=1, default=str))
    crit = summary.get("critic", {}).get("eval", {})
    print(json.dumps({"version": manifest["version"], "parent": manifest["parent"], "method": cfg.method,
                      "out": args.out or args.store, "critic_mc_corr": crit.get("mc_corr"),
                      "q_before": summary["actor"].get("q_policy_before"),
                      "q_after": summary["actor"].get("q_policy_after"), "log": str(work / "scalars.jsonl"),
                      "summary": str(work / "summary.json")}))
    return 0


__all__ = ["BestOfNPolicy", "BufferData", "DatasetError", "ImproveConfig", "QGuidedPolicy", "buffer_transitions",
           "check_compatible", "collect_rollouts", "evaluate", "extract_features", "improve", "load_buffer",
           "load_critic", "publish", "train_actor", "train_critic", "wilson_interval"]

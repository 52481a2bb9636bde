"""Few-shot supervised flow matching (SFT) of a FlowPolicy on replay-buffer datasets.

    critic_trainer sft --dataset DIR [--dataset DIR2 ...] --config state|pi05-tiny|pi05-small --out CKPT
                       --steps N --seed S [--batch-size B] [--lr LR] [--resume]
    critic_trainer sft --dataset DIR --init BASE_CKPT --out CKPT ...   (fine-tune a pretrained checkpoint)

`--init` starts from a checkpoint (an imported pi0.5, or a base SFT'd on other tasks) instead of fresh weights:
its architecture, weights and tokenizer are kept, the norm stats are the new data's (openpi's convention for
fine-tuning: the weights work in normalised units, and a base trained on other tasks may have seen a narrower range,
e.g. a gripper that never closed), the data must fit it (state and action dims, cameras, every prompt word known to
its tokenizer), and the new checkpoint names it as its parent.

Data: every frame of every kept episode is a training sample: its observation and the chunk of H actions
a_i..a_{i+H-1}; steps past the episode end repeat the last action and are masked out of the loss.
Quantile norm stats (1%/99%) come from the kept frames' states and actions and are stored in the checkpoint.
Loss: flow matching in the openpi convention (t = 1 noise, t = 0 clean; x_t = t*eps + (1-t)*a, target
eps - a, t ~ Beta(1.5, 1)*0.999 + 0.001), MSE over real action dims and unpadded steps. Sim-only option
`--pose-aux W`: + W * MSE of a training-only head (PoseReadout, not saved) reading the normalised object state from
the image tokens, which teaches a from-scratch vision tower where the objects are (`--pose-probe`: the head learns
from detached tokens, a probe that leaves training unchanged). Sim-only option `--keypoint-aux W` (pi05 with
keypoint_prompt_queries): + W * the squared distance between the first prompt-query keypoint of each camera in
`--keypoint-aux-cameras` (default front) and where the object the prompt names (role 0, the target cube) projects into
that image: it teaches the prompt to point at the named object (colour grounding); `--grounding-dataset DIR` adds
frames that train only that grounding.

Determinism: one seed fixes the init (torch.manual_seed), the batch indices (numpy PCG64) and the
noise/flow times (a torch.Generator); same seed + data + thread count -> identical weights.
Resume: every `checkpoint_every` steps the training state is written atomically to WORK/train_state/
(model.safetensors; optimizer.safetensors = Adam moments + torch RNG state; state.json = step, numpy RNG,
config, data fingerprint). `--resume` continues from it and ends bit-identical to an uninterrupted run.
Logs: WORK/scalars.jsonl ({"stage": "sft", "step", "loss", "lr", "wall_s"} per line), and TensorBoard event files in
WORK/tb when the optional `tensorboard` package is importable. WORK defaults to OUT + ".work".
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from critic_trainer.scalars import ScalarLog
from qvgm.data import DatasetError, ReplayReader
from qvgm.devices import DEVICE_CHOICES_HELP, resolve_device
from qvgm.policy import NormStats, make_policy, save_policy
from qvgm.policy.flow import FlowPolicyBase, sample_flow_time
from qvgm.policy.processor import normalize

HELP = "supervised flow-matching fine-tuning (SFT) of a policy on replay-buffer datasets"
STATE_DIR = "train_state"


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class DemoData:
    """Frames of one or more datasets, flattened. Robot units (rad, m), not normalised.

    state [N, ds], actions [N, H, da] (chunk from each frame, padded with the last action), valid [N, H] bool,
    privileged [N, k] or None, prompts [N] str, images {cam: uint8 [N, h, w, 3]} (empty without cameras),
    episode [N] int (running episode id across datasets), datasets: their paths.
    """

    state: np.ndarray
    actions: np.ndarray
    valid: np.ndarray
    privileged: np.ndarray | None
    prompts: list[str]
    images: dict[str, np.ndarray]
    episode: np.ndarray
    datasets: list[str] = field(default_factory=list)
    fps: int = 10

    def __len__(self) -> int:
        return len(self.state)

    def subset(self, rows: np.ndarray) -> DemoData:
        return DemoData(self.state[rows], self.actions[rows], self.valid[rows],
                        None if self.privileged is None else self.privileged[rows], [self.prompts[i] for i in rows],
                        {c: v[rows] for c, v in self.images.items()}, self.episode[rows], self.datasets, self.fps)

    def observations(self, rows: np.ndarray | list[int]) -> list[dict[str, Any]]:
        """Interface observation dicts of frames `rows` (with `privileged` when present)."""
        out = []
        for i in rows:
            o: dict[str, Any] = {"images": {c: v[i] for c, v in self.images.items()}, "state": self.state[i],
                                 "prompt": self.prompts[i]}
            if self.privileged is not None:
                o["privileged"] = self.privileged[i]
            out.append(o)
        return out

    def fingerprint(self) -> str:
        """sha256 over states, actions and prompts (resume refuses different data)."""
        h = hashlib.sha256()
        for a in (self.state, self.actions, self.valid):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update("\n".join(self.prompts).encode())
        return h.hexdigest()


def load_demo_data(datasets: list[str | Path], horizon: int, with_images: bool, success_only: bool = False,
                   max_episodes: int | None = None) -> DemoData:
    """Read datasets (replay-buffer format) into DemoData with H = `horizon` action chunks.

    Discarded episodes are dropped; `success_only` keeps episodes labelled successful; `max_episodes` keeps the
    first n episodes of each dataset. Raises ValueError for no datasets, no usable frames, or datasets whose
    state/action dims, cameras or fps disagree; DatasetError for a directory that is not a dataset.
    """
    from critic_trainer.demos import load_privileged

    if not datasets:
        raise ValueError("no --dataset given")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    parts: list[dict[str, Any]] = []
    ref: dict[str, Any] | None = None
    ep_offset = 0
    for ds in datasets:
        if not Path(ds).exists():
            raise FileNotFoundError(f"dataset {ds} does not exist")
        r = ReplayReader(ds, success=True if success_only else None, decode_images=with_images)
        try:
            shape = {"state_dim": r.state.shape[1], "action_dim": r.action.shape[1],
                     "cameras": sorted(k.split(".")[-1] for k in r.video_keys), "fps": r.fps}
            if ref is None:
                ref = {"path": str(ds), **shape}
            else:
                for key, val in shape.items():
                    if val != ref[key]:
                        raise ValueError(f"dataset {ds} has {key} {val}, but {ref['path']} has {key} {ref[key]}; "
                                         "SFT needs datasets of one robot/camera setup")
            eps = [e for e in range(len(r.episodes)) if r.episode_mask[e]]
            if max_episodes is not None:
                eps = eps[:max_episodes]
            if not eps:
                continue
            priv_all = load_privileged(r)
            rows_g: list[np.ndarray] = []
            acts, valid = [], []
            for e in eps:
                s, t = int(r.ep_start[e]), int(r.ep_end[e])
                g = np.arange(s, t)
                idx = g[:, None] + np.arange(horizon)[None]
                ok = idx < t
                acts.append(r.action[np.minimum(idx, t - 1)])
                valid.append(ok)
                rows_g.append(g)
            g_all = np.concatenate(rows_g)
            images: dict[str, np.ndarray] = {}
            if with_images and r.video_keys:
                dec = r.images(g_all.tolist())
                for cam in dec[int(g_all[0])]:
                    images[cam] = np.stack([dec[int(g)][cam] for g in g_all])
            episode = np.concatenate([np.full(len(x), ep_offset + k) for k, x in enumerate(rows_g)])
            ep_offset += len(eps)
            parts.append({"state": r.state[g_all], "actions": np.concatenate(acts), "valid": np.concatenate(valid),
                          "privileged": None if priv_all is None else priv_all[g_all],
                          "prompts": [r.tasks[int(i)] for i in r.task_index[g_all]], "images": images,
                          "episode": episode})
        finally:
            r.close()
    if not parts:
        what = "successful " if success_only else ""
        raise ValueError(f"no {what}episodes with frames in {[str(d) for d in datasets]} (empty dataset?)")
    has_priv = all(p["privileged"] is not None for p in parts)
    if has_priv and len({p["privileged"].shape[1] for p in parts}) != 1:
        raise ValueError("datasets have privileged state of different widths")
    return DemoData(
        state=np.concatenate([p["state"] for p in parts]).astype(np.float32),
        actions=np.concatenate([p["actions"] for p in parts]).astype(np.float32),
        valid=np.concatenate([p["valid"] for p in parts]),
        privileged=np.concatenate([p["privileged"] for p in parts]) if has_priv else None,
        prompts=[s for p in parts for s in p["prompts"]],
        images={c: np.concatenate([p["images"][c] for p in parts]) for c in parts[0]["images"]},
        episode=np.concatenate([p["episode"] for p in parts]),
        datasets=[str(d) for d in datasets], fps=int(ref["fps"]) if ref else 10)


def norm_stats_from(data: DemoData) -> NormStats:
    """1%/99% quantiles of the states and of the valid (unpadded) actions."""
    return NormStats.compute(data.state, data.actions[data.valid])


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    """SFT run settings. lr: AdamW peak learning rate with `warmup` linear steps then cosine to 10 %."""

    datasets: list[str]
    config: str = "state"
    out: str = "sft_ckpt"
    steps: int = 2000
    seed: int = 0
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 50
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 25
    success_only: bool = False
    max_episodes: int | None = None
    version: str | None = None
    work_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # policy config overrides (e.g. horizon)
    # EMA of the weights (0 = off): after every step ema <- ema_decay * ema + (1 - ema_decay) * weights, and the
    # checkpoint holds the EMA weights. Warm-started: the effective decay is min(ema_decay, (1 + k) / (10 + k)).
    ema_decay: float = 0.0
    # random-shift image augmentation (DrQ-style; 0 = off): each training image, per sample and camera, is padded by
    # `image_shift` px at the model's input resolution (edge pixels repeated) and cropped back at a random offset in
    # [0, 2 * image_shift] px along each axis. Pixel backbones only; evaluation and inference never shift.
    image_shift: int = 0
    # Sim-only training aid (0 = off): weight of an auxiliary loss that reads the sim's object state (the
    # dataset's privileged values, normalised with their 1%/99% quantiles, clipped to [-1, 1]) from the image
    # tokens, through a training-only head (PoseReadout) that is not saved: the checkpoint, inference and the
    # deployed policy see pixels only. It teaches a vision tower trained from scratch where the objects are, which
    # the flow loss alone does not do from a few demos (docs/RESULTS.md). pi05 backbones; the data needs
    # privileged state. A real robot's data has none: there the remedy is pretrained vision.
    pose_aux: float = 0.0
    # With pose_aux > 0: the readout learns from detached image tokens, so its loss has no gradient into the policy
    # and the policy trains exactly as without pose_aux (bit-identical): a probe of how well plain SFT's image
    # tokens already locate the objects (bench/sft_success.py reports the readout's error on fresh scenes).
    pose_probe: bool = False
    # With pose_aux > 0: more datasets whose frames feed the pose readout only (images + privileged object state;
    # their actions are never used): scenes the few action demos do not cover, as the stand-in for the pretrained
    # vision that a published pi0.5 brings. Each step adds a batch of them to the readout's loss (the mean of the
    # two batches' losses). The targets are normalised with these frames' quantiles.
    pose_datasets: list[str] = field(default_factory=list)
    # With pose_aux > 0: this many steps of vision-only training before SFT (the vision tower, its projector and
    # the readout on the pose targets of the training data and pose_datasets; no LM, no expert: ~6x cheaper per
    # step than SFT for pi05-tiny), own AdamW, lr warm-up then cosine with peak `lr`. Pretrains the vision the way
    # a published pi0.5 arrives pretrained. Runs only when SFT starts from step 0 (a resume restores its result).
    pose_pretrain_steps: int = 0
    # What the readout reads: "image" = the image tokens entering the LM (vision only; it cannot know which cube
    # the prompt names); "prefix" = the LM's final prefix embeddings (image + prompt tokens after the prefix
    # attention), so "where is the object the prompt names" is learnable and its gradient teaches the grounding.
    pose_readout: str = "image"
    # The targets: "all" = xyz + quaternion per role; "xyz" = positions only (the quaternions of symmetric cubes
    # are not visible at small sizes, and a readout can only memorise them per scene).
    pose_values: str = "all"
    # Camera dropout (0 = off): each training sample's cameras are masked, independently with this probability, as
    # a missing camera is at inference (its tokens leave the attention); a sample never loses all its cameras. A
    # policy that can lean on one view (the wrist camera) then also has to learn from the others, and it keeps
    # working when a camera drops out on the robot. Pixel backbones only.
    camera_dropout: float = 0.0
    # Sim-only grounding aid (0 = off): weight of an auxiliary loss on the first prompt-query keypoint
    # (Pi05Config.keypoint_prompt_queries >= 1) of each camera in `keypoint_aux_cameras`: its squared distance, in the
    # keypoint convention ((x, y) in [-1, 1] over the pixel centres, x left to right, y top to bottom), from the
    # projection of the object the prompt names first (role 0 of the privileged state: the target cube) into that
    # camera (the wrist camera posed by forward kinematics of the frame's joint state), averaged over the cameras.
    # The flow loss alone did not teach the prompt queries to find the named cube on random colours
    # (docs/RESULTS.md); this supervises exactly that binding. Frames where the object projects outside the image are
    # left out. Frames must be square (resized to the model's size, never padded). With image_shift the targets move
    # with each shifted image (and leave out frames whose target the shift pushes out of it). Training only: the
    # checkpoint and inference are unchanged.
    keypoint_aux: float = 0.0
    keypoint_aux_cameras: list[str] = field(default_factory=lambda: ["front"])
    # With keypoint_aux > 0: more datasets (images, prompts and the sim's object state; their actions are never used)
    # whose frames feed only keypoint_aux: each step adds a batch of them through the keypoint net alone (no LM, no
    # action expert) and the grounding loss is the mean of the two batches'. Grounding learnt on many scenes, actions
    # from the few demos: the sim's stand-in for the object grounding a pretrained VLM brings.
    grounding_datasets: list[str] = field(default_factory=list)
    # fine-tune this checkpoint directory (verified, safetensors) instead of building fresh weights: its config,
    # weights and tokenizer are kept, the norm stats are the data's; `config` and `overrides` must not contradict it
    # (init_policy_for)
    init: str | None = None
    # more texts whose words the word-level tokenizer of FRESH pi05 weights knows besides the data's prompts, e.g.
    # the prompts of tasks a base checkpoint will later be fine-tuned on (its tokenizer cannot grow afterwards)
    vocabulary: list[str] = field(default_factory=list)
    # where training runs: "auto" = CUDA when present, else CPU (qvgm.devices.resolve_device). Not part of the
    # training key: a run started on one device resumes on another. Initial weights and batches are drawn on the
    # CPU (same seed -> same init, rows, noise and flow times on every device; results agree to float tolerance).
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.image_shift < 0:
            raise ValueError(f"image_shift must be >= 0 px, got {self.image_shift}")
        if not 0.0 <= self.camera_dropout < 1.0:
            raise ValueError(f"camera_dropout must be a probability in [0, 1), got {self.camera_dropout}")
        if not (self.pose_aux >= 0 and math.isfinite(self.pose_aux)):
            raise ValueError(f"pose_aux must be a finite weight >= 0, got {self.pose_aux}")
        if (self.pose_probe or self.pose_datasets or self.pose_pretrain_steps) and not self.pose_aux:
            raise ValueError("pose_probe / pose_datasets / pose_pretrain_steps train the pose readout: they need "
                             "pose_aux > 0")
        if self.pose_readout not in ("image", "prefix") or self.pose_values not in ("all", "xyz"):
            raise ValueError(f"pose_readout must be image|prefix and pose_values all|xyz, got {self.pose_readout!r}, "
                             f"{self.pose_values!r}")
        if self.pose_readout == "prefix" and self.pose_pretrain_steps:
            raise ValueError("pose_pretrain_steps trains the vision only: it needs pose_readout='image'")
        if self.pose_pretrain_steps < 0:
            raise ValueError(f"pose_pretrain_steps must be >= 0, got {self.pose_pretrain_steps}")
        if self.pose_pretrain_steps and self.pose_probe:
            raise ValueError("pose_probe leaves the policy as plain SFT trains it: no pose_pretrain_steps with it")
        if not (self.keypoint_aux >= 0 and math.isfinite(self.keypoint_aux)):
            raise ValueError(f"keypoint_aux must be a finite weight >= 0, got {self.keypoint_aux}")
        self.keypoint_aux_cameras = list(self.keypoint_aux_cameras)
        if self.grounding_datasets and not self.keypoint_aux:
            raise ValueError("grounding_datasets feed the keypoint_aux loss: they need keypoint_aux > 0")
        if self.keypoint_aux and (not self.keypoint_aux_cameras
                                  or len(set(self.keypoint_aux_cameras)) != len(self.keypoint_aux_cameras)):
            raise ValueError(f"keypoint_aux_cameras must name one or more distinct cameras, got "
                             f"{self.keypoint_aux_cameras}")

    @property
    def work(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(str(self.out) + ".work")

    def training_key(self) -> dict[str, Any]:
        """The fields that must match for a resume (everything but out/work_dir/steps/checkpoint cadence)."""
        d = dataclasses.asdict(self)
        for k in ("out", "work_dir", "steps", "checkpoint_every", "log_every", "version", "device"):
            d.pop(k)
        # keys of runs saved before these existed stay valid
        for k in ("ema_decay", "image_shift", "camera_dropout", "pose_aux", "pose_probe", "pose_datasets",
                  "pose_pretrain_steps", "keypoint_aux", "grounding_datasets", "init", "vocabulary"):
            if not d[k]:
                d.pop(k)
        if self.init:  # the base's weights, not where it lies: a resume refuses another base
            d["init"] = init_weights_sha256(self.init)
        for k, default in (("pose_readout", "image"), ("pose_values", "all"), ("keypoint_aux_cameras", ["front"])):
            if d[k] == default:
                d.pop(k)
        return d


class PoseReadout(torch.nn.Module):
    """Training-only head for SFTConfig.pose_aux: image tokens [B, T, width] (+ valid mask [B, T]) -> the object
    state [B, k] in normalised units. `heads` softmax-attention pools over the tokens (each a learned "where to
    look", as a spatial-softmax keypoint reads a position), concatenated, then one linear read-out. (One pool per
    output value got stuck with spread-out attention on a synthetic find-the-token task from some inits; 8 shared
    pools solved it from every init tried: tests/test_sft_pose_aux.py.)"""

    def __init__(self, width: int, k: int, heads: int = 8) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.score = torch.nn.Linear(width, heads)
        self.out = torch.nn.Linear(heads * width, k)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens.float())
        logits = self.score(h).masked_fill(~valid[..., None], float("-inf"))  # [B, T, heads]
        pooled = torch.einsum("bth,btw->bhw", logits.softmax(dim=1), h)
        return self.out(pooled.flatten(1))


class ImageTokenTap:
    """Captures the image tokens a pi05 feeds its LM (the multi-modal projector's output [B * N, T, width]) during
    a forward pass, without a second vision pass. `tokens(image_masks [B, N])` -> ([B, N * T, width], [B, N * T])."""

    def __init__(self, policy: FlowPolicyBase, where: str = "image") -> None:
        model = getattr(policy, "model", None)
        projector = getattr(getattr(getattr(model, "paligemma", None), "model", None), "multi_modal_projector", None)
        if projector is None:
            raise ValueError("pose_aux needs a pi05 backbone (image tokens); this policy has none")
        self.width = int(projector.linear.out_features)
        self.where = where
        self.extra = 1 if getattr(policy.config, "continuous_state", False) else 0
        self._out: torch.Tensor | None = None
        # "prefix": the LM's final norm, whose output is the prefix embedding [B, P, width] (images, prompt, state)
        module = model.lm.norm if where == "prefix" else projector
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self._out = output

    def clear(self) -> None:
        self._out = None

    def tokens(self, image_masks: torch.Tensor, token_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [B, P', width], valid [B, P']); "prefix" needs the batch's token_mask [B, L] too."""
        if self._out is None:
            raise RuntimeError("no forward pass captured")
        b, n = image_masks.shape
        out, self._out = self._out, None
        if self.where == "prefix":
            if token_mask is None:
                raise ValueError("the prefix readout needs the token mask")
            t = (out.shape[1] - token_mask.shape[1] - self.extra) // n
            img = image_masks[:, :, None].expand(b, n, t).reshape(b, n * t).bool()
            valid = torch.cat([img, token_mask.bool(), torch.ones(b, self.extra, dtype=torch.bool,
                                                                   device=img.device)], dim=1)
            return out, valid
        t = out.shape[1]
        return out.reshape(b, n * t, -1), image_masks[:, :, None].expand(b, n, t).reshape(b, n * t).bool()

    def close(self) -> None:
        self._handle.remove()


def grounding_targets(data: DemoData, camera: str, model_size: int, role: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SFTConfig.keypoint_aux targets: where role `role` of the privileged state (0: the object the prompt names
    first, the target cube; qvgm.sim.tasks.ROLES orders the rest) projects into camera `camera` (front: fixed;
    wrist: posed by forward kinematics of each frame's joint state, data.state), per frame -> (xy float32 [N, 2] in
    the keypoint convention: (x, y) in [-1, 1] over the pixel centres, x left to right, y top to bottom; inside
    bool [N]: in front of the camera and within the image), at the model's input resolution (model_size square).
    The frames must be square: they are then resized to the model's size without padding, which maps the image
    onto itself."""
    from qvgm.sim.env import TabletopEnv

    if data.privileged is None or data.privileged.shape[1] < 7 * role + 3:
        raise ValueError("keypoint_aux needs the sim's privileged object state: the dataset has no "
                         "meta/qvgm_privileged side files (record it with `critic_trainer demos`)")
    if camera not in data.images:
        raise ValueError(f"keypoint_aux: the data has no {camera!r} images (cameras {sorted(data.images)})")
    h, w = data.images[camera].shape[1:3]
    if h != w:
        raise ValueError(f"keypoint_aux: {camera} frames are {h}x{w} px; it needs square frames (the model pads "
                         "others to its square input, which would move the targets)")
    # the cameras and the arm are the same in every task's scene, so any task's model projects for all of them
    env = TabletopEnv("pick_place", cameras=(camera,), image_size=(h, w), render=False)
    try:
        env.reset(seed=0)
        joints = data.state[:, :7] if camera != "front" else None  # the camera rides on the arm
        uv, depth = env.project(data.privileged[:, 7 * role: 7 * role + 3], camera, joints=joints)
    finally:
        env.close()
    model_px = (uv + 0.5) * (model_size / w) - 0.5  # pixel centres of the frame -> those of the model's input
    xy = 2 * model_px / (model_size - 1) - 1
    inside = (depth > 0) & np.all(np.abs(xy) <= 1, axis=1)
    return torch.from_numpy(np.nan_to_num(xy).astype(np.float32)), torch.from_numpy(inside)


def grounding_loss(coords: torch.Tensor, targets: dict[int, tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                   image_masks: torch.Tensor, index: int, moves: torch.Tensor | None = None,
                   image_size: int = 0) -> torch.Tensor:
    """keypoint_aux's loss for one batch: the squared distance (keypoint units) of keypoint `index` in coords
    [B, n_cam, K + Q, 2] from its target, averaged over the frames that have one, then over the cameras of `targets`
    (camera index -> (xy [N, 2], inside [N]) of grounding_targets, picked by the batch's `rows` [B]). image_masks
    [B, n_cam] leaves out missing cameras. `moves` [B, n_cam, 2] px (random_shift of images `image_size` square)
    moves the targets with the shifted images, 2 / (image_size - 1) keypoint units per px, and leaves out those
    pushed off the image."""
    total = coords.new_zeros(())
    for ci, (xy, inside) in targets.items():
        target, use = xy[rows], inside[rows] & image_masks[:, ci].cpu()
        if moves is not None:
            target = target + moves[:, ci].float() * (2.0 / (image_size - 1))
            use = use & (target.abs() <= 1).all(-1)
        use = use.to(coords.device)
        dist2 = ((coords[:, ci, index] - target.to(coords.device)) ** 2).sum(-1)
        total = total + (dist2 * use).sum() / use.sum().clamp(min=1)
    return total / len(targets)


def pose_targets(data: DemoData, quantiles: tuple[np.ndarray, np.ndarray] | None = None, values: str = "all"
                 ) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray]]:
    """The dataset's privileged object state (xyz + quat wxyz per role; `values="xyz"`: positions only) normalised
    with `quantiles` (default: its own 1%/99% quantiles), clipped to [-1, 1]: (float32 [N, k], (q01, q99))."""
    if data.privileged is None:
        raise ValueError("pose_aux needs the sim's privileged object state: the dataset has no "
                         "meta/qvgm_privileged side files (record it with `critic_trainer demos`)")
    p = np.asarray(data.privileged, dtype=np.float64)
    if values == "xyz":
        if p.shape[1] % 7:
            raise ValueError(f"pose_values='xyz' needs 7 values (xyz + quat) per role, got {p.shape[1]}")
        p = p.reshape(len(p), -1, 7)[:, :, :3].reshape(len(p), -1)
    q01, q99 = quantiles if quantiles is not None else (np.quantile(p, 0.01, axis=0), np.quantile(p, 0.99, axis=0))
    return torch.from_numpy(np.clip(normalize(p, q01, q99), -1.0, 1.0).astype(np.float32)), (q01, q99)


@torch.no_grad()
def pose_readout_error(policy: FlowPolicyBase, readout: PoseReadout, data: DemoData,
                       quantiles: tuple[np.ndarray, np.ndarray], chunk: int = 128, where: str = "image",
                       values: str = "all", per_value: bool = False) -> Any:
    """Mean squared error (normalised units, [-1, 1] per value) of a trained PoseReadout on `data`'s frames: how well
    the tokens locate the objects on scenes the model was not trained on (a held-out probe). A float, or with
    `per_value` the error of each target value, float64 [k]."""
    targets, _ = pose_targets(data, quantiles, values)
    inputs = encode_inputs(policy, data)
    tap = ImageTokenTap(policy, where)
    dev = policy.device
    sq = torch.zeros(targets.shape[1], dtype=torch.float64)
    try:
        for s in range(0, len(data), chunk):
            rows = torch.arange(s, min(s + chunk, len(data)))
            batch = batch_inputs(inputs, rows, dev)
            policy.encode(batch)
            pred = readout(*tap.tokens(batch["image_masks"], batch.get("token_mask")))
            sq += ((pred - targets[rows].to(dev)) ** 2).sum(0).double().cpu()
    finally:
        tap.close()
    err = (sq / len(data)).numpy()
    return err if per_value else float(err.mean())


class WeightEMA:
    """Exponential moving average of a module's floating-point parameters and buffers (a detached copy)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * current, d = min(decay, (1 + n) / (10 + n)) after n updates."""
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the averaged weights into `module` (in place)."""
        sd = module.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v)


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to 0.1 * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac))))


# what the image readout (pose_aux "image") passes through the vision path: the images, and the prompt that keypoint
# nets with FiLM or prompt queries read
IMAGE_READOUT_INPUTS = ("images", "image_masks", "tokens", "token_mask")


def pose_pretrain(policy: FlowPolicyBase, readout: PoseReadout, frames: list[tuple[dict[str, torch.Tensor],
                  torch.Tensor]], cfg: SFTConfig, log: Any = None) -> float:
    """SFTConfig.pose_pretrain_steps of vision-only training: pi05 image tokens -> readout -> normalised object
    state, on batches drawn evenly from each (inputs, targets) source in `frames`. Updates the vision tower, its
    projector and the readout in place (own AdamW); returns the last step's loss."""
    model = policy.model
    params = (list(model.paligemma.model.vision_tower.parameters())
              + list(model.paligemma.model.multi_modal_projector.parameters()) + list(readout.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, dev = cfg.pose_pretrain_steps, policy.device
    schedule = dataclasses.replace(cfg, steps=max(1, n), warmup=max(1, min(100, n // 10)))  # lr_at over N steps
    rng = np.random.default_rng([cfg.seed, 11])
    per = max(1, cfg.batch_size // len(frames))
    loss_v = float("nan")
    for step in range(n):
        lr = lr_at(step, schedule)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = []
        for inputs, targets in frames:
            rows = torch.from_numpy(rng.integers(0, len(targets), size=per))
            # (+ the prompt: keypoints with FiLM or prompt queries read it)
            b = batch_inputs({k: inputs[k] for k in IMAGE_READOUT_INPUTS if k in inputs}, rows, dev)
            tokens, valid = model.image_tokens(b["images"], b["image_masks"], b.get("tokens"), b.get("token_mask"))
            losses.append(((readout(tokens, valid) - targets[rows].to(dev)) ** 2).mean())
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pose pretraining loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        loss_v = float(loss.item())
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == n):
            log.log("pose_pretrain", step + 1, {"pose_loss": loss_v, "lr": lr})
    return loss_v


def init_weights_sha256(directory: str | Path) -> str:
    """The sha256 of a checkpoint's weights as its manifest records it (CheckpointError when unreadable)."""
    from qvgm.policy.checkpoint_io import CheckpointError

    try:
        return str(json.loads((Path(directory) / "manifest.json").read_text())["files"]["model.safetensors"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: no readable manifest with model.safetensors ({e})") from None


def init_policy_for(base: FlowPolicyBase, data: DemoData, cfg: SFTConfig) -> FlowPolicyBase:
    """SFTConfig.init: the policy to fine-tune, built from the loaded base checkpoint's config, weights and tokenizer
    with the data's norm stats (as build_policy_for computes them). An override that differs from its config, data
    of other state / action dims or cameras, or a prompt word its tokenizer does not know -> ValueError naming it."""
    from qvgm.policy.checkpoint_io import build_policy
    from qvgm.policy.processor import UNK, clean_task

    if cfg.vocabulary:
        raise ValueError("vocabulary builds the tokenizer of fresh weights; an init checkpoint brings its own")
    pc = base.config
    wrong = {k: (getattr(pc, k, None), v) for k, v in cfg.overrides.items() if getattr(pc, k, None) != v}
    if wrong:
        raise ValueError("init: the architecture comes from the checkpoint, and " + "; ".join(
            f"its {k} is {have!r}, not {want!r}" for k, (have, want) in wrong.items()))
    problems = []
    if pc.state_dim != data.state.shape[1]:
        problems.append(f"state_dim {pc.state_dim}, the data {data.state.shape[1]}")
    if pc.real_action_dim != data.actions.shape[2]:
        problems.append(f"real_action_dim {pc.real_action_dim}, the data {data.actions.shape[2]}")
    if pc.backbone == "pi05" and sorted(pc.camera_names or []) != sorted(data.images):
        problems.append(f"cameras {sorted(pc.camera_names or [])}, the data {sorted(data.images)}")
    k = int(getattr(pc, "privileged_dim", 0) or 0)
    if k and (data.privileged is None or data.privileged.shape[1] != k):
        problems.append(f"privileged_dim {k}, the data {0 if data.privileged is None else data.privileged.shape[1]}")
    if problems:
        raise ValueError(f"init checkpoint {cfg.init} does not fit the data: " + "; ".join(problems))
    tok = base.processor.tokenizer
    if tok is not None and tok.token_to_id(UNK) is not None:
        unknown = set()
        for prompt in set(data.prompts):
            enc = tok.encode(clean_task(prompt))
            unknown |= {clean_task(prompt)[a:b] for t, (a, b) in zip(enc.tokens, enc.offsets, strict=True) if t == UNK}
        if unknown:
            raise ValueError(f"init checkpoint {cfg.init}: its tokenizer does not know the prompt words "
                             f"{sorted(unknown)} (a base for these tasks must be built with their vocabulary)")
    stats = norm_stats_from(data)
    if pc.backbone == "pi05" and k:
        stats = stats.with_privileged(data.privileged)
    policy = build_policy(pc, stats, base.processor.tokenizer)
    policy.load_state_dict(base.state_dict(), strict=True)
    if pc.backbone == "state" and hasattr(policy, "set_privileged_stats"):
        policy.set_privileged_stats(data.privileged)  # no-op unless the config has privileged_norm
    return policy


def build_policy_for(data: DemoData, cfg: SFTConfig) -> FlowPolicyBase:
    """A fresh policy sized to the data (state/action dims, cameras, privileged state) with data norm stats."""
    from qvgm.policy.config import get_config

    stats = norm_stats_from(data)
    over = {"state_dim": data.state.shape[1], "real_action_dim": data.actions.shape[2], **cfg.overrides}
    backbone = get_config(cfg.config).backbone
    if backbone == "state":
        if data.privileged is None:
            raise ValueError("the `state` backbone needs privileged object state: the dataset has no "
                             "meta/qvgm_privileged side files (record it with `critic_trainer demos`)")
        over.setdefault("privileged_dim", data.privileged.shape[1])
    else:
        if not data.images:
            raise ValueError(f"{cfg.config} needs camera images; the dataset has no cameras")
        over.setdefault("camera_names", sorted(data.images))
        k = int(over.get("privileged_dim", 0))
        if k and (data.privileged is None or data.privileged.shape[1] != k):
            have = "none" if data.privileged is None else data.privileged.shape[1]
            raise ValueError(f"privileged_dim={k} (object state in the prompt) but the dataset has {have} "
                             "privileged values per frame")
        if k:  # the told object state normalised like the state (m-sized values would use a few bins only)
            stats = stats.with_privileged(data.privileged)
    policy = make_policy(cfg.config, stats, tasks=sorted(set(data.prompts) | set(cfg.vocabulary)), **over)
    if backbone == "state" and hasattr(policy, "set_privileged_stats"):
        policy.set_privileged_stats(data.privileged)  # no-op unless the config has privileged_norm
    return policy


def encode_inputs(policy: FlowPolicyBase, data: DemoData, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Preprocess every frame once (images resized to the model size, kept as float16; tokens; state)."""
    out: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(data), chunk):
        inp = policy.processor(data.observations(range(s, min(s + chunk, len(data)))))
        for k, v in inp.items():
            out.setdefault(k, []).append(v.half() if k == "images" else v)
    return {k: torch.cat(v) for k, v in out.items()}


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift every image by a random whole number of pixels in [-pad, pad] along each axis, edges repeated.

    images: [..., C, S, S] (e.g. [B, n_cam, 3, S, S] in [-1, 1]), on any device; the offsets are drawn on the CPU
    from `generator` (one per image), so a seed gives the same shifts on every device. Returns (shifted images,
    moves [..., 2] int64 on the CPU: (dx, dy) px that each image's content moved, x right, y down: a point at pixel
    (u, v) is at (u + dx, v + dy) after, or clipped away). pad = 0 returns `images` itself and zero moves. A masked
    (constant) camera image stays constant.
    """
    *lead, c, h, w = images.shape
    if pad <= 0:
        return images, torch.zeros(*lead, 2, dtype=torch.int64)
    x = torch.nn.functional.pad(images.reshape(-1, c, h, w), (pad, pad, pad, pad), mode="replicate")
    n = x.shape[0]
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)  # (row, col) of the crop in the padded image
    dev_offsets = offsets.to(images.device)
    rows = (dev_offsets[:, 0:1] + torch.arange(h, device=images.device))[:, :, None]  # [n, h, 1]
    cols = (dev_offsets[:, 1:2] + torch.arange(w, device=images.device))[:, None, :]  # [n, 1, w]
    idx = torch.arange(n, device=images.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[idx, rows, cols]  # [n, h, w, c]
    moves = (pad - offsets).flip(-1).reshape(*lead, 2)  # output (r, c) shows input (r + row - pad, c + col - pad)
    return out.permute(0, 3, 1, 2).reshape(*lead, c, h, w), moves


def drop_cameras(image_masks: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Camera dropout: image_masks bool [B, N] with each present camera masked with probability `p` (draws on the CPU
    from `generator`); a sample that would lose every camera keeps its own unchanged. p = 0 returns the input."""
    if p <= 0:
        return image_masks
    drop = (torch.rand(image_masks.shape, generator=generator) < p).to(image_masks.device)
    kept = image_masks & ~drop
    none_left = ~kept.any(dim=1, keepdim=True)
    return torch.where(none_left, image_masks, kept)


def batch_inputs(inputs: dict[str, torch.Tensor], rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v[rows].float() if k == "images" else v[rows]).to(device) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------- state io
def _save_train_state(work: Path, policy: FlowPolicyBase, opt: torch.optim.Optimizer, step: int,
                      rng: np.random.Generator, gen: torch.Generator, cfg: SFTConfig, fingerprint: str,
                      last_loss: float, ema: WeightEMA | None = None, readout: torch.nn.Module | None = None
                      ) -> None:
    """Atomically replace WORK/train_state with the state after `step` optimizer steps."""
    tmp = work / f".{STATE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    sd = opt.state_dict()
    tensors = {"rng/torch_generator": gen.get_state()}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            tensors[f"opt/{pid}/{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    if ema is not None:
        tensors.update({f"ema/{k}": v.detach().cpu().contiguous() for k, v in ema.shadow.items()})
    if readout is not None:
        tensors.update({f"readout/{k}": v.detach().cpu().contiguous() for k, v in readout.state_dict().items()})
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "numpy_rng": rng.bit_generator.state, "param_groups": sd["param_groups"],
            "training_key": cfg.training_key(), "data_fingerprint": fingerprint, "last_loss": last_loss,
            "ema_updates": ema.updates if ema is not None else 0}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = work / STATE_DIR
    old = work / f".{STATE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_train_state(work: Path, policy: FlowPolicyBase, opt: torch.optim.Optimizer, rng: np.random.Generator,
                      gen: torch.Generator, cfg: SFTConfig, fingerprint: str, ema: WeightEMA | None = None,
                      readout: torch.nn.Module | None = None) -> int:
    """Restore a saved training state; returns the step to continue from. Mismatches -> ValueError.
    Falls back to the previous state when a crash struck between the two renames of `_save_train_state`."""
    d = work / STATE_DIR
    if not (d / "state.json").exists():
        d = work / f".{STATE_DIR}.old"
    meta = json.loads((d / "state.json").read_text())
    if meta["training_key"] != json.loads(json.dumps(cfg.training_key())):
        raise ValueError(f"{d}: saved run has different settings {meta['training_key']}; refusing to resume")
    if meta["data_fingerprint"] != fingerprint:
        raise ValueError(f"{d}: saved run used different data; refusing to resume")
    if meta["step"] > cfg.steps:
        raise ValueError(f"{d}: saved state is at step {meta['step']} > --steps {cfg.steps}")
    policy.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    tensors = load_file(str(d / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng/torch_generator"])
    rng.bit_generator.state = meta["numpy_rng"]
    if ema is not None:
        for k in ema.shadow:
            ema.shadow[k].copy_(tensors[f"ema/{k}"])
        ema.updates = int(meta.get("ema_updates", 0))
    if readout is not None:
        readout.load_state_dict({k[len("readout/"):]: v for k, v in tensors.items() if k.startswith("readout/")})
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------------- training
def train_sft(cfg: SFTConfig, data: DemoData | None = None, resume: bool = False, stop_after: int | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run SFT; writes the final checkpoint to cfg.out with save_policy and returns its manifest.

    `data` skips loading (tests, bench); `resume` continues from WORK/train_state when present;
    `stop_after` ends the process-local run after that many optimizer steps in total, leaving only the training
    state (to test resume). Returns {"manifest", "final_loss", "steps", "work"} (manifest None when stopped).
    """
    from qvgm.policy import load_policy
    from qvgm.policy.config import get_config

    if Path(cfg.out).exists():
        raise FileExistsError(f"output checkpoint {cfg.out} already exists")
    base = load_policy(cfg.init) if cfg.init else None  # hashes verified, safetensors only
    if base is not None:
        horizon, backbone = base.horizon, base.config.backbone
        if get_config(cfg.config).backbone != backbone:
            raise ValueError(f"init checkpoint {cfg.init} is a {backbone} policy, config {cfg.config!r} is not")
    else:
        horizon = int(cfg.overrides.get("horizon", get_config(cfg.config).horizon))
        backbone = get_config(cfg.config).backbone
    if data is None:
        data = load_demo_data(cfg.datasets, horizon, with_images=backbone != "state",
                              success_only=cfg.success_only, max_episodes=cfg.max_episodes)
    if data.actions.shape[1] != horizon:
        raise ValueError(f"data has chunks of {data.actions.shape[1]} actions, policy horizon is {horizon}")
    torch.manual_seed(cfg.seed)
    # initialised on the CPU, then moved: the same seed gives the same initial weights on every device (a CUDA
    # generator draws other numbers); real-size pi05 is fine-tuned from imported weights, not built here
    policy = (init_policy_for(base, data, cfg) if base is not None else build_policy_for(data, cfg)).to(
        resolve_device(cfg.device))
    policy.train()
    dev = policy.device
    inputs = encode_inputs(policy, data)
    actions = policy.processor.normalize_actions(data.actions)  # [N, H, D]
    valid = torch.from_numpy(data.valid)
    fingerprint = data.fingerprint()
    tap: ImageTokenTap | None = None
    readout: PoseReadout | None = None
    targets = pose_extra_targets = torch.zeros(0)
    pose_extra: DemoData | None = None
    pose_extra_inputs: dict[str, torch.Tensor] = {}
    if cfg.pose_aux > 0:
        quantiles = None
        if cfg.pose_datasets:
            pose_extra = load_demo_data(cfg.pose_datasets, horizon, with_images=True)
            pose_extra_targets, quantiles = pose_targets(pose_extra, values=cfg.pose_values)
            if (pose_extra.privileged is not None and data.privileged is not None
                    and data.privileged.shape[1] != pose_extra.privileged.shape[1]):
                raise ValueError(f"pose_datasets have {pose_extra.privileged.shape[1]} privileged values per frame, "
                                 f"the training data {data.privileged.shape[1]}")
            if sorted(pose_extra.images) != sorted(data.images):
                raise ValueError(f"pose_datasets have cameras {sorted(pose_extra.images)}, the training data "
                                 f"{sorted(data.images)}")
            # images (and the prompt, which prompt-reading keypoints need) for the image readout; the prefix readout
            # needs the state too
            pose_extra_inputs = {k: v for k, v in encode_inputs(policy, pose_extra).items()
                                 if cfg.pose_readout == "prefix" or k in IMAGE_READOUT_INPUTS}
            fingerprint += "+pose:" + pose_extra.fingerprint()
        targets, pose_quantiles = pose_targets(data, quantiles, cfg.pose_values)
        tap = ImageTokenTap(policy, cfg.pose_readout)
        readout = PoseReadout(tap.width, targets.shape[1]).to(dev)
    kp_targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # camera index -> (targets [N, 2], inside [N])
    kp_index = -1
    grounding: DemoData | None = None  # grounding_datasets: frames for keypoint_aux only
    grounding_inputs: dict[str, torch.Tensor] = {}
    grounding_kp_targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if cfg.keypoint_aux > 0:
        pcfg = policy.config
        if getattr(pcfg, "backbone", None) != "pi05" or not getattr(pcfg, "keypoint_prompt_queries", 0):
            raise ValueError("keypoint_aux trains the first prompt-query keypoint: it needs a pi05 config with "
                             "keypoint_tokens > 0 and keypoint_prompt_queries >= 1")
        missing = [c for c in cfg.keypoint_aux_cameras if c not in (pcfg.camera_names or [])]
        if missing:
            raise ValueError(f"keypoint_aux: the policy reads cameras {pcfg.camera_names}, not {missing}")
        kp_targets = {pcfg.camera_names.index(c): grounding_targets(data, c, pcfg.image_size)
                      for c in cfg.keypoint_aux_cameras}
        kp_index = pcfg.keypoint_tokens
        if cfg.grounding_datasets:
            grounding = load_demo_data(cfg.grounding_datasets, horizon, with_images=True)
            if sorted(grounding.images) != sorted(data.images):
                raise ValueError(f"grounding_datasets have cameras {sorted(grounding.images)}, the training data "
                                 f"{sorted(data.images)}")
            grounding_inputs = {k: v for k, v in encode_inputs(policy, grounding).items() if k in IMAGE_READOUT_INPUTS}
            grounding_kp_targets = {pcfg.camera_names.index(c): grounding_targets(grounding, c, pcfg.image_size)
                                  for c in cfg.keypoint_aux_cameras}
            fingerprint += "+grounding:" + grounding.fingerprint()
        policy.model.keypoints.keep_coordinates = True  # the flow loss's own pass gives the coordinates
    readout_params = list(readout.parameters()) if readout is not None else []
    opt = torch.optim.AdamW(list(policy.parameters()) + readout_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    work = cfg.work
    start = 0
    ema = WeightEMA(policy, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if resume and any((work / n / "state.json").exists() for n in (STATE_DIR, f".{STATE_DIR}.old")):
        start = _load_train_state(work, policy, opt, rng, gen, cfg, fingerprint, ema, readout)
    log = ScalarLog(work, start)
    pretrain_v = float("nan")
    if cfg.pose_pretrain_steps and start == 0 and readout is not None:
        frames = [(inputs, targets)] + ([(pose_extra_inputs, pose_extra_targets)] if pose_extra is not None else [])
        if tap is not None:
            tap.close()  # the pretraining reads image_tokens directly
        pretrain_v = pose_pretrain(policy, readout, frames, cfg, log)
        tap = ImageTokenTap(policy, cfg.pose_readout)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0 = time.perf_counter()
    loss_v = pose_v = kp_v = float("nan")
    b, h, d = cfg.batch_size, policy.horizon, policy.action_dim
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"sft {cfg.config}", disable=not progress,
               dynamic_ncols=True)
    try:
        for step in bar:
            rows = torch.from_numpy(rng.integers(0, len(data), size=b))
            noise = torch.randn(b, h, d, generator=gen)
            t = sample_flow_time(b, generator=gen)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = batch_inputs(inputs, rows, dev)
            moves = None  # [B, n_cam, 2] px (dx, dy) the image shift moved each camera's content
            if cfg.image_shift and "images" in batch:
                batch["images"], moves = random_shift(batch["images"], cfg.image_shift, gen)
            if cfg.camera_dropout and "image_masks" in batch:
                batch["image_masks"] = drop_cameras(batch["image_masks"], cfg.camera_dropout, gen)
            loss = policy.flow_loss(batch, actions[rows].to(dev), noise=noise.to(dev),
                                    time=t, action_mask=valid[rows].to(dev))
            flow_v = float(loss.item())
            # keypoint_aux: the coordinates of this pass, [B * cameras, K + Q, 2] batch-major (taken now: pose_aux's
            # extra scenes go through the keypoint net too)
            kp_coords = policy.model.keypoints.last_coordinates if kp_index >= 0 else None
            if readout is not None and tap is not None:
                tokens, tok_valid = tap.tokens(batch["image_masks"], batch.get("token_mask"))
                if cfg.pose_probe:
                    tokens = tokens.detach()
                pose_loss = ((readout(tokens, tok_valid) - targets[rows].to(dev)) ** 2).mean()
                if pose_extra is not None:  # a batch of the extra scenes, straight through the vision tower
                    # rows drawn from (seed, step) alone: the main stream of draws is the plain run's, and a resume
                    # needs no more state
                    prow = torch.from_numpy(np.random.default_rng([cfg.seed, step, 7]).integers(
                        0, len(pose_extra), size=b))
                    pb = batch_inputs(pose_extra_inputs, prow, dev)
                    if cfg.pose_readout == "prefix":
                        ctx = policy.encode(pb)
                        tokens, tok_valid = ctx.prefix_out, ctx.prefix_mask
                    else:
                        tokens, tok_valid = policy.model.image_tokens(pb["images"], pb["image_masks"],
                                                                      pb.get("tokens"), pb.get("token_mask"))
                    tap.clear()
                    if cfg.pose_probe:
                        tokens = tokens.detach()
                    extra = ((readout(tokens, tok_valid) - pose_extra_targets[prow].to(dev)) ** 2).mean()
                    pose_loss = 0.5 * (pose_loss + extra)
                pose_v = float(pose_loss.item())
                loss = loss + cfg.pose_aux * pose_loss
            if cfg.keypoint_aux > 0:  # each camera's first prompt-query keypoint onto the named object
                if kp_coords is None or kp_coords.shape[0] != b * batch["images"].shape[1]:
                    raise RuntimeError("keypoint_aux: the forward pass kept no keypoint coordinates for this batch")
                coords = kp_coords.view(b, batch["images"].shape[1], *kp_coords.shape[1:])
                kp_loss = grounding_loss(coords, kp_targets, rows, batch["image_masks"], kp_index, moves,
                                         batch["images"].shape[-1])
                if grounding is not None:  # + a batch of the grounding scenes, through the keypoint net alone
                    # rows drawn from (seed, step) alone, as for pose_aux's extra scenes
                    grow = torch.from_numpy(np.random.default_rng([cfg.seed, step, 13]).integers(
                        0, len(grounding), size=b))
                    gb = batch_inputs(grounding_inputs, grow, dev)
                    n_cam = gb["images"].shape[1]
                    cond, queries = policy.model.keypoint_conditioning(gb["tokens"], gb["token_mask"], n_cam)
                    gxy = policy.model.keypoints.coordinates(
                        gb["images"].flatten(0, 1).to(policy.model.keypoints.proj.weight.dtype), cond, queries
                    ).view(b, n_cam, -1, 2)
                    extra = grounding_loss(gxy, grounding_kp_targets, grow, gb["image_masks"], kp_index)
                    kp_loss = 0.5 * (kp_loss + extra)
                kp_v = float(kp_loss.item())
                loss = loss + cfg.keypoint_aux * kp_loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SFT loss became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                if readout_params:  # clipped on its own: the policy's clipping is what it is without the readout
                    torch.nn.utils.clip_grad_norm_(readout_params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(policy)
            loss_v = flow_v
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                extra = {"pose_loss": pose_v} if readout is not None else {}
                if cfg.keypoint_aux > 0:
                    extra["keypoint_aux_loss"] = kp_v
                log.log("sft", done, {"loss": loss_v, **extra, "lr": lr,
                                      "wall_s": round(time.perf_counter() - t0, 3)})
                bar.set_postfix(loss=f"{loss_v:.4f}", **({"pose": f"{pose_v:.4f}"} if readout is not None else {}))
            if done % cfg.checkpoint_every == 0 or done == end:
                _save_train_state(work, policy, opt, done, rng, gen, cfg, fingerprint, loss_v, ema, readout)
    finally:
        bar.close()
        log.close()
        if tap is not None:
            tap.close()
        if kp_index >= 0:
            policy.model.keypoints.keep_coordinates, policy.model.keypoints.last_coordinates = False, None
    if end < cfg.steps:
        return {"manifest": None, "final_loss": loss_v, "steps": end, "work": str(work), "final_pose_loss": pose_v,
                "final_keypoint_aux_loss": kp_v}
    policy.eval()
    if ema is not None:
        ema.copy_to(policy)
    summary = {"kind": "sft", "config": cfg.config, **({"init": str(cfg.init), "init_version": base.version}
                                                        if base is not None else {}),
               "datasets": data.datasets, "frames": len(data),
               "episodes": int(len(np.unique(data.episode))), "steps": cfg.steps, "seed": cfg.seed,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "final_loss": loss_v, "device": str(dev),
               "success_only": cfg.success_only, "ema_decay": cfg.ema_decay, "image_shift": cfg.image_shift,
               "data_sha256": fingerprint, **({"camera_dropout": cfg.camera_dropout} if cfg.camera_dropout else {}),
               **({"pose_aux": cfg.pose_aux, "pose_probe": cfg.pose_probe, "final_pose_loss": pose_v,
                   "pose_datasets": list(cfg.pose_datasets), "pose_pretrain_steps": cfg.pose_pretrain_steps,
                   "pose_pretrain_final_loss": None if math.isnan(pretrain_v) else pretrain_v}
                  if cfg.pose_aux else {}),
               **({"keypoint_aux": cfg.keypoint_aux, "keypoint_aux_cameras": list(cfg.keypoint_aux_cameras),
                   "final_keypoint_aux_loss": kp_v,
                   "keypoint_aux_frames_inside": {policy.config.camera_names[ci]: int(inside.sum())
                                                  for ci, (_, inside) in kp_targets.items()},
                   **({"grounding_datasets": list(cfg.grounding_datasets), "grounding_frames": len(grounding)}
                      if grounding is not None else {})}
                  if cfg.keypoint_aux else {})}
    version = cfg.version or f"sft-{cfg.config}-s{cfg.seed}-{cfg.steps}"
    manifest = save_policy(policy, cfg.out, version=version, parent=base.version if base is not None else None,
                           summary=summary)
    policy.version, policy.manifest = version, manifest  # the returned policy is that checkpoint, as if loaded
    out = {"manifest": manifest, "final_loss": loss_v, "steps": cfg.steps, "work": str(work), "policy": policy,
           "final_keypoint_aux_loss": kp_v}
    if readout is not None:  # training-only, not in the checkpoint: for held-out probes (pose_readout_error)
        out.update(final_pose_loss=pose_v, pose_readout=readout.eval(), pose_quantiles=pose_quantiles,
                   pose_readout_where=cfg.pose_readout, pose_values=cfg.pose_values)
    return out


@torch.no_grad()
def heldout_flow_loss(policy: FlowPolicyBase, data: DemoData, seed: int = 0, samples: int = 4) -> float:
    """Mean masked flow loss over every frame of `data` with fixed noise/time draws (comparable across models)."""
    policy.eval()
    inputs = encode_inputs(policy, data)
    actions = policy.processor.normalize_actions(data.actions)
    valid = torch.from_numpy(data.valid)
    gen = torch.Generator().manual_seed(seed)
    dev = policy.device
    total, n = 0.0, 0
    for _ in range(samples):
        for s in range(0, len(data), 256):
            rows = torch.arange(s, min(s + 256, len(data)))
            noise = torch.randn(len(rows), policy.horizon, policy.action_dim, generator=gen)
            t = sample_flow_time(len(rows), generator=gen)
            loss = policy.flow_loss(batch_inputs(inputs, rows, dev), actions[rows].to(dev), noise=noise.to(dev),
                                    time=t, action_mask=valid[rows].to(dev))
            total += float(loss) * len(rows)
            n += len(rows)
    return total / n


# ---------------------------------------------------------------------------------------------------- closed loop
@torch.no_grad()
def sample_chunk(policy: FlowPolicyBase, obs: dict[str, Any], gen: torch.Generator) -> np.ndarray:
    """One action chunk float[H, real action dims] for a sim observation (images, state, prompt, privileged), its
    flow noise drawn from `gen` (so a seeded generator reproduces an episode)."""
    o = {"images": obs.get("images", {}), "state": obs["state"], "prompt": obs["prompt"],
         "privileged": obs["privileged"]}
    noise = torch.randn(1, policy.horizon, policy.action_dim, generator=gen)
    return policy.act([o], noise=noise.to(policy.device))[0]


@torch.no_grad()
def rollout(policy: FlowPolicyBase, task: str, seed: int, n_exec: int = 5, image_size: tuple[int, int] = (224, 224),
            env: Any = None, compare_expert: bool = False, noise_seed: int = 0,
            max_steps: int | None = None, colors: str = "random") -> dict[str, Any]:
    """One closed-loop episode of `policy` in the sim (scene seed `seed`): infer a chunk, execute its first
    `n_exec` actions, repeat until success or the time limit. With `compare_expert` the noiseless scripted
    expert is queried at every executed step (it tracks its own set-point, so this is an approximate reference)
    and the mean absolute error (rad / m) of the policy's action vs the expert's is reported (`action_error`).
    Sampling noise is seeded by `noise_seed`; `max_steps` shortens the task's time limit and `colors` picks the
    scene colours (TabletopEnv's "random" | "fixed"), both for an env built here only.
    Returns {success, steps, action_error}."""
    from qvgm.sim import TabletopEnv, make_expert

    cams = tuple(getattr(policy.config, "camera_names", []) or [])
    own = env is None
    if own:
        env = TabletopEnv(task=task, cameras=cams or ("front",), image_size=image_size, render=bool(cams),
                          max_episode_steps=max_steps, colors=colors)
    expert = make_expert(task, noise=0.0, seed=seed) if compare_expert else None
    gen = torch.Generator().manual_seed(noise_seed)
    try:
        obs, _ = env.reset(seed=seed, options={"task": task})
        steps, ok, errs = 0, False, []
        while True:
            chunk = sample_chunk(policy, obs, gen)
            for a in chunk[: max(1, n_exec)]:
                if expert is not None:
                    errs.append(float(np.abs(a - expert.act(obs["state"], env.unwrapped.object_poses())).mean()))
                obs, _, term, trunc, _ = env.step(a.astype(np.float32))
                steps += 1
                if term or trunc:
                    ok = bool(term)
                    break
            else:
                continue
            break
    finally:
        if own:
            env.close()
    return {"success": ok, "steps": steps, "action_error": float(np.mean(errs)) if errs else None}


# ---------------------------------------------------------------------------------------------------- cli
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", action="append", required=True, help="replay-buffer dataset dir (repeatable)")
    p.add_argument("--config", default=None, choices=["state", "pi05-tiny", "pi05-small", "pi05"],
                   help="architecture of fresh weights (default state); with --init the checkpoint's")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="fine-tune this checkpoint (an imported pi0.5, a base SFT) instead of fresh weights")
    p.add_argument("--vocabulary", action="append", default=[], metavar="TEXT",
                   help="fresh pi05: words the tokenizer knows besides the data's prompts (repeatable), e.g. the "
                        "prompts of tasks this checkpoint will be fine-tuned on later")
    p.add_argument("--out", required=True, help="final checkpoint directory (must not exist)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=500, help="training-state save cadence (steps)")
    p.add_argument("--success-only", action="store_true", help="train on successful episodes only")
    p.add_argument("--max-episodes", type=int, default=None, help="first N episodes of each dataset")
    p.add_argument("--horizon", type=int, default=None, help="override the config's chunk length H")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="policy config override, e.g. keypoint_tokens=16 (repeatable; a field of the --config)")
    p.add_argument("--delta-actions", action="store_true",
                   help="predict the arm joints relative to the current joint state (gripper absolute; any backbone)")
    p.add_argument("--image-shift", type=int, default=0, metavar="PX",
                   help="random-shift image augmentation: up to PX pixels at the model's resolution (0 = off)")
    p.add_argument("--camera-dropout", type=float, default=0.0, metavar="P",
                   help="mask each training sample's cameras independently with probability P, as a missing camera "
                        "(never all of a sample's): the policy learns from every view and survives a lost one")
    p.add_argument("--pose-aux", type=float, default=0.0, metavar="W",
                   help="sim-only: weight of an auxiliary loss reading the object state from the image tokens "
                        "(training-only head, not saved; needs privileged state in the data; 0 = off)")
    p.add_argument("--pose-dataset", action="append", default=[], metavar="DIR",
                   help="with --pose-aux: a dataset whose frames feed only the pose readout (repeatable)")
    p.add_argument("--pose-pretrain-steps", type=int, default=0, metavar="N",
                   help="with --pose-aux: N vision-only steps on the pose targets before SFT")
    p.add_argument("--pose-readout", choices=["image", "prefix"], default="image",
                   help="with --pose-aux: read the image tokens (vision only) or the LM's prefix embeddings "
                        "(image + prompt: learns which object the prompt names)")
    p.add_argument("--pose-values", choices=["all", "xyz"], default="all",
                   help="with --pose-aux: the targets, xyz + quaternion per role or positions only")
    p.add_argument("--pose-probe", action="store_true",
                   help="with --pose-aux: the readout learns from detached image tokens (no gradient into the "
                        "policy; plain SFT plus a localisation probe)")
    p.add_argument("--keypoint-aux", type=float, default=0.0, metavar="W",
                   help="sim-only: weight of a loss pulling each camera's first prompt-query keypoint onto the object "
                        "the prompt names (needs keypoint_prompt_queries and privileged state; 0 = off)")
    p.add_argument("--keypoint-aux-cameras", nargs="+", default=["front"], metavar="CAM",
                   help="with --keypoint-aux: the cameras whose query keypoint is supervised (default front)")
    p.add_argument("--grounding-dataset", action="append", default=[], metavar="DIR",
                   help="with --keypoint-aux: a dataset whose frames feed only the grounding loss (more scenes than "
                        "the demos; their actions are not used; repeatable)")
    p.add_argument("--version", default=None, help="checkpoint version string")
    p.add_argument("--work-dir", default=None, help="training state + logs (default OUT.work)")
    p.add_argument("--resume", action="store_true", help="continue from WORK/train_state")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto", help=DEVICE_CHOICES_HELP)
    p.add_argument("--no-progress", action="store_true")


def parse_overrides(items: list[str], config: str) -> dict[str, Any]:
    """--override KEY=JSON items -> {key: value}; ValueError naming the item when KEY is not a field of `config`
    or the value is not JSON."""
    from qvgm.policy.config import get_config

    fields = set(dataclasses.asdict(get_config(config)))
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--override {item!r}: want KEY=JSON with KEY a field of the {config} config")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError as e:
            raise ValueError(f"--override {item!r}: the value is not JSON ({e})") from None
    return out


def base_config_name(directory: str | Path) -> str:
    """The config name a checkpoint was trained as (its SFT summary's), else its backbone ("pi05" / "state")."""
    from qvgm.policy.checkpoint_io import CheckpointError

    try:
        summary = json.loads((Path(directory) / "manifest.json").read_text()).get("summary") or {}
        return str(summary.get("config") or json.loads((Path(directory) / "config.json").read_text())["config"]
                   ["backbone"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}: not a readable checkpoint ({e})") from None


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = args.config or (base_config_name(args.init) if args.init else "state")
    cfg = SFTConfig(datasets=list(args.dataset), config=config, out=args.out, steps=args.steps, seed=args.seed,
                    batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                    checkpoint_every=args.checkpoint_every, success_only=args.success_only,
                    max_episodes=args.max_episodes, version=args.version, work_dir=args.work_dir,
                    overrides={**parse_overrides(args.override, config),
                               **({"horizon": args.horizon} if args.horizon else {}),
                               **({"delta_actions": True} if args.delta_actions else {})}, device=args.device,
                    image_shift=args.image_shift, camera_dropout=args.camera_dropout, pose_aux=args.pose_aux,
                    pose_probe=args.pose_probe, pose_datasets=list(args.pose_dataset),
                    pose_pretrain_steps=args.pose_pretrain_steps, pose_readout=args.pose_readout,
                    pose_values=args.pose_values, keypoint_aux=args.keypoint_aux,
                    keypoint_aux_cameras=list(args.keypoint_aux_cameras),
                    grounding_datasets=list(args.grounding_dataset), init=args.init,
                    vocabulary=list(args.vocabulary))
    try:
        res = train_sft(cfg, resume=args.resume, progress=not args.no_progress)
    except FloatingPointError as e:
        raise ValueError(str(e)) from None
    m = res["manifest"]
    print(json.dumps({"out": cfg.out, "version": m["version"], "final_loss": res["final_loss"], "steps": res["steps"],
                      "log": str(cfg.work / "scalars.jsonl"),
                      "tensorboard": str(cfg.work / "tb") if (cfg.work / "tb").exists() else None}))
    return 0


__all__ = ["DemoData", "SFTConfig", "DatasetError", "PoseReadout", "heldout_flow_loss", "load_demo_data",
           "norm_stats_from", "pose_pretrain", "pose_readout_error", "rollout", "train_sft"]

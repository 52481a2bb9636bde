"""Save / load FlowPolicy checkpoints as directories (format in qvgm.checkpoints):

    config.json        {"format": 1, "backbone": "pi05" | "state", "config": {...}}
    model.safetensors  the policy's state_dict (safetensors only; nothing is ever unpickled)
    tokenizer.json     HF `tokenizers` file (pi05 only)
    norm_stats.json    quantile stats (processor.NormStats)
    manifest.json      version, parent, sha256 of every file, summary (written by qvgm.checkpoints)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from qvgm.checkpoints import CheckpointError, atomic_directory, verify_checkpoint_dir, write_manifest
from qvgm.policy.config import Pi05Config, StateConfig, config_from_dict
from qvgm.policy.flow import FlowPolicyBase
from qvgm.policy.processor import NormStats

CONFIG, WEIGHTS, TOKENIZER, NORM_STATS = "config.json", "model.safetensors", "tokenizer.json", "norm_stats.json"
CONFIG_FORMAT = 1


def build_policy(cfg: Pi05Config | StateConfig, norm_stats: NormStats,
                 tokenizer: Tokenizer | None = None) -> FlowPolicyBase:
    """A freshly initialised policy for `cfg` (pi05 needs a tokenizer)."""
    if isinstance(cfg, Pi05Config):
        from qvgm.policy.pi05 import Pi05Policy

        if tokenizer is None:
            raise ValueError("pi05 policy needs a tokenizer")
        return Pi05Policy(cfg, tokenizer, norm_stats)
    from qvgm.policy.state_policy import StatePolicy

    return StatePolicy(cfg, norm_stats)


def write_policy_files(policy: FlowPolicyBase, directory: str | Path) -> None:
    """Write config.json, model.safetensors, tokenizer.json (pi05) and norm_stats.json into an existing
    directory, without a manifest: for `CheckpointStore.writing()` staging dirs (the store hashes/publishes).
    Refuses (ValueError) weights with NaN/inf."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in policy.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to save non-finite weights: {bad[:5]}")
    cfg = policy.config
    (directory / CONFIG).write_text(json.dumps({"format": CONFIG_FORMAT, "backbone": cfg.backbone,
                                                "config": cfg.to_dict()}, indent=2))
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    if getattr(policy.processor, "tokenizer", None) is not None:
        policy.processor.tokenizer.save(str(directory / TOKENIZER))
    policy.processor.norm_stats.save(directory / NORM_STATS)


def save_policy(policy: FlowPolicyBase, directory: str | Path, version: str, parent: str | None = None,
                summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `policy` as a checkpoint directory atomically (temp dir + rename) with its manifest; returns the
    manifest. Refuses (ValueError) weights with NaN/inf; `directory` must not exist yet."""
    with atomic_directory(Path(directory)) as tmp:
        write_policy_files(policy, tmp)
        manifest = write_manifest(tmp, version, parent, summary)
    return manifest


def check_expected(cfg: Pi05Config | StateConfig, expect: Mapping[str, Any]) -> None:
    """Refuse a config that does not fit the robot profile. `expect` keys (all optional): real_action_dim,
    state_dim, camera_names (set equality), horizon, action_dim, privileged_dim."""
    problems = []
    for key in ("real_action_dim", "state_dim", "horizon", "action_dim", "privileged_dim"):
        if key in expect and expect[key] is not None:
            have = getattr(cfg, key, None)
            if have != expect[key]:
                problems.append(f"{key}: checkpoint {have}, robot profile {expect[key]}")
    if expect.get("camera_names") is not None:
        have_c, want_c = set(cfg.camera_names), set(expect["camera_names"])
        if have_c != want_c:
            problems.append(f"camera_names: checkpoint {sorted(have_c)}, robot profile {sorted(want_c)}"
                            f" (missing {sorted(want_c - have_c)}, extra {sorted(have_c - want_c)})")
    if problems:
        raise CheckpointError("checkpoint does not match the robot profile: " + "; ".join(problems))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of a .safetensors file (no pickle); unreadable/truncated -> CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def load_state_checked(policy: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `policy`; missing/unexpected keys, wrong shapes, NaN/inf -> CheckpointError."""
    want = policy.state_dict()
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{source}: {len(missing)} missing keys {missing[:5]}, "
                              f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, model expects {tuple(want[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: {k} contains NaN/inf")
    policy.load_state_dict({k: v.to(want[k].dtype) for k, v in tensors.items()}, strict=True)


def load_policy(directory: str | Path, expect: Mapping[str, Any] | None = None,
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                verified_manifest: Mapping[str, Any] | None = None) -> FlowPolicyBase:
    """Verify (sha256 manifest) and load a checkpoint directory; returns the policy in eval mode on `device`
    (built there directly, no CPU copy) with `.version` and `.manifest` set; `dtype` e.g. torch.bfloat16 casts
    the weights after loading. Any problem -> CheckpointError with a message naming it.
    verified_manifest: the manifest the caller has just checked with verify_checkpoint_dir on this directory
    (e.g. HotReloader, under a store lease): the files are not hashed a second time.
    device: "cpu", "cuda", "cuda:N" or "auto" (qvgm.devices.resolve_device); an unavailable device -> ValueError."""
    from qvgm.devices import resolve_device

    device = resolve_device(device)
    directory = Path(directory)
    if verified_manifest is not None:
        manifest = dict(verified_manifest)
        missing = [f for f in (CONFIG, WEIGHTS, NORM_STATS) if f not in manifest.get("files", {})]
        if missing:
            raise CheckpointError(f"{directory}: required files {missing} missing from the manifest")
    else:
        manifest = verify_checkpoint_dir(directory, required=(CONFIG, WEIGHTS, NORM_STATS))
    try:
        meta = json.loads((directory / CONFIG).read_text())
        if meta.get("format") != CONFIG_FORMAT:
            raise ValueError(f"config format {meta.get('format')!r}, expected {CONFIG_FORMAT}")
        cfg = config_from_dict(meta["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{directory}/{CONFIG}: invalid ({e})") from None
    if expect is not None:
        check_expected(cfg, expect)
    try:
        stats = NormStats.load(directory / NORM_STATS)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{directory}/{NORM_STATS}: invalid ({e})") from None
    tokenizer = None
    if isinstance(cfg, Pi05Config):
        if TOKENIZER not in manifest["files"]:
            raise CheckpointError(f"{directory}: pi05 checkpoint without {TOKENIZER}")
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER))
        except Exception as e:
            raise CheckpointError(f"{directory}/{TOKENIZER}: unreadable ({e})") from None
    try:
        with torch.device(device):
            policy = build_policy(cfg, stats, tokenizer)
    except ValueError as e:
        raise CheckpointError(f"{directory}: config and tokenizer/stats disagree ({e})") from None
    tensors = {k: v.to(device) for k, v in read_safetensors(directory / WEIGHTS).items()}
    load_state_checked(policy, tensors, f"{directory}/{WEIGHTS}")
    policy.version = manifest["version"]
    policy.manifest = manifest
    if dtype is not None:
        policy = policy.to(dtype)
    return policy.eval()

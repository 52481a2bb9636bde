"""Import published pi0.5 weights (PyTorch layouts) into Pi05Model.

Layouts (key facts from openpi's PyTorch conversion and LeRobot's `pi05` policy):
  openpi   `model.safetensors`: `paligemma_with_expert.paligemma.model.{vision_tower.vision_model,
           multi_modal_projector,language_model}...`, `paligemma_with_expert.paligemma.lm_head.weight` (tied to
           embed_tokens; may be the only copy), `paligemma_with_expert.gemma_expert.model.layers.N...` with
           adaRMS norms as `{input,post_attention}_layernorm.dense`, `gemma_expert.model.norm.dense`,
           `gemma_expert.lm_head.weight` (unused), and top-level `action_in_proj`, `action_out_proj`,
           `time_mlp_in`, `time_mlp_out` (older files: `action_time_mlp_*`).
  lerobot  the same keys nested under `model.`.
Older transformers nest as `paligemma.language_model.model.` / `paligemma.vision_tower.`; both are accepted.
Our Pi05Model keys mirror openpi's without `paligemma_with_expert.` and with transformers 5's flat
`vision_tower.` (no `vision_model.`). Only safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from qvgm.checkpoints import CheckpointError
from qvgm.policy.checkpoint_io import load_state_checked, read_safetensors
from qvgm.policy.processor import NormStats

TOP_LEVEL = ("action_in_proj.", "action_out_proj.", "time_mlp_in.", "time_mlp_out.")
EMBED = "paligemma.model.language_model.embed_tokens.weight"
TIED = "lm_head (tied to embed_tokens)"


@dataclass
class ImportReport:
    """What the mapping did. ignored: (source key, reason) for known keys pi0.5 inference does not use;
    unknown: source keys with no place in the model; missing: model keys the file does not provide."""

    layout: str
    mapped: int = 0
    ignored: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"layout {self.layout}: {self.mapped} tensors mapped, {len(self.ignored)} ignored, "
                f"{len(self.unknown)} unknown {self.unknown[:8]}, {len(self.missing)} missing {self.missing[:8]}")


def detect_layout(keys: list[str]) -> str:
    """'lerobot' if keys nest under `model.paligemma_with_expert.`, 'openpi' if under `paligemma_with_expert.`."""
    if any(k.startswith("model.paligemma_with_expert.") for k in keys):
        return "lerobot"
    if any(k.startswith("paligemma_with_expert.") for k in keys):
        return "openpi"
    raise CheckpointError("not a pi0.5 PyTorch checkpoint: no key under 'paligemma_with_expert.' or "
                          f"'model.paligemma_with_expert.' (first keys: {sorted(keys)[:5]})")


def _canonical(key: str) -> tuple[str | None, str | None]:
    """Source key without the layout prefix -> (our key, None) or (None, reason it is ignored)."""
    if key.startswith("action_time_mlp_"):
        key = key.replace("action_time_mlp_", "time_mlp_", 1)
    if key.startswith(TOP_LEVEL):
        return key, None
    if key.startswith("state_proj."):
        return None, "pi0 continuous-state projection (pi0.5 puts the state in the prompt)"
    if not key.startswith("paligemma_with_expert."):
        return key, None  # reported as unknown unless it happens to match
    key = key[len("paligemma_with_expert."):]
    if key in ("gemma_expert.lm_head.weight", "gemma_expert.model.embed_tokens.weight"):
        return None, "action expert has no token embedding / LM head"
    if key in ("paligemma.lm_head.weight", "paligemma.language_model.lm_head.weight"):
        return None, TIED
    for old, new in (("paligemma.language_model.model.", "paligemma.model.language_model."),
                     ("paligemma.vision_tower.", "paligemma.model.vision_tower."),
                     ("paligemma.multi_modal_projector.", "paligemma.model.multi_modal_projector.")):
        if key.startswith(old):
            key = new + key[len(old):]
    key = key.replace("paligemma.model.vision_tower.vision_model.", "paligemma.model.vision_tower.")
    if key.startswith("paligemma.model.vision_tower.head."):
        return None, "SigLIP pooling head (PaliGemma uses all patch tokens)"
    return key, None


def map_published_state_dict(tensors: dict[str, torch.Tensor], model_keys: set[str],
                             layout: str = "auto") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Rename a published pi0.5 state dict to Pi05Model keys; returns (mapped tensors, report)."""
    if layout == "auto":
        layout = detect_layout(list(tensors))
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"layout must be 'openpi', 'lerobot' or 'auto', got {layout!r}")
    report = ImportReport(layout)
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for src, value in tensors.items():
        key = src
        if layout == "lerobot":
            if not key.startswith("model."):
                report.unknown.append(src)
                continue
            key = key[len("model."):]
        ours, reason = _canonical(key)
        if ours is None:
            report.ignored.append((src, reason or ""))
            if reason == TIED:
                lm_head = value
            continue
        if ours not in model_keys:
            report.unknown.append(src)
            continue
        if ours in out:
            raise CheckpointError(f"two source keys map to {ours} (second: {src})")
        out[ours] = value
    if EMBED not in out and lm_head is not None and EMBED in model_keys:
        out[EMBED] = lm_head  # tied weights stored once, as lm_head
    report.mapped = len(out)
    report.missing = sorted(model_keys - set(out))
    return out, report


def load_published_weights(model: torch.nn.Module, source: str | Path | dict[str, torch.Tensor],
                           layout: str = "auto") -> ImportReport:
    """Load an openpi / LeRobot pi0.5 `model.safetensors` (path or tensors) into a Pi05Model.

    Unknown or missing keys, wrong shapes and NaN/inf raise CheckpointError naming them; weights are cast to
    the model's dtype. Returns the ImportReport (ignored keys listed with reasons).
    """
    name = str(source) if not isinstance(source, dict) else "<tensors>"
    tensors = read_safetensors(Path(source)) if not isinstance(source, dict) else source
    model_keys = set(model.state_dict())
    mapped, report = map_published_state_dict(tensors, model_keys, layout)
    if report.unknown or report.missing:
        raise CheckpointError(f"{name}: cannot import pi0.5 weights: {report.describe()}")
    load_state_checked(model, mapped, name)
    return report


def import_published_checkpoint(weights: str | Path, tokenizer_json: str | Path, norm_stats: NormStats,
                                out_dir: str | Path, version: str, config: str = "pi05",
                                layout: str = "auto", dtype: torch.dtype | None = None,
                                device: str | torch.device = "cpu", **overrides: Any) -> ImportReport:
    """Convert a published pi0.5 `model.safetensors` (openpi or LeRobot layout) plus a HF `tokenizer.json`
    (e.g. PaliGemma's) and quantile stats into our checkpoint directory `out_dir` (atomic, with manifest).

    `config` names the architecture (`pi05` for the published model) and `overrides` set the robot profile
    (camera_names, state_dim, real_action_dim, horizon, ...). `dtype` (e.g. torch.bfloat16) is the stored
    dtype. Mismatching keys or shapes -> CheckpointError; nothing is written then.
    """
    from qvgm.policy.checkpoint_io import build_policy, save_policy
    from qvgm.policy.config import get_config

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_json))
    except Exception as e:
        raise CheckpointError(f"{tokenizer_json}: unreadable tokenizer ({e})") from None
    cfg = get_config(config, **overrides)
    with torch.device(device):
        policy = build_policy(cfg, norm_stats, tokenizer)
    report = load_published_weights(policy.model, weights, layout)
    if dtype is not None:
        policy = policy.to(dtype)
    save_policy(policy, out_dir, version=version, parent=None,
                summary={"imported_from": str(weights), "layout": report.layout, "ignored_keys": len(report.ignored),
                         "config": config})
    return report

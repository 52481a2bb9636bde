"""On-disk cache of critic features, memory-mapped, keyed by the frozen encoder's checkpoint hash.

Layout of a cache directory:
    meta.json      {"format": 1, "key": <checkpoint sha256 or any id>, "num_rows": T,
                    "fields": {name: {"file": "<name>.npy", "shape": [...], "dtype": "float32", "sha256": ...}}}
    <name>.npy     one array per field (e.g. "z_rl" [T, F], "proprio" [T, P]), rows = buffer frames.
Arrays are plain .npy (no pickle: np.load(..., allow_pickle=False, mmap_mode="r")). The cache is written into a
temporary directory and moved into place, so a crash never leaves a half-written cache under the real name.
A different key (new encoder) makes the cache stale; a changed file makes it corrupt; `load_or_build` rebuilds
in both cases.

`critic_state_features` chooses WHAT the critic reads as z (the "RL token vs pooled features" ablation of
METHOD.md §5): "rl-token" is the policy's own critic features (pi05: the trained RL token z_rl; `state`: the
encoder embedding); "pooled" is a representation without the learned token (pi05: the mean of the VLM's
final-layer prefix embeddings over valid tokens; `state`: the raw encoder input, normalised proprio +
standardised privileged object state). The pipeline puts the resolved kind into the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

FORMAT = 1
CriticFeatures = Literal["rl-token", "pooled"]
CRITIC_FEATURES: tuple[str, ...] = ("rl-token", "pooled")


def resolve_critic_features(policy: Any, kind: str) -> str:
    """The feature kind actually used for `policy`: "rl-token", "pooled", or "pooled (no RL token)" for a pi05
    checkpoint without a trained RL token asked for "rl-token" (its critic_features fall back to pooling)."""
    if kind not in CRITIC_FEATURES:
        raise ValueError(f"unknown critic features {kind!r} (rl-token / pooled)")
    if kind == "rl-token" and hasattr(policy, "rl_token") and policy.rl_token is None:
        return "pooled (no RL token)"
    return kind


def critic_state_features(policy: Any, context: Any, inputs: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """Critic state features z [B, F] (float32) of one encoded batch.

    policy: a FlowPolicy; context = policy.encode(inputs); kind: "rl-token" (policy.critic_features) or "pooled"
    (pi05: masked mean of context.prefix_out [B, P, width] -> [B, width]; `state`: [normalised state [B, d] ||
    privileged [B, k], standardised when the policy has privileged stats] -> [B, d + k]).
    """
    resolve_critic_features(policy, kind)
    if kind == "rl-token":
        return policy.critic_features(context).float()
    if hasattr(context, "prefix_out"):  # pi05: mean-pooled final-layer prefix embeddings
        m = context.prefix_mask.to(context.prefix_out.dtype)[..., None]
        return ((context.prefix_out * m).sum(1) / m.sum(1).clamp_min(1.0)).float()
    if "state" not in inputs:
        raise ValueError("pooled critic features need inputs['state'] for a policy without a VLM prefix")
    parts = [inputs["state"].float()]
    if "privileged" in inputs and int(getattr(getattr(policy, "config", None), "privileged_dim", 0) or 0):
        priv = inputs["privileged"].float()
        if hasattr(policy, "priv_mean"):
            priv = (priv - policy.priv_mean.float()) / policy.priv_std.float()
        parts.append(priv)
    return torch.cat(parts, dim=-1)


class FeatureCacheError(ValueError):
    """The cache is missing, stale (other key) or corrupt; the message says which."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Read-only view of a cache directory: `cache["z_rl"]` is a memory-mapped array [T, ...]."""

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.key: str = meta["key"]
        self.num_rows: int = int(meta["num_rows"])
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def fields(self) -> list[str]:
        return sorted(self.meta["fields"])

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.meta["fields"]:
            raise KeyError(f"feature cache {self.path} has no field {name!r} (has {self.fields})")
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / self.meta["fields"][name]["file"], mmap_mode="r",
                                         allow_pickle=False)
        return self._arrays[name]

    @staticmethod
    def write(path: str | Path, key: str, arrays: Mapping[str, np.ndarray]) -> FeatureCache:
        """Write arrays (same first dimension, finite numeric) atomically under `path`; returns the opened cache."""
        path = Path(path)
        if not arrays:
            raise FeatureCacheError("nothing to cache")
        rows = {name: np.asarray(a).shape[0] if np.asarray(a).ndim else -1 for name, a in arrays.items()}
        if len(set(rows.values())) != 1 or -1 in rows.values():
            raise FeatureCacheError(f"fields must share their first dimension, got {rows}")
        for name, a in arrays.items():
            a = np.asarray(a)
            if not name.isidentifier():
                raise FeatureCacheError(f"field name {name!r} is not a plain identifier")
            if a.dtype.kind not in "fiub" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
                raise FeatureCacheError(f"field {name!r}: need finite numeric values, got dtype {a.dtype}")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fields = {}
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            f = tmp / f"{name}.npy"
            np.save(f, a, allow_pickle=False)
            fields[name] = {"file": f.name, "shape": list(a.shape), "dtype": a.dtype.str, "sha256": _sha256(f)}
        meta = {"format": FORMAT, "key": key, "num_rows": next(iter(rows.values())), "fields": fields}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        return FeatureCache.open(path, key, verify=False)

    @staticmethod
    def open(path: str | Path, key: str, verify: bool = True) -> FeatureCache:
        """Open a cache written for `key`; verify=True re-hashes every file. Raises FeatureCacheError."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError as e:
            raise FeatureCacheError(f"no feature cache at {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeatureCacheError(f"corrupt feature cache {path}: unreadable meta.json ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("fields"), dict):
            raise FeatureCacheError(f"corrupt feature cache {path}: unknown format")
        if meta.get("key") != key:
            raise FeatureCacheError(f"stale feature cache {path}: built for {meta.get('key')!r}, need {key!r}")
        cache = FeatureCache(path, meta)
        for name, info in meta["fields"].items():
            f = path / info["file"]
            if not f.is_file() or f.parent != path:
                raise FeatureCacheError(f"corrupt feature cache {path}: missing {info['file']}")
            if verify and _sha256(f) != info["sha256"]:
                raise FeatureCacheError(f"corrupt feature cache {path}: {info['file']} fails its sha256")
            try:
                a = cache[name]
            except ValueError as e:
                raise FeatureCacheError(f"corrupt feature cache {path}: {info['file']} unreadable ({e})") from e
            if list(a.shape) != info["shape"] or a.dtype.str != info["dtype"] or a.shape[0] != cache.num_rows:
                raise FeatureCacheError(f"corrupt feature cache {path}: {info['file']} has shape {a.shape}")
        return cache

    @staticmethod
    def load_or_build(path: str | Path, key: str, build: Callable[[], Mapping[str, np.ndarray]],
                      verify: bool = True) -> tuple[FeatureCache, str | None]:
        """Open the cache, or (missing / stale / corrupt) call build() and write it.

        Returns (cache, reason it was rebuilt or None).
        """
        try:
            return FeatureCache.open(path, key, verify=verify), None
        except FeatureCacheError as e:
            reason = str(e)
        return FeatureCache.write(path, key, build()), reason

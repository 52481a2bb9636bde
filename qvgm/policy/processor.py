"""Observation -> model inputs: images, quantile normalisation, pi0.5 prompt and tokeniser.

Images: uint8 [H, W, 3] RGB per camera, resized with padding (aspect kept, black bars) to the model size and
scaled to [-1, 1]; a missing camera gives a masked all -1 image. State and actions are normalised per dim with
quantile stats: x_n = 2 * (x - q01) / (q99 - q01) - 1 (q01 -> -1, q99 -> +1). Actions are padded with zeros to
the model's `action_dim`; only the first `real_action_dim` are real.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

PAD, UNK = "[PAD]", "[UNK]"
STATE_BINS = 256
_EPS = 1e-6


class ObservationError(ValueError):
    """An observation the policy cannot use (names the offending camera / field)."""


@dataclass
class NormStats:
    """Per-dim 1%/99% quantiles. state_*: [state_dim], action_*: [real_action_dim] (robot units).

    privileged_*: [k], optional (None = absent): the sim's object state (m, rotation entries) for a pi05 told it
    (Pi05Config.privileged_dim), normalised like the state so every value spans [-1, 1]."""

    state_q01: np.ndarray
    state_q99: np.ndarray
    action_q01: np.ndarray
    action_q99: np.ndarray
    privileged_q01: np.ndarray | None = None
    privileged_q99: np.ndarray | None = None

    @classmethod
    def compute(cls, states: np.ndarray, actions: np.ndarray) -> NormStats:
        """states [N, ds], actions [N, da] (or [N, H, da]) in robot units -> 1%/99% quantiles per dim."""
        s = np.asarray(states, dtype=np.float64).reshape(-1, np.shape(states)[-1])
        a = np.asarray(actions, dtype=np.float64).reshape(-1, np.shape(actions)[-1])
        if not (np.isfinite(s).all() and np.isfinite(a).all()):
            raise ValueError("norm stats: states/actions contain NaN or inf")
        return cls(np.quantile(s, 0.01, axis=0), np.quantile(s, 0.99, axis=0),
                   np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0))

    def with_privileged(self, privileged: np.ndarray) -> NormStats:
        """A copy that also holds the 1%/99% quantiles of `privileged` [N, k] (finite)."""
        p = np.asarray(privileged, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] < 1 or not np.isfinite(p).all():
            raise ValueError(f"norm stats: privileged state must be finite [N, k], N >= 1; got shape {p.shape}")
        return dataclasses.replace(self, privileged_q01=np.quantile(p, 0.01, axis=0),
                                   privileged_q99=np.quantile(p, 0.99, axis=0))

    @classmethod
    def identity(cls, state_dim: int, action_dim: int) -> NormStats:
        """Stats that map [-1, 1] to itself (for tests and untrained models)."""
        return cls(-np.ones(state_dim), np.ones(state_dim), -np.ones(action_dim), np.ones(action_dim))

    def to_json(self) -> dict[str, Any]:
        out = {"format": "quantile", "state": {"q01": self.state_q01.tolist(), "q99": self.state_q99.tolist()},
               "action": {"q01": self.action_q01.tolist(), "q99": self.action_q99.tolist()}}
        if self.privileged_q01 is not None and self.privileged_q99 is not None:
            out["privileged"] = {"q01": self.privileged_q01.tolist(), "q99": self.privileged_q99.tolist()}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NormStats:
        try:
            arrs = [np.asarray(d[k][q], dtype=np.float64) for k in ("state", "action") for q in ("q01", "q99")]
        except (KeyError, TypeError) as e:
            raise ValueError(f"norm_stats.json: missing field {e}") from None
        if not all(np.isfinite(a).all() and a.ndim == 1 for a in arrs):
            raise ValueError("norm_stats.json: quantiles must be finite 1-D lists")
        if arrs[0].shape != arrs[1].shape or arrs[2].shape != arrs[3].shape:
            raise ValueError("norm_stats.json: q01/q99 lengths differ")
        if "privileged" not in d:
            return cls(*arrs)
        try:
            pq = [np.asarray(d["privileged"][q], dtype=np.float64) for q in ("q01", "q99")]
        except (KeyError, TypeError) as e:
            raise ValueError(f"norm_stats.json: privileged: missing field {e}") from None
        if not all(np.isfinite(a).all() and a.ndim == 1 for a in pq) or pq[0].shape != pq[1].shape:
            raise ValueError("norm_stats.json: privileged quantiles must be finite 1-D lists of equal length")
        return cls(*arrs, *pq)

    @classmethod
    def from_openpi(cls, d: dict[str, Any], state_dim: int, action_dim: int) -> NormStats:
        """openpi / LeRobot-converted `norm_stats.json` ({"norm_stats": {"state": {"q01", "q99", ...},
        "actions": {...}}}, padded to the model width) -> stats for the first state_dim / action_dim dims."""
        try:
            ns = d.get("norm_stats", d)
            s, a = ns["state"], ns["actions"]
            arrs = [np.asarray(x[q], dtype=np.float64) for x in (s, a) for q in ("q01", "q99")]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"openpi norm stats: missing field {e} (quantile stats are required)") from None
        if arrs[0].shape[0] < state_dim or arrs[2].shape[0] < action_dim:
            raise ValueError(f"openpi norm stats have {arrs[0].shape[0]} state / {arrs[2].shape[0]} action dims, "
                             f"need {state_dim} / {action_dim}")
        out = cls(arrs[0][:state_dim], arrs[1][:state_dim], arrs[2][:action_dim], arrs[3][:action_dim])
        return cls.from_json(out.to_json())  # validates finiteness

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: Path) -> NormStats:
        return cls.from_json(json.loads(Path(path).read_text()))


def normalize(x: np.ndarray, q01: np.ndarray, q99: np.ndarray) -> np.ndarray:
    """Robot units -> normalised: q01 -> -1, q99 -> +1 (not clipped)."""
    return 2.0 * (x - q01) / np.maximum(q99 - q01, _EPS) - 1.0


def unnormalize(x: np.ndarray, q01: np.ndarray, q99: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`."""
    return (x + 1.0) / 2.0 * np.maximum(q99 - q01, _EPS) + q01


def clean_task(text: str) -> str:
    """Lower-case, '_' and newlines to spaces, collapse whitespace, drop a trailing period."""
    text = re.sub(r"\s+", " ", text.replace("_", " ").replace("\n", " ")).strip().lower()
    return text.rstrip(".")


def discretize_state(state_norm: np.ndarray) -> np.ndarray:
    """Normalised state (clipped to [-1, 1]) -> int bins 0..255 (256 equal bins over [-1, 1])."""
    edges = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return np.digitize(np.clip(state_norm, -1.0, 1.0), edges) - 1


def pi05_prompt(task: str, state_norm: np.ndarray) -> str:
    """pi0.5 prompt: 'Task: <task>, State: <256-bin ints>;\\nAction: '."""
    bins = " ".join(str(int(b)) for b in discretize_state(state_norm))
    return f"Task: {clean_task(task)}, State: {bins};\nAction: "


def build_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokeniser over the prompt template, the 256 state bins and the words in `texts`.

    Lower-cased, split on whitespace and punctuation; id 0 is [PAD], 1 is [UNK]. Built locally, no downloads.
    """
    base = [PAD, UNK, "task", ":", ",", "state", ";", "action", "."] + [str(i) for i in range(STATE_BINS)]
    pre = pre_tokenizers.Whitespace()
    words: list[str] = []
    for text in texts:
        words += [w for w, _ in pre.pre_tokenize_str(clean_task(text))]
    vocab: dict[str, int] = {}
    for w in base + sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    return tok


class Processor:
    """Turns observation dicts into tensors for a backbone (see module docstring for units).

    Output of `__call__`: images float32 [B, n_cam, 3, S, S] in [-1, 1], image_masks bool [B, n_cam],
    tokens int64 [B, L], token_mask bool [B, L], state float32 [B, state_dim] normalised,
    privileged float32 [B, k] (only when `privileged_dim` > 0): normalised when the norm stats hold privileged
    quantiles (a pi05 told the object state), else in sim units as observed (the `state` backbone standardises it).
    """

    def __init__(self, *, camera_names: list[str], image_size: int, state_dim: int, real_action_dim: int,
                 action_dim: int, norm_stats: NormStats, tokenizer: Tokenizer | None = None,
                 max_token_len: int = 0, privileged_dim: int = 0) -> None:
        if real_action_dim > action_dim:
            raise ValueError(f"real_action_dim {real_action_dim} > model action_dim {action_dim}")
        if norm_stats.state_q01.shape != (state_dim,):
            raise ValueError(f"norm stats have {norm_stats.state_q01.shape[0]} state dims, config {state_dim}")
        if norm_stats.action_q01.shape != (real_action_dim,):
            raise ValueError(
                f"norm stats have {norm_stats.action_q01.shape[0]} action dims, config {real_action_dim}")
        self.camera_names = list(camera_names)
        self.image_size = image_size
        self.state_dim = state_dim
        self.real_action_dim = real_action_dim
        self.action_dim = action_dim
        if norm_stats.privileged_q01 is not None and norm_stats.privileged_q01.shape != (privileged_dim,):
            raise ValueError(f"norm stats have {norm_stats.privileged_q01.shape[0]} privileged dims, "
                             f"config {privileged_dim}")
        self.norm_stats = norm_stats
        self.tokenizer = tokenizer
        self.max_token_len = max_token_len
        self.privileged_dim = privileged_dim

    # --- images -------------------------------------------------------------------------------------------
    def image_to_tensor(self, cam: str, img: Any) -> torch.Tensor:
        """uint8 [H, W, 3] RGB -> float32 [3, S, S] in [-1, 1], resized with padding. Errors name the camera."""
        if isinstance(img, (bytes, bytearray, memoryview)):
            raise ObservationError(f"camera {cam!r}: got encoded bytes; expected a decoded uint8 [H, W, 3] RGB array")
        if not isinstance(img, np.ndarray):
            raise ObservationError(f"camera {cam!r}: expected a numpy uint8 array, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise ObservationError(f"camera {cam!r}: dtype {img.dtype}, expected uint8 RGB (0..255)")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ObservationError(f"camera {cam!r}: shape {img.shape}, expected [H, W, 3] RGB (3 channels)")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ObservationError(f"camera {cam!r}: empty image {img.shape}")
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0  # [3, H, W] in [0, 1]
        return resize_with_pad(x, self.image_size) * 2.0 - 1.0

    # --- state / actions ----------------------------------------------------------------------------------
    def normalize_state(self, state: Any) -> np.ndarray:
        """float[state_dim] robot units -> normalised float64 [state_dim]; wrong length or NaN/inf -> error."""
        s = np.asarray(state, dtype=np.float64)
        if s.ndim != 1 or s.shape[0] != self.state_dim:
            raise ObservationError(f"state: shape {s.shape}, expected [{self.state_dim}]")
        if not np.isfinite(s).all():
            raise ObservationError(f"state: contains NaN/inf at dims {np.flatnonzero(~np.isfinite(s)).tolist()}")
        return normalize(s, self.norm_stats.state_q01, self.norm_stats.state_q99)

    def normalize_actions(self, actions: np.ndarray) -> torch.Tensor:
        """Robot units [..., H, real_action_dim] -> normalised float32 [..., H, action_dim] (zero padded)."""
        a = np.asarray(actions, dtype=np.float64)
        if a.shape[-1] != self.real_action_dim:
            raise ValueError(f"actions: last dim {a.shape[-1]}, expected {self.real_action_dim}")
        if not np.isfinite(a).all():
            raise ValueError("actions: contain NaN/inf")
        n = normalize(a, self.norm_stats.action_q01, self.norm_stats.action_q99)
        pad = np.zeros((*n.shape[:-1], self.action_dim - self.real_action_dim))
        return torch.from_numpy(np.concatenate([n, pad], axis=-1)).float()

    def unnormalize_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Normalised [B, H, action_dim] -> robot units float64 [B, H, real_action_dim]."""
        a = actions.detach().to("cpu", torch.float64).numpy()[..., : self.real_action_dim]
        return unnormalize(a, self.norm_stats.action_q01, self.norm_stats.action_q99)

    # --- prompt -------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Prompt -> (ids int64 [L], mask bool [L]) padded to max_token_len; too long -> truncated + warning."""
        assert self.tokenizer is not None
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.max_token_len:
            warnings.warn(f"prompt has {len(ids)} tokens, truncated to the budget of {self.max_token_len}",
                          stacklevel=3)
            ids = ids[: self.max_token_len]
        out = np.zeros(self.max_token_len, dtype=np.int64)
        out[: len(ids)] = ids
        mask = np.zeros(self.max_token_len, dtype=bool)
        mask[: len(ids)] = True
        return out, mask

    def __call__(self, observations: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not observations:
            raise ObservationError("empty observation batch")
        imgs, img_masks, toks, tok_masks, states, priv = [], [], [], [], [], []
        for obs in observations:
            if not isinstance(obs, dict):
                raise ObservationError(f"observation must be a dict, got {type(obs).__name__}")
            if "state" not in obs:
                raise ObservationError("observation has no 'state'")
            s = self.normalize_state(obs["state"])
            states.append(s)
            if self.privileged_dim:
                p = np.asarray(obs.get("privileged", np.full(self.privileged_dim, np.nan)), dtype=np.float64)
                if p.shape != (self.privileged_dim,) or not np.isfinite(p).all():
                    why = (" (this pi05 checkpoint was trained told the sim's object state, Pi05Config.privileged_dim,"
                           " a diagnostic: it cannot run without it)" if self.tokenizer is not None else "")
                    raise ObservationError(
                        f"privileged: expected finite float[{self.privileged_dim}], got shape {p.shape}{why}")
                ns = self.norm_stats
                if ns.privileged_q01 is not None and ns.privileged_q99 is not None:
                    p = normalize(p, ns.privileged_q01, ns.privileged_q99)
                priv.append(p)
            if self.camera_names:
                images = obs.get("images") or {}
                if not isinstance(images, dict):
                    raise ObservationError(f"'images' must be a dict camera -> array, got {type(images).__name__}")
                row, mrow = [], []
                for cam in self.camera_names:
                    if images.get(cam) is None:
                        row.append(-torch.ones(3, self.image_size, self.image_size))
                        mrow.append(False)
                    else:
                        row.append(self.image_to_tensor(cam, images[cam]))
                        mrow.append(True)
                imgs.append(torch.stack(row))
                img_masks.append(mrow)
            if self.tokenizer is not None:
                prompt = obs.get("prompt", "")
                if not isinstance(prompt, str):
                    raise ObservationError(f"prompt must be a str, got {type(prompt).__name__}")
                # a pi05 with privileged_dim (sim diagnostic) is told the object state as extra state bins
                told = np.concatenate([s, np.clip(priv[-1], -1.0, 1.0)]) if self.privileged_dim else s
                ids, m = self.tokenize(pi05_prompt(prompt, told))
                toks.append(ids)
                tok_masks.append(m)
        out: dict[str, torch.Tensor] = {"state": torch.tensor(np.stack(states), dtype=torch.float32)}
        if self.camera_names:
            out["images"] = torch.stack(imgs)
            out["image_masks"] = torch.tensor(img_masks, dtype=torch.bool)
        if self.tokenizer is not None:
            out["tokens"] = torch.from_numpy(np.stack(toks))
            out["token_mask"] = torch.from_numpy(np.stack(tok_masks))
        if self.privileged_dim:
            out["privileged"] = torch.tensor(np.stack(priv), dtype=torch.float32)
        return out


def resize_with_pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] float in [0, 1] -> [3, size, size]: bilinear resize keeping aspect, centred, zero (black) pad."""
    _, h, w = x.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    out = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = x.clamp(0.0, 1.0)
    return out

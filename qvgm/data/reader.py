"""Replay buffer reader for the trainer: transitions, chunk windows, Monte-Carlo returns, filters.

Reads only committed episodes (rows of meta/episodes); a concurrent writer's staging/orphan files are ignored.
Frame i of an episode holds o_i, the executed action a_i, r_i = next.reward (after a_i), d_i = next.done
(o_{i+1} terminal). A chunk window at frame i with n steps:
    actions a_i..a_{i+n-1}, rewards r_i..r_{i+n-1}, R = sum_j gamma^j r_{i+j},
    next observation o_{i+n}, done = any(d_i..d_{i+n-1}), discount = gamma^n_valid * (1 - done),
so the chunk TD target is R + discount * Q(o_{i+n}, A'). Windows that would run past the end of an episode
without a done inside are not valid starts (there is no o_{i+n} to bootstrap from); windows that reach a done
are valid and padded after it (`action_is_pad`, zero rewards). Returns-to-go per episode:
G_i = r_i + gamma * G_{i+1}, G_{L-1} = r_{L-1} (the episode end counts as terminal for the MC return).
Images decode to uint8 [H, W, 3] (lossy codec: equal in shape, close in PSNR, not bit-equal).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from qvgm.data import layout as L
from qvgm.data.buffer import read_episode_rows
from qvgm.data.video import DecoderCache


def returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted Monte-Carlo return from every step of one episode, float64 [L] (no bootstrap at the end)."""
    out = np.zeros(len(rewards), dtype=np.float64)
    acc = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        acc = float(rewards[i]) + gamma * acc
        out[i] = acc
    return out


class ReplayReader:
    """Random access over a committed snapshot of the buffer.

    Filters (all optional): `policy_versions` keeps frames whose action came from one of these versions;
    `success` keeps episodes with that label (None = any, unlabeled included); `intervention` is None (any),
    "exclude" (drop human-driven frames) or "only"; discarded episodes are dropped unless include_discarded.
    A window start must pass the frame filters; the frames inside the window are whatever was executed.
    """

    def __init__(self, root: str | Path, gamma: float = 0.99, policy_versions: Iterable[str] | None = None,
                 success: bool | None = None, intervention: str | None = None, include_discarded: bool = False,
                 decode_images: bool = True, decoder_cache: int = 8) -> None:
        if intervention not in (None, "exclude", "only"):
            raise ValueError(f"intervention filter must be None, 'exclude' or 'only', got {intervention!r}")
        self.root = Path(root)
        try:
            with open(self.root / L.INFO_PATH) as f:
                self.info = json.load(f)
        except (OSError, ValueError) as exc:
            raise L.DatasetError(f"{self.root / L.INFO_PATH}: unreadable ({exc})") from exc
        if self.info.get("codebase_version") != L.CODEBASE_VERSION:
            raise L.DatasetError(f"{self.root}: codebase_version {self.info.get('codebase_version')!r} != v3.0")
        self.fps = int(self.info["fps"])
        self.gamma = float(gamma)
        self.decode_images = decode_images
        self.episodes = read_episode_rows(self.root)
        self.tasks = L.read_tasks(self.root)
        self.video_keys = [k for k, f in self.info["features"].items() if f["dtype"] == "video"]
        self._decoders = DecoderCache(decoder_cache)
        self._load_frames()
        keep_ep = np.ones(len(self.episodes), dtype=bool)
        for e, row in enumerate(self.episodes):
            if row.get("discarded") and not include_discarded:
                keep_ep[e] = False
            if success is not None and row.get("success") is not bool(success):
                keep_ep[e] = False
        mask = keep_ep[self.episode_index] if len(self.episode_index) else np.zeros(0, bool)
        if policy_versions is not None:
            mask &= np.isin(self.policy_version, np.asarray(list(policy_versions), dtype=object))
        if intervention == "exclude":
            mask &= ~self.is_intervention
        elif intervention == "only":
            mask &= self.is_intervention
        self.frame_mask = mask
        self.episode_mask = keep_ep
        self._starts_cache: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ loading
    def _load_frames(self) -> None:
        cols: dict[str, list[np.ndarray]] = {}
        names = ["observation.state", "action", "observation.stamp", "next.reward", "next.done",
                 "complementary_info.is_intervention", "complementary_info.policy_version", "timestamp",
                 "frame_index", "episode_index", "index", "task_index"]
        for row in self.episodes:
            path = self.root / self.info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                             file_index=row["data/file_index"])
            t = pq.read_table(path, columns=names)
            t = t.filter(np.asarray(t.column("episode_index").to_numpy()) == row["episode_index"])
            if t.num_rows != row["length"]:
                raise L.DatasetError(f"{path}: episode {row['episode_index']} has {t.num_rows} frames, "
                                     f"meta says {row['length']}")
            for n in names:
                col = t.column(n).combine_chunks()
                if n in ("observation.state", "action"):
                    arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
                elif n == "complementary_info.policy_version":
                    arr = np.asarray(col.to_pylist(), dtype=object)
                else:
                    arr = col.to_numpy(zero_copy_only=False)
                cols.setdefault(n, []).append(arr)

        def cat(n: str, dtype: Any, shape: tuple[int, ...] = (0,)) -> np.ndarray:
            return np.concatenate(cols[n]).astype(dtype, copy=False) if n in cols else np.zeros(shape, dtype)

        sdim = self.info["features"]["observation.state"]["shape"][0]
        adim = self.info["features"]["action"]["shape"][0]
        self.state = cat("observation.state", np.float32, (0, sdim))
        self.action = cat("action", np.float32, (0, adim))
        self.stamp = cat("observation.stamp", np.float64)
        self.reward = cat("next.reward", np.float32)
        self.done = cat("next.done", bool)
        self.is_intervention = cat("complementary_info.is_intervention", bool)
        self.policy_version = cat("complementary_info.policy_version", object)
        self.frame_index = cat("frame_index", np.int64)
        self.episode_index = cat("episode_index", np.int64)
        self.index = cat("index", np.int64)
        self.task_index = cat("task_index", np.int64)
        if not np.array_equal(self.index, np.arange(len(self.index))):
            raise L.DatasetError(f"{self.root}: global `index` column is not 0..N-1 in episode order")
        self.ep_start = np.array([r["dataset_from_index"] for r in self.episodes], dtype=np.int64)
        self.ep_end = np.array([r["dataset_to_index"] for r in self.episodes], dtype=np.int64)
        self.rtg = np.zeros(len(self.reward), dtype=np.float64)
        for s, e in zip(self.ep_start, self.ep_end, strict=True):
            self.rtg[s:e] = returns_to_go(self.reward[s:e], self.gamma)

    # ------------------------------------------------------------------ basic access
    def __len__(self) -> int:
        return int(self.frame_mask.sum())

    @property
    def num_frames(self) -> int:
        return len(self.index)

    def episode_returns_to_go(self, episode_index: int) -> np.ndarray:
        """float64 [L] discounted returns-to-go of one episode (gamma from the constructor)."""
        return self.rtg[self.ep_start[episode_index]:self.ep_end[episode_index]].copy()

    def images(self, global_indices: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
        """{global index: {camera: uint8 [H, W, 3]}} decoded from the episode mp4s (grouped for cheap seeks)."""
        out: dict[int, dict[str, np.ndarray]] = {}
        by_ep: dict[int, list[int]] = {}
        for g in global_indices:
            by_ep.setdefault(int(self.episode_index[g]), []).append(int(g))
        for ep, gs in by_ep.items():
            row = self.episodes[ep]
            local = [g - int(self.ep_start[ep]) for g in gs]
            for key in self.video_keys:
                path = self.root / self.info["video_path"].format(
                    video_key=key, chunk_index=row[f"videos/{key}/chunk_index"],
                    file_index=row[f"videos/{key}/file_index"])
                frames = self._decoders.get(path, self.fps).get(local, row[f"videos/{key}/from_timestamp"])
                for g, li in zip(gs, local, strict=True):
                    out.setdefault(g, {})[key[len(L.IMAGE_PREFIX):]] = frames[li]
        return out

    def observation(self, g: int, images: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """The interface Observation dict of frame g: images, state float32[d], prompt, stamp (s)."""
        g = int(g)
        if images is None and self.decode_images and self.video_keys:
            images = self.images([g])[g]
        return {"images": images or {}, "state": self.state[g].copy(), "prompt": self.tasks[self.task_index[g]],
                "stamp": float(self.stamp[g])}

    def transition(self, g: int) -> dict[str, Any]:
        """One-step transition at global frame g (a chunk window with n = 1)."""
        return self.chunk_window(g, 1)

    # ------------------------------------------------------------------ chunk windows
    def window_starts(self, n: int) -> np.ndarray:
        """Global indices i passing the filters where an n-step window is valid (see module doc); cached per n."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n not in self._starts_cache:
            idx = np.arange(self.num_frames)
            end = self.ep_end[self.episode_index] if self.num_frames else idx  # exclusive episode end per frame
            dpos = np.nonzero(self.done)[0]  # global positions of done frames
            next_done = np.full(self.num_frames, np.iinfo(np.int64).max)  # first done at or after each frame
            if len(dpos):
                k = np.searchsorted(dpos, idx)
                has = k < len(dpos)
                next_done[has] = dpos[k[has]]
            ok = (idx + n <= end - 1) | (next_done < np.minimum(idx + n, end))
            self._starts_cache[n] = np.nonzero(ok & self.frame_mask)[0]
        return self._starts_cache[n]

    def chunk_window(self, g: int, n: int, with_images: bool | None = None) -> dict[str, Any]:
        """Chunk window at global frame g: obs, actions float32[n, d], action_is_pad bool[n], rewards
        float32[n], n_step_return, discount (gamma^n_valid * (1 - done)), done, next_obs, return_to_go,
        is_intervention bool[n], policy_version (of the first action), episode_index, frame_index."""
        g = int(g)
        ep = int(self.episode_index[g])
        e = int(self.ep_end[ep])
        stop = min(g + n, e)
        d = self.done[g:stop]
        n_valid = int(np.argmax(d)) + 1 if d.any() else stop - g
        done = bool(d.any())
        if not done and g + n > e - 1:
            raise IndexError(f"frame {g}: a {n}-step window runs past the end of episode {ep} without a done")
        idx = np.arange(g, g + n_valid)
        pad = n - n_valid
        actions = np.concatenate([self.action[idx], np.repeat(self.action[idx[-1:]], pad, axis=0)])
        rewards = np.concatenate([self.reward[idx], np.zeros(pad, np.float32)])
        ret = float(np.sum(self.reward[idx].astype(np.float64) * self.gamma ** np.arange(n_valid)))
        nxt = g + n_valid if not done else min(g + n_valid, e - 1)
        want_img = self.decode_images if with_images is None else with_images
        imgs = self.images([g, nxt]) if (want_img and self.video_keys) else {}
        return {
            "obs": self.observation(g, imgs.get(g, {}) if want_img else {}),
            "actions": actions.astype(np.float32),
            "action_is_pad": np.arange(n) >= n_valid,
            "rewards": rewards,
            "n_step_return": ret,
            "done": done,
            "discount": float(self.gamma ** n_valid * (0.0 if done else 1.0)),
            "next_obs": self.observation(nxt, imgs.get(nxt, {}) if want_img else {}),
            "return_to_go": float(self.rtg[g]),
            "is_intervention": np.concatenate([self.is_intervention[idx], np.zeros(pad, bool)]),
            "policy_version": str(self.policy_version[g]),
            "episode_index": ep,
            "frame_index": int(self.frame_index[g]),
        }

    def sample_windows(self, batch: int, n: int, rng: np.random.Generator,
                       with_images: bool | None = None) -> list[dict[str, Any]]:
        """`batch` chunk windows drawn uniformly (with replacement) from the valid, filtered starts."""
        starts = self.window_starts(n)
        if len(starts) == 0:
            raise ValueError("no valid window starts under the current filters")
        return [self.chunk_window(int(i), n, with_images) for i in rng.choice(starts, size=batch)]

    def close(self) -> None:
        self._decoders.close()


def stack_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate chunk windows into arrays: actions [B, n, d], rewards [B, n], n_step_return/discount/
    return_to_go [B] float32, done [B] bool, state/next_state [B, d], images/next_images {cam: uint8 [B, H, W, 3]}
    (when decoded), prompts [B] str."""
    out: dict[str, Any] = {
        "actions": np.stack([w["actions"] for w in windows]),
        "action_is_pad": np.stack([w["action_is_pad"] for w in windows]),
        "rewards": np.stack([w["rewards"] for w in windows]),
        "is_intervention": np.stack([w["is_intervention"] for w in windows]),
        "done": np.array([w["done"] for w in windows], dtype=bool),
        "state": np.stack([w["obs"]["state"] for w in windows]),
        "next_state": np.stack([w["next_obs"]["state"] for w in windows]),
        "prompts": [w["obs"]["prompt"] for w in windows],
        "policy_version": [w["policy_version"] for w in windows],
        "episode_index": np.array([w["episode_index"] for w in windows], dtype=np.int64),
        "frame_index": np.array([w["frame_index"] for w in windows], dtype=np.int64),
    }
    for key in ("n_step_return", "discount", "return_to_go"):
        out[key] = np.array([w[key] for w in windows], dtype=np.float32)
    for src, dst in (("obs", "images"), ("next_obs", "next_images")):
        cams = windows[0][src]["images"].keys()
        out[dst] = {c: np.stack([w[src]["images"][c] for w in windows]) for c in cams}
    return out

"""`critic_trainer qvgm --watch`: keep improving the serving policy as new episodes land in the replay buffer.

One improvement round = the offline pipeline (features -> critic -> actor, critic_trainer.pipeline.improve) on the
WHOLE buffer, starting from the store's CURRENT version (what the robot serves: after an operator's rollback the next
round starts from the rolled-back version), published into the CheckpointStore as a child of that version (made
current, so a policy node with hot reload picks it up). A round runs at start when the buffer is usable, then each
time at least `min_new` new labelled, kept episodes have been committed since the last round's snapshot.

A round that cannot train (no successful or no failed episode yet, a diverged loss) publishes nothing and waits for
more episodes; the store keeps serving what it served. SIGINT/SIGTERM end the watch between polls or abort the round
in progress (nothing half-written is ever published: the store commits whole versions only).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qvgm.data import DatasetError


def labelled_episodes(buffer: Path) -> int:
    """Committed, kept (not discarded) episodes with a success label; 0 for a buffer that does not exist yet."""
    from qvgm.data.buffer import read_episode_rows

    if not (Path(buffer) / "meta").exists():
        return 0
    return sum(1 for r in read_episode_rows(Path(buffer)) if not r.get("discarded") and r.get("success") is not None)


class Stop(Exception):
    """Raised by the signal handler: leave the watch."""


def watch(buffer: Path, store: Path, init: Path, cfg: Any, work: Path, min_new: int = 10, poll_s: float = 10.0,
          rounds: int = 0, progress: bool = False, log: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep, device: Any = "cpu") -> list[dict[str, Any]]:
    """Run improvement rounds on `buffer` into `store` until stopped (or `rounds` published, if > 0).

    init: the checkpoint to start from when the store has no current version (it is published into the store
    first). device: where each round's policy and critic train (qvgm.devices.resolve_device).
    cfg: an ImproveConfig; each round uses seed cfg.seed + round index. Returns one record per round that
    published: {round, version, parent, episodes, critic_mc_corr, q_before, q_after, wall_s}; the same records
    are appended to WORK/watch.jsonl.
    """
    import torch

    from critic_trainer.pipeline import improve, load_buffer, publish
    from qvgm.checkpoints import CheckpointStore
    from qvgm.policy import load_policy

    st = CheckpointStore(store)
    if st.current() is None:
        v0 = st.publish_dir(Path(init), summary={"kind": "watch-init", "source": str(init)}, make_current=True)
        log(f"[watch] published {init} into {store} as {v0} (current)")
    work.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    seen = -1  # labelled episodes at the last round's snapshot (-1: no round yet)
    n_round = 0

    def stop(signum: int, _frame: Any) -> None:
        raise Stop(signal.Signals(signum).name)

    main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        while rounds <= 0 or len(history) < rounds:
            n = labelled_episodes(buffer)
            if seen >= 0 and n - seen < min_new or n == 0:
                sleep(poll_s)
                continue
            seen = n
            n_round += 1
            serving = st.current()
            assert serving is not None
            t0 = time.perf_counter()
            log(f"[watch] round {n_round}: {n} labelled episodes, improving {serving}")
            try:
                policy = load_policy(st.path(serving), device=device)
                buf = load_buffer(buffer, policy.horizon, with_images=policy.config.backbone != "state")
                rcfg = replace(cfg, seed=cfg.seed + n_round - 1)
                with torch.inference_mode(False):
                    actor, critic, summary = improve(policy, buf, rcfg, work=work / f"round{n_round:03d}",
                                                     progress=progress)
            except (ValueError, DatasetError, FloatingPointError) as exc:
                log(f"[watch] round {n_round}: nothing published ({type(exc).__name__}: {exc}); "
                    f"waiting for {min_new} more episodes")
                continue
            manifest = publish(actor, critic, summary, st.path(serving), store=store)
            if st.current() != manifest["version"]:
                st.set_current(manifest["version"])
            act = summary.get("actor", {})
            rec = {"round": n_round, "version": manifest["version"], "parent": manifest.get("parent"),
                   "episodes": n, "critic_mc_corr": summary.get("critic", {}).get("eval", {}).get("mc_corr"),
                   "q_before": act.get("q_policy_before"), "q_after": act.get("q_policy_after"),
                   "wall_s": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            with open(work / "watch.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            log(f"[watch] round {n_round}: published {rec['version']} (parent {rec['parent']}) in {rec['wall_s']}s")
    except Stop as exc:
        log(f"[watch] stopped by {exc}; the store serves {st.current()}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return history

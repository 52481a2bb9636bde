"""RL token quality on pi05 prefix embeddings of sim demos: held-out cosine (teacher forced) and from z_rl alone
(every decoder context token dropped) for several training settings on ONE cached set of prefix embeddings. JSON.

    PYTHONPATH=. .venv/bin/python bench/rl_token_sweep.py --policy CKPT --dataset DIR --out sweep.json \\
        --setting old='{"dim": 128, "layers": 1, "lr": 3e-4, "schedule": "constant", "steps": 300}' --setting ...

Episodes are split by `critic_trainer.rl_token.split_by_episode` (the last 20 % held out), as the CLI does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, when run as a script

import torch  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer.rl_token import prefix_embeddings, train_rl_token  # noqa: E402
from critic_trainer.sft import load_demo_data  # noqa: E402
from qvgm.policy import load_policy  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="pi05 checkpoint (frozen)")
    ap.add_argument("--dataset", action="append", required=True)
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                    help="train_rl_token keyword overrides (repeatable); none = the defaults")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.policy)
    data = load_demo_data(args.dataset, 1, with_images=True)
    t0 = time.perf_counter()
    prefix = prefix_embeddings(policy, data.observations(range(len(data))))
    t_prefix = time.perf_counter() - t0
    settings = [s.split("=", 1) for s in args.setting] or [["default", "{}"]]
    rows = []
    for name, js in settings:
        t0 = time.perf_counter()
        rep = train_rl_token(policy, None, data.episode, prefix=prefix, **json.loads(js))
        rep.pop("loss_curve")
        rows.append({"name": name, **rep, "train_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        policy.rl_token = None
        policy.config.rl_token = None
    out = {"bench": "rl_token_sweep", "policy": str(args.policy), "policy_summary": policy.manifest.get("summary"),
           "frames": len(data), "episodes": int(len(set(data.episode.tolist()))),
           "prefix_shape": list(prefix[0].shape), "prefix_s": round(t_prefix, 1), "threads": args.threads,
           "results": rows, "machine": machine(args.threads)}
    return emit(out, args.out)


if __name__ == "__main__":
    main()

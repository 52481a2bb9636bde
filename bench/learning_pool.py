"""Pool bench/learning.py JSONs of one benchmark split over processes (disjoint training seeds, the same evaluation
scenes) into one table: per task and method the pooled success with a 95 % Wilson interval, per-seed rates, the
paired comparison against SFT on the same scenes (wins / losses, exact sign test) and wall time. JSON to stdout
(and --out), a markdown table with --markdown.

    .venv/bin/python bench/learning_pool.py run_a.json run_b.json --out pooled.json --markdown table.md

A training seed may appear in several inputs when they ran different methods from the same SFT policy and buffer
(a method run later on the cached --work): its methods are joined. Refused (clear error, nothing written): a
training seed in two inputs with the same method or a different SFT/buffer, inputs evaluated on different scenes, a
method's per-scene outcomes missing where a paired comparison needs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from critic_trainer.pipeline import paired_comparison, wilson_interval  # noqa: E402


def _same_training(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs of one training seed used the same SFT policy and rollout buffer (as a later run on the same
    --work does: both cached): the same demos, SFT loss and buffer episodes, outcomes and frames."""
    keys_sft, keys_roll = ("demo_seeds", "final_loss", "sft_steps"), ("seeds", "successes", "frames")
    return (all(a.get("sft", {}).get(k) == b.get("sft", {}).get(k) for k in keys_sft)
            and all(a.get("rollouts", {}).get(k) == b.get("rollouts", {}).get(k) for k in keys_roll))


def merge_seed(task: str, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One training seed's results from two inputs: allowed when they ran different methods from the same SFT
    policy and buffer (e.g. a method added later on the cached work dir); the methods are joined."""
    overlap = sorted(set(a["methods"]) & set(b["methods"]))
    if overlap:
        raise ValueError(f"{task}: training seed {a['seed']} appears in two inputs with the same methods {overlap}")
    if not _same_training(a, b):
        raise ValueError(f"{task}: training seed {a['seed']} appears in two inputs with a different SFT policy or "
                         "buffer (demos, SFT loss or rollouts differ)")
    return {**a, "methods": {**a["methods"], **b["methods"]}, "critic": a.get("critic") or b.get("critic")}


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled summary {task: {"seeds": [...], "methods": {m: {...}}}} of learning.py outputs."""
    if not runs:
        raise ValueError("nothing to pool")
    scenes = {r.get("eval_seeds") for r in runs}
    if len(scenes) != 1:
        raise ValueError(f"inputs were evaluated on different scenes: {sorted(map(str, scenes))}")
    tasks: dict[str, Any] = {}
    for task in sorted({t for r in runs for t in r.get("tasks", {})}):
        by_seed: dict[int, dict[str, Any]] = {}
        for r in runs:
            for s in r.get("tasks", {}).get(task, {}).get("seeds", []):
                by_seed[s["seed"]] = merge_seed(task, by_seed[s["seed"]], s) if s["seed"] in by_seed else s
        seeds = [by_seed[k] for k in sorted(by_seed)]
        methods = [m for m in seeds[0]["methods"] if all(m in s["methods"] for s in seeds)]
        out: dict[str, Any] = {}
        for m in methods:
            rows = [s["methods"][m] for s in seeds]
            k, n = sum(x["successes"] for x in rows), sum(x["episodes"] for x in rows)
            out[m] = {"success_rate": k / n, "successes": k, "episodes": n, "ci95": list(wilson_interval(k, n)),
                      "per_seed": {s["seed"]: s["methods"][m]["success_rate"] for s in seeds},
                      "wall_s": round(sum(x["train_s"] + x["eval_s"] for x in rows), 1)}
            if m != "sft" and "sft" in methods:
                if any("outcomes" not in x or "outcomes" not in s["methods"]["sft"] for x, s in zip(rows, seeds,
                                                                                                    strict=True)):
                    raise ValueError(f"{task}/{m}: per-scene outcomes missing (a run older than paired outcomes)")
                out[m]["vs_sft"] = out[m]["success_rate"] - out["sft"]["success_rate"]
                out[m]["vs_sft_paired"] = paired_comparison(
                    [o for x in rows for o in x["outcomes"]],
                    [o for s in seeds for o in s["methods"]["sft"]["outcomes"]])
                out[m]["vs_sft_paired_per_seed"] = {
                    s["seed"]: paired_comparison(s["methods"][m]["outcomes"], s["methods"]["sft"]["outcomes"])
                    for s in seeds}
        tasks[task] = {"seeds": [s["seed"] for s in seeds], "methods": out,
                       "critic_mc_corr": {s["seed"]: (s.get("critic") or {}).get("eval", {}).get("mc_corr")
                                          for s in seeds},
                       "buffer_successes": {s["seed"]: s["rollouts"].get("successes") for s in seeds}}
    return {"bench": "learning_pool", "eval_seeds": scenes.pop(), "tasks": tasks}


def markdown(pooled: dict[str, Any]) -> str:
    """One table per task: method | per-seed successes (%) | pooled | Wilson 95 % | vs SFT | paired W/L, p."""
    lines: list[str] = []
    for task, t in pooled["tasks"].items():
        seeds = t["seeds"]
        lines += [f"### {task}, training seeds {', '.join(map(str, seeds))}", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | pooled | Wilson 95 % | vs SFT | paired wins / losses vs SFT, sign-test p | train+eval wall |",
                  "|---" * (len(seeds) + 6) + "|"]
        for m, r in t["methods"].items():
            per = " | ".join(f"{100 * r['per_seed'][s]:.0f}" for s in seeds)
            lo, hi = r["ci95"]
            vs = f"{100 * r['vs_sft']:+.1f}" if "vs_sft" in r else "-"
            pc = r.get("vs_sft_paired")
            paired = f"{pc['wins']} / {pc['losses']}, p = {pc['p_value']:.3g}" if pc else "-"
            lines.append(f"| {m} | {per} | {r['successes']}/{r['episodes']} = {100 * r['success_rate']:.1f} % | "
                         f"[{100 * lo:.1f}, {100 * hi:.1f}] | {vs} | {paired} | {r['wall_s'] / 60:.0f} min |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="bench/learning.py JSON outputs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    runs = []
    for p in args.inputs:
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{p}: not a readable learning.py JSON ({e})") from None
    try:
        pooled = pool(runs)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    pooled["inputs"] = [str(p) for p in args.inputs]
    text = json.dumps(pooled, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.markdown:
        args.markdown.write_text(markdown(pooled))
    return pooled


if __name__ == "__main__":
    main()

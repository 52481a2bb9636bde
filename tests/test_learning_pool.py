"""bench/learning_pool.py on the recorded pick_place benchmark JSONs (real runs, bench/results/)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import learning_pool  # noqa: E402

PAIRED = ROOT / "bench/results/learning_state_pick_place_5seeds_paired_2026-11-26.json"
UNPAIRED = ROOT / "bench/results/learning_state_pick_place_5seeds_2026-11-26.json"


def test_pooling_two_processes_reproduces_the_recorded_figures(tmp_path: Path) -> None:
    """The 5-seed paired rerun was two processes (seeds 0-1, 2-4); pooled: SFT 309/500, Q-VGM 340/500, 75 wins /
    44 losses, p = 0.0057 (the figures docs/RESULTS.md recorded from the same files)."""
    runs = json.loads(PAIRED.read_text())["runs"]
    files = []
    for i, r in enumerate(runs):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(r))
    md = tmp_path / "t.md"
    out = learning_pool.main([*map(str, files), "--out", str(tmp_path / "p.json"), "--markdown", str(md)])
    t = out["tasks"]["pick_place"]
    assert t["seeds"] == [0, 1, 2, 3, 4]
    assert (t["methods"]["sft"]["successes"], t["methods"]["sft"]["episodes"]) == (309, 500)
    q = t["methods"]["qvgm"]
    assert (q["successes"], q["episodes"]) == (340, 500)
    assert (q["vs_sft_paired"]["wins"], q["vs_sft_paired"]["losses"]) == (75, 44)
    assert q["vs_sft_paired"]["p_value"] == pytest.approx(0.0057268619, rel=1e-6)
    assert {s: (v["wins"], v["losses"]) for s, v in q["vs_sft_paired_per_seed"].items()} == {
        0: (17, 7), 1: (17, 5), 2: (19, 9), 3: (10, 7), 4: (12, 16)}
    assert q["vs_sft"] == pytest.approx(0.062)
    assert json.loads((tmp_path / "p.json").read_text())["tasks"]["pick_place"]["seeds"] == [0, 1, 2, 3, 4]
    table = md.read_text()
    assert "| qvgm | 80 | 65 | 71 | 63 | 61 | 340/500 = 68.0 % |" in table and "75 / 44, p = 0.00573" in table


def test_pooling_refuses_overlapping_seeds_other_scenes_and_missing_outcomes() -> None:
    runs = json.loads(PAIRED.read_text())["runs"]
    with pytest.raises(ValueError, match="appears in two inputs with the same methods"):
        learning_pool.pool([runs[0], runs[0]])
    # one seed's methods split over two inputs (a method run later on the cached work dir): joined ...
    first, later = copy.deepcopy(runs[0]), copy.deepcopy(runs[0])
    for s in first["tasks"]["pick_place"]["seeds"]:
        del s["methods"]["qvgm"]
    for s in later["tasks"]["pick_place"]["seeds"]:
        s["methods"] = {"qvgm": s["methods"]["qvgm"]}
    joined = learning_pool.pool([first, later, runs[1]])["tasks"]["pick_place"]["methods"]
    assert joined == learning_pool.pool(runs)["tasks"]["pick_place"]["methods"]
    # ... unless the later run trained from another SFT policy or buffer
    later["tasks"]["pick_place"]["seeds"][0]["rollouts"]["successes"] += 1
    with pytest.raises(ValueError, match="different SFT policy or buffer"):
        learning_pool.pool([first, later])
    other = copy.deepcopy(runs[1])
    other["eval_seeds"] = "200000..200099"
    with pytest.raises(ValueError, match="different scenes"):
        learning_pool.pool([runs[0], other])
    with pytest.raises(ValueError, match="outcomes missing"):
        learning_pool.pool(json.loads(UNPAIRED.read_text())["runs"])
    with pytest.raises(SystemExit, match="not a readable"):
        learning_pool.main([str(ROOT / "README.md")])

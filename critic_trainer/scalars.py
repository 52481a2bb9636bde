"""Training scalars: WORK/scalars.jsonl ({"stage", "step", name: value...} per line) and TensorBoard events in
WORK/tb (tag "<stage>/<name>"). One logger for SFT and critic_trainer's critic/actor stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ScalarLog:
    """Append-only scalar log. work None: logs nothing (callers need no branches).

    resume_step None starts a fresh log; an int keeps the lines up to that step (a resumed run re-logs the rest
    identically) and purges TensorBoard events after it.
    """

    def __init__(self, work: Path | None, resume_step: int | None = None) -> None:
        self.f = self.tb = None
        if work is None:
            return
        work.mkdir(parents=True, exist_ok=True)
        self.path = work / "scalars.jsonl"
        if resume_step is not None and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        self.f = open(self.path, "a" if resume_step is not None else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            purge = {} if resume_step is None else {"purge_step": resume_step + 1}
            self.tb = SummaryWriter(str(work / "tb"), **purge)
        except ImportError:
            self.tb = None

    def log(self, stage: str, step: int, scalars: dict[str, Any]) -> None:
        """Log the int/float entries of `scalars` (others, e.g. lists, are skipped) at `step` under `stage`."""
        vals = {k: float(v) for k, v in scalars.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.f is not None:
            self.f.write(json.dumps({"stage": stage, "step": step, **vals}) + "\n")
            self.f.flush()
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tb is not None:
            self.tb.close()

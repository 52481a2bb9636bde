"""`critic_trainer` command line: one subcommand per module.

Each subcommand lives in a module exposing `HELP: str`, `add_arguments(parser)` and `run(args) -> int`
(exit status). Adding one is a single entry in SUBCOMMANDS; modules are imported lazily so `--help` and
the light subcommands do not pay for torch/transformers imports they do not use.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qvgm.checkpoints import CheckpointError
from qvgm.data.layout import DatasetError

# name -> module path (the module defines HELP, add_arguments, run)
SUBCOMMANDS: dict[str, str] = {
    "demos": "critic_trainer.demos",
    "import-pi05": "critic_trainer.import_pi05",
    "sft": "critic_trainer.sft",
    "rl-token": "critic_trainer.rl_token",
    "qvgm": "critic_trainer.pipeline",
    "mcap2dataset": "qvgm.data.mcap",
}


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback, exit status 2."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Parser with every subcommand; only the selected subcommand's module is imported (all for --help)."""
    ap = argparse.ArgumentParser(prog="critic_trainer", description="offline training for qvgm policies")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, modpath in SUBCOMMANDS.items():
        if chosen in SUBCOMMANDS and name != chosen:
            sub.add_parser(name, help=f"(see critic_trainer {name} --help)")
            continue
        mod = importlib.import_module(modpath)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point (`critic_trainer = critic_trainer.cli:main`). Bad input -> message on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser(argv)
    args = ap.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UsageError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"critic_trainer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError) as e:
        print(f"critic_trainer {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

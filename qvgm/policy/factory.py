"""Build a fresh (randomly initialised) FlowPolicy by config name."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer

from qvgm.policy.checkpoint_io import build_policy
from qvgm.policy.config import Pi05Config, get_config
from qvgm.policy.flow import FlowPolicyBase
from qvgm.policy.processor import NormStats, build_tokenizer


def make_policy(name: str, norm_stats: NormStats, tasks: list[str] | None = None,
                tokenizer: Tokenizer | None = None, **overrides: Any) -> FlowPolicyBase:
    """`pi05`, `pi05-small`, `pi05-tiny` or `state`, with config field overrides (camera_names, state_dim,
    real_action_dim, horizon, privileged_dim, ...). pi05 configs get a word-level tokenizer built from `tasks`
    unless `tokenizer` is given. norm_stats must match state_dim / real_action_dim."""
    cfg = get_config(name, **overrides)
    if isinstance(cfg, Pi05Config) and tokenizer is None:
        tokenizer = build_tokenizer(tasks or [])
    return build_policy(cfg, norm_stats, tokenizer)

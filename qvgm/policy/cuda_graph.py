"""Flow sampling captured as one CUDA graph (inference only).

A chunk costs one prefix encode and K expert passes (qvgm.policy.flow.FlowPolicyBase.sample, openpi's flow-time
convention: t = 1 noise -> t = 0 clean). On a GPU the K small expert passes are bound by kernel launches and
Python, not arithmetic (real-size pi05 in bf16 on an H200: ~14 ms per expert step, docs/RESULTS.md); replaying the
whole K-step Euler loop as one captured graph removes that overhead. The graph is specific to the batch size, K,
and the shapes/dtypes of every context tensor; `GraphedSampler.key` names them and FlowPolicyBase.act keeps one
sampler per key.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

# policy -> {context_key: GraphedSampler}; weak, so a retired (hot-swapped) policy frees its graphs with it
CAPTURED: weakref.WeakKeyDictionary[Any, dict[tuple, GraphedSampler]] = weakref.WeakKeyDictionary()


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor of a context (tensor, list/tuple/dict of them, or a dataclass holding them), in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in _tensors(getattr(tree, f.name))]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for k in sorted(tree) for t in _tensors(tree[k])]
    return []


def _clone(tree: Any) -> Any:
    """A deep copy of a context with every tensor cloned (the graph's static inputs)."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: _clone(getattr(tree, f.name)) for f in dataclasses.fields(tree)
                                            if f.init})
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree


def context_key(context: Any, num_steps: int) -> tuple:
    """What a captured graph is valid for: K and (shape, dtype, device) of every context tensor."""
    return (num_steps, *((tuple(t.shape), t.dtype, str(t.device)) for t in _tensors(context)))


class GraphedSampler:
    """policy.sample(context, num_steps, noise) for one context signature, as a CUDA graph.

    Built from an example context (its values do not matter, its shapes do). Calling it copies the context and the
    noise [B, H, D] into the graph's static buffers, replays, and returns a fresh normalised chunk [B, H, D]
    (float32). Capture runs on a side stream with thread-local error checking, so another thread may keep using
    the GPU meanwhile (the hot-reload dry run captures on the loader thread while the serving model runs).
    """

    def __init__(self, policy: Any, context: Any, num_steps: int, warmup: int = 2) -> None:
        dev = policy.device
        if dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA policy, this one is on {dev}")
        self.num_steps = int(num_steps)
        self.key = context_key(context, num_steps)
        self.context = _clone(context)
        self.noise = torch.zeros(policy.batch_size(context), policy.horizon, policy.action_dim, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):  # lazy allocations and library handles happen outside the capture
                policy.sample(self.context, num_steps=self.num_steps, noise=self.noise)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = policy.sample(self.context, num_steps=self.num_steps, noise=self.noise)

    def __call__(self, context: Any, noise: torch.Tensor, key: tuple | None = None) -> torch.Tensor:
        """`key`: context_key(context, K) when the caller already computed it (its cache lookup), else computed."""
        if (context_key(context, self.num_steps) if key is None else key) != self.key:
            raise ValueError("context shapes differ from the captured graph's; capture a new GraphedSampler")
        for dst, src in zip(_tensors(self.context), _tensors(context), strict=True):
            dst.copy_(src)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()

"""Data-parallel critic and Q-VGM updates: two real processes, torch.distributed gloo on loopback, world size 2."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from critic_trainer.critic import CriticBatch, CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble
from critic_trainer.distributed import broadcast_parameters
from critic_trainer.qvgm import QVGMConfig, qvgm_update
from critic_trainer.toy import ToyFlowPolicy

STEPS, B = 15, 16


def make_critic(seed: int) -> QEnsemble:
    torch.manual_seed(seed)
    return QEnsemble(CriticConfig(feature_dim=5, proprio_dim=2, n_exec=2, real_action_dim=2, hidden=(16, 16)))


def batch_for(step: int, rank: int) -> CriticBatch:
    """Deterministic per-(step, rank) data, so a single process can rebuild the union batch."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return CriticBatch(z=r(B, 5), p=r(B, 2), actions=r(B, 4).clamp(-1, 1), rewards=r(B, 2), done=(r(B) > 1).float(),
                       z_next=r(B, 5), p_next=r(B, 2), mc_return=r(B), ref_actions=r(B, 3, 4).clamp(-1, 1),
                       ref_next_actions=r(B, 3, 4).clamp(-1, 1))


def union(a: CriticBatch, b: CriticBatch) -> CriticBatch:
    return CriticBatch(**{k: torch.cat([getattr(a, k), getattr(b, k)]) if getattr(a, k) is not None else None
                          for k in a.__dataclass_fields__})


def _worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # critic: different local inits, rank 0's weights win; TD only (w = 0) so the union batch is exact
        trainer = CriticTrainer(make_critic(seed=rank), CriticTrainConfig(reg_weight=0.0, lr=1e-2))
        for step in range(STEPS):
            trainer.update(batch_for(step, rank))
        save_file({k: v.contiguous() for k, v in trainer.critic.state_dict().items()}, f"{out}/critic{rank}.st")
        # Q-VGM actor on the toy policy with an analytic critic
        torch.manual_seed(rank)
        actor = ToyFlowPolicy(4, horizon=3, action_dim=3, real_action_dim=2, hidden=32)
        broadcast_parameters(actor.parameters())
        reference = copy.deepcopy(actor).requires_grad_(False)
        opt = torch.optim.Adam(actor.parameters(), 1e-2)
        torch.manual_seed(100 + rank)  # different noise and states per rank
        for _ in range(3):
            qvgm_update(actor, reference, opt, {"state": torch.randn(8, 4)}, lambda a: -((a - 0.5) ** 2).sum(-1),
                        QVGMConfig(n_exec=2))
        save_file({k: v.contiguous() for k, v in actor.state_dict().items()}, f"{out}/actor{rank}.st")
        ref_state = {k: v.contiguous() for k, v in reference.state_dict().items()}
        save_file(ref_state, f"{out}/ref{rank}.st")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_ranks_match_each_other_and_single_process_on_the_union(tmp_path):
    # reference first: one process on the union of both ranks' batches, from rank 0's init (this also imports
    # the optimiser machinery once, so the forked ranks do not each pay for it)
    torch.set_num_threads(1)
    single = CriticTrainer(make_critic(seed=0), CriticTrainConfig(reg_weight=0.0, lr=1e-2))
    for step in range(STEPS):
        single.update(union(batch_for(step, 0), batch_for(step, 1)))
    # fork: the children reuse the imported modules (spawn would re-import torch: ~10 s more per run)
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    c0, c1 = load_file(tmp_path / "critic0.st"), load_file(tmp_path / "critic1.st")
    for k in c0:
        torch.testing.assert_close(c0[k], c1[k], rtol=0, atol=0)
    for k, v in single.critic.state_dict().items():
        torch.testing.assert_close(c0[k], v, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(c0["out.weight"], make_critic(seed=0).out.weight)  # it did train
    a0, a1, r0 = (load_file(tmp_path / f) for f in ("actor0.st", "actor1.st", "ref0.st"))
    for k in a0:
        torch.testing.assert_close(a0[k], a1[k], rtol=0, atol=0)
    assert any(not torch.equal(a0[k], r0[k]) for k in a0)
    assert np.isfinite(sum(float(v.sum()) for v in a0.values()))

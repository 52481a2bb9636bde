"""Checkpoint directories: atomic save, verified load (sha256, safetensors only), robot-profile checks,
corrupt / partial / NaN / wrong-shape weights refused with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qvgm.checkpoints import CheckpointError, write_manifest
from qvgm.policy.checkpoint_io import load_policy, read_safetensors, save_policy
from qvgm.policy.config import get_config
from qvgm.policy.pi05 import Pi05Policy
from qvgm.policy.processor import NormStats, build_tokenizer
from qvgm.policy.state_policy import StatePolicy

torch.set_num_threads(1)  # 2 shared CPU cores

PROFILE = {"real_action_dim": 7, "state_dim": 7, "camera_names": ["wrist", "base"]}


def tiny_pi05() -> Pi05Policy:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(size=(100, 7)), rng.normal(size=(100, 7)))
    return Pi05Policy(get_config("pi05-tiny"), build_tokenizer(["stack the cubes"]), stats)


def obs() -> dict:
    rng = np.random.default_rng(1)
    return {"images": {"base": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                       "wrist": rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)},
            "state": rng.normal(size=7).astype(np.float32), "prompt": "stack the cubes"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Pi05Policy, Path]:
    pol = tiny_pi05()
    d = tmp_path_factory.mktemp("ck") / "v1"
    save_policy(pol, d, version="v1", parent=None, summary={"steps": 0})
    return pol, d


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_roundtrip_same_outputs(saved) -> None:
    pol, d = saved
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "manifest.json", "model.safetensors",
                                                   "norm_stats.json", "tokenizer.json"]
    loaded = load_policy(d, expect=PROFILE)
    assert loaded.version == "v1" and loaded.manifest["summary"] == {"steps": 0}
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    a = pol.eval().act([obs()], noise=noise)
    b = loaded.act([obs()], noise=noise)
    np.testing.assert_array_equal(a, b)
    assert not list(d.parent.glob(".v1.tmp-*"))


def test_load_as_bfloat16(saved) -> None:
    loaded = load_policy(saved[1], dtype=torch.bfloat16)
    assert loaded.model.action_in_proj.weight.dtype == torch.bfloat16
    assert np.isfinite(loaded.act([obs()], num_steps=2)).all()


def test_state_policy_roundtrip(tmp_path) -> None:
    cfg = get_config("state", horizon=5, state_dim=4, real_action_dim=3, privileged_dim=2)
    pol = StatePolicy(cfg, NormStats.identity(4, 3)).eval()
    save_policy(pol, tmp_path / "s", version="s1", parent="s0")
    loaded = load_policy(tmp_path / "s", expect={"real_action_dim": 3, "privileged_dim": 2})
    assert loaded.manifest["parent"] == "s0"
    inp = pol.preprocess([{"state": np.ones(4), "privileged": np.zeros(2)}])
    torch.testing.assert_close(pol.critic_features(pol.encode(inp)), loaded.critic_features(loaded.encode(inp)))


def test_save_is_atomic_and_refuses_nan(tmp_path) -> None:
    pol = tiny_pi05()
    with torch.no_grad():
        pol.model.action_out_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*action_out_proj"):
        save_policy(pol, tmp_path / "bad", version="x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        save_policy(tiny_pi05(), tmp_path / "exists", version="x")


@pytest.mark.parametrize("expect, msg", [
    ({"real_action_dim": 6}, "real_action_dim: checkpoint 7, robot profile 6"),
    ({"camera_names": ["base", "side"]}, r"camera_names.*missing \['side'\], extra \['wrist'\]"),
    ({"state_dim": 8}, "state_dim: checkpoint 7, robot profile 8"),
])
def test_profile_mismatch_refused(saved, expect, msg) -> None:
    with pytest.raises(CheckpointError, match=msg):
        load_policy(saved[1], expect=expect)


def test_corrupt_and_partial_refused(saved, tmp_path) -> None:
    _, d = saved
    c = copy_ckpt(d, tmp_path / "flip")
    raw = bytearray((c / "model.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (c / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 mismatch for model.safetensors"):
        load_policy(c)
    p = copy_ckpt(d, tmp_path / "partial")
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_policy(p)
    t = copy_ckpt(d, tmp_path / "trunc")  # truncated file whose manifest was (wrongly) rewritten to match
    (t / "model.safetensors").write_bytes((t / "model.safetensors").read_bytes()[:1000])
    write_manifest(t, "v1")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_policy(t)
    k = copy_ckpt(d, tmp_path / "pickle")
    torch.save({"a": 1}, k / "extra.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_policy(k)


def _rewrite_weights(d: Path, edit) -> None:
    tensors = read_safetensors(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))
    write_manifest(d, "v1")


def test_bad_weights_refused(saved, tmp_path) -> None:
    _, d = saved
    key = "model.action_in_proj.weight"

    def nan(t):
        t[key] = t[key].clone()
        t[key][0, 0] = float("nan")

    c = copy_ckpt(d, tmp_path / "nan")
    _rewrite_weights(c, nan)
    with pytest.raises(CheckpointError, match=f"{key} contains NaN"):
        load_policy(c)
    c = copy_ckpt(d, tmp_path / "shape")
    _rewrite_weights(c, lambda t: t.__setitem__(key, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(3, 3\)"):
        load_policy(c)
    c = copy_ckpt(d, tmp_path / "missing")
    _rewrite_weights(c, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"1 missing keys.*{key}"):
        load_policy(c)
    c = copy_ckpt(d, tmp_path / "cfg")
    cfg = json.loads((c / "config.json").read_text())
    cfg["config"]["warp_drive"] = True
    (c / "config.json").write_text(json.dumps(cfg))
    write_manifest(c, "v1")
    with pytest.raises(CheckpointError, match="unknown fields.*warp_drive"):
        load_policy(c)


def test_write_policy_files_into_a_store_staging_dir(tmp_path) -> None:
    """write_policy_files fills a staging dir that the caller (e.g. CheckpointStore.writing) manifests."""
    from qvgm.policy.checkpoint_io import write_policy_files

    pol = StatePolicy(get_config("state", horizon=3, state_dim=2, real_action_dim=2), NormStats.identity(2, 2))
    d = tmp_path / "staged"
    d.mkdir()
    write_policy_files(pol, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "norm_stats.json"]
    write_manifest(d, "v000001-abcdef12", parent=None)
    assert load_policy(d).version == "v000001-abcdef12"

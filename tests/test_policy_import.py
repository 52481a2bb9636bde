"""Import of published pi0.5 weights: tiny random checkpoints written by this test in the openpi and LeRobot
PyTorch layouts (key names as those projects save them) load into a fresh model and give the same outputs;
unknown / missing keys are reported by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qvgm.checkpoints import CheckpointError
from qvgm.policy.config import get_config
from qvgm.policy.pi05 import AdaRMSNorm, Pi05Policy
from qvgm.policy.processor import NormStats, build_tokenizer
from qvgm.policy.weights_import import load_published_weights

torch.set_num_threads(1)  # 2 shared CPU cores

TOK = build_tokenizer(["wipe the table"])


def make_policy(seed: int) -> Pi05Policy:
    torch.manual_seed(seed)
    pol = Pi05Policy(get_config("pi05-tiny"), TOK, NormStats.identity(7, 7)).eval()
    with torch.no_grad():
        for m in pol.modules():
            if isinstance(m, AdaRMSNorm):
                m.dense.weight.normal_(0, 0.2)
                m.dense.bias.normal_(0, 0.2)
    return pol


def openpi_layout(sd: dict[str, torch.Tensor], old_transformers: bool = False) -> dict[str, torch.Tensor]:
    """Our keys -> openpi's `model.safetensors` names (SigLIP under `vision_model.`, embed stored as lm_head)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("paligemma.model.vision_tower."):
            k = "paligemma.model.vision_tower.vision_model." + k[len("paligemma.model.vision_tower."):]
        if old_transformers and k.startswith("paligemma.model.language_model."):
            k = "paligemma.language_model.model." + k[len("paligemma.model.language_model."):]
        if k.startswith(("paligemma.", "gemma_expert.")):
            k = "paligemma_with_expert." + k
        out[k] = v.clone()
    embed = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    if old_transformers:
        embed = "paligemma_with_expert.paligemma.language_model.model.embed_tokens.weight"
    out["paligemma_with_expert.paligemma.lm_head.weight"] = out.pop(embed)  # tied: stored once
    out["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.randn(TOK.get_vocab_size(), 64)
    return out


def lerobot_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model." + k: v for k, v in openpi_layout(sd).items()}
    out["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = \
        out["model.paligemma_with_expert.paligemma.lm_head.weight"].clone()
    return out


def obs() -> dict:
    rng = np.random.default_rng(0)
    return {"images": {"base": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
            "state": rng.uniform(-1, 1, 7), "prompt": "wipe the table"}


@pytest.mark.parametrize("layout", ["openpi", "lerobot", "openpi-old-transformers"])
def test_import_gives_same_outputs(layout: str, tmp_path: Path) -> None:
    src = make_policy(0)
    sd = src.model.state_dict()
    tensors = {"openpi": lambda: openpi_layout(sd), "lerobot": lambda: lerobot_layout(sd),
               "openpi-old-transformers": lambda: openpi_layout(sd, old_transformers=True)}[layout]()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    dst = make_policy(1)
    report = load_published_weights(dst.model, path)
    assert report.layout == layout.split("-")[0]
    assert not report.unknown and not report.missing
    assert any("gemma_expert.lm_head" in k for k, _ in report.ignored)
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    want = src.act([obs()], noise=noise)
    got = dst.act([obs()], noise=noise)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_weights_cast_within_tolerance() -> None:
    src = make_policy(0)
    tensors = {k: v.to(torch.bfloat16) for k, v in openpi_layout(src.model.state_dict()).items()}
    dst = make_policy(1)
    load_published_weights(dst.model, tensors)
    assert dst.model.action_in_proj.weight.dtype == torch.float32
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(dst.act([obs()], noise=noise), src.act([obs()], noise=noise), atol=0.1)


def test_unknown_and_missing_keys_reported() -> None:
    tensors = openpi_layout(make_policy(0).model.state_dict())
    tensors["paligemma_with_expert.gemma_expert.model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    del tensors["paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError) as e:
        load_published_weights(make_policy(1).model, tensors)
    msg = str(e.value)
    assert "1 unknown" in msg and "layers.0.self_attn.rotary.weight" in msg
    assert "1 missing" in msg and "gemma_expert.model.layers.1.mlp.up_proj.weight" in msg
    with pytest.raises(CheckpointError, match="not a pi0.5 PyTorch checkpoint"):
        load_published_weights(make_policy(1).model, {"encoder.weight": torch.zeros(1)})


def test_wrong_size_config_refused() -> None:
    tensors = openpi_layout(make_policy(0).model.state_dict())
    torch.manual_seed(0)
    other = Pi05Policy(get_config("pi05-tiny", expert_width=96), TOK, NormStats.identity(7, 7))
    with pytest.raises(CheckpointError, match="has shape"):
        load_published_weights(other.model, tensors)


def test_import_published_checkpoint_end_to_end(tmp_path: Path) -> None:
    import json

    from qvgm.policy.checkpoint_io import load_policy
    from qvgm.policy.weights_import import import_published_checkpoint

    src = make_policy(0)
    save_file(openpi_layout(src.model.state_dict()), str(tmp_path / "model.safetensors"))
    TOK.save(str(tmp_path / "tokenizer.json"))
    stats = {"norm_stats": {k: {"q01": [-1.0] * 32, "q99": [1.0] * 32} for k in ("state", "actions")}}
    (tmp_path / "norm_stats.json").write_text(json.dumps(stats))
    norm = NormStats.from_openpi(json.loads((tmp_path / "norm_stats.json").read_text()), 7, 7)
    report = import_published_checkpoint(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", norm,
                                         tmp_path / "ours", version="pi05-import", config="pi05-tiny")
    assert report.layout == "openpi"
    loaded = load_policy(tmp_path / "ours", expect={"real_action_dim": 7, "camera_names": ["base", "wrist"]})
    assert loaded.version == "pi05-import" and loaded.manifest["summary"]["layout"] == "openpi"
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(loaded.act([obs()], noise=noise), src.act([obs()], noise=noise), rtol=1e-5, atol=1e-5)
    bad = openpi_layout(src.model.state_dict())
    bad.pop("action_in_proj.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="action_in_proj.weight"):
        import_published_checkpoint(tmp_path / "bad.safetensors", tmp_path / "tokenizer.json", norm,
                                    tmp_path / "never", version="x", config="pi05-tiny")
    assert not (tmp_path / "never").exists()

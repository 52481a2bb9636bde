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


def test_cli_import_sized_to_a_dataset_then_sft_from_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`critic_trainer import-pi05`: published weights (openpi layout) + tokenizer.json + a robot's dataset -> a
    checkpoint with the dataset's dims, cameras and norm stats and the published weights bit for bit; then
    `critic_trainer sft --init` fine-tunes it on that dataset (the user's path from pi0.5 to a few-shot SFT).
    A dataset without cameras, or weights of another size, are refused and write nothing."""
    import json

    from critic_trainer.cli import main
    from critic_trainer.demos import collect_demos
    from qvgm.policy.checkpoint_io import load_policy
    from qvgm.sim.tasks import prompt_vocabulary

    tok = build_tokenizer(prompt_vocabulary())
    torch.manual_seed(0)
    src = Pi05Policy(get_config("pi05-tiny"), tok, NormStats.identity(7, 7)).eval()
    save_file(openpi_layout(src.model.state_dict()), str(tmp_path / "model.safetensors"))
    tok.save(str(tmp_path / "tokenizer.json"))
    ds = tmp_path / "demos"
    collect_demos("pick_place", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    common = ["--weights", str(tmp_path / "model.safetensors"), "--tokenizer", str(tmp_path / "tokenizer.json"),
              "--config", "pi05-tiny"]
    assert main(["import-pi05", *common, "--dataset", str(ds), "--out", str(tmp_path / "ours")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "openpi" and info["camera_names"] == ["front", "wrist"]
    ours = load_policy(tmp_path / "ours", expect={"camera_names": ["front", "wrist"], "real_action_dim": 7})
    assert ours.manifest["summary"]["config"] == "pi05-tiny"
    assert all(torch.equal(v, src.model.state_dict()[k]) for k, v in ours.model.state_dict().items())
    from critic_trainer.sft import load_demo_data, norm_stats_from

    own = norm_stats_from(load_demo_data([ds], 1, with_images=False))
    np.testing.assert_allclose(ours.processor.norm_stats.action_q99, own.action_q99, rtol=1e-6)
    assert main(["sft", "--dataset", str(ds), "--init", str(tmp_path / "ours"), "--out", str(tmp_path / "ft"),
                 "--steps", "2", "--batch-size", "4", "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    ft = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert ft["parent"] == "pi05-import" and ft["summary"]["config"] == "pi05-tiny"
    blind = tmp_path / "blind"
    collect_demos("pick_place", 1, blind, noise=0.005, seed=0, render=False)
    assert main(["import-pi05", *common, "--dataset", str(blind), "--out", str(tmp_path / "x1")]) == 2
    assert "records no cameras" in capsys.readouterr().err
    assert main(["import-pi05", *common[:-1], "pi05-small", "--dataset", str(ds), "--out", str(tmp_path / "x2")]) == 2
    assert "cannot import pi0.5 weights" in capsys.readouterr().err  # the keys that differ follow, by name
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()

"""Model configurations for the FlowPolicy backbones (`pi05`, `pi05-small`, `pi05-tiny`, `state`).

Sizes follow METHOD.md §1 for the real `pi05`. The action expert shares the VLM's attention layer by layer,
so it has the same depth, number of heads, KV heads and head dim; only its width and MLP size differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Pi05Config:
    """pi0.5: SigLIP + Gemma prefix (PaliGemma) and a Gemma-style action expert with adaRMSNorm.

    Images are `image_size` px square, `patch_size` px patches -> (image_size / patch_size)^2 tokens per camera.
    `vocab_size` None means: take the tokeniser's vocabulary size when the policy is built.
    """

    backbone: str = "pi05"
    # SigLIP vision tower
    vision_width: int = 1152
    vision_depth: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    image_size: int = 224
    patch_size: int = 14
    # Gemma VLM (prefix)
    width: int = 2048
    depth: int = 18
    mlp: int = 16384
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int | None = 257152
    # action expert (suffix)
    expert_width: int = 1024
    expert_mlp: int = 4096
    # robot / chunk
    horizon: int = 50
    action_dim: int = 32
    real_action_dim: int = 7
    state_dim: int = 7
    camera_names: list[str] = field(default_factory=lambda: ["base", "wrist"])
    max_token_len: int = 200
    rms_eps: float = 1e-6
    # RL token (qvgm.policy.rl_token.RLTokenConfig as a dict) when the checkpoint has one, else None
    rl_token: dict[str, Any] | None = None
    # arm joints predicted relative to the current joint state, gripper absolute (FlowPolicyBase.delta_anchor; openpi
    # trains its joint-space robots on delta actions too). Opt-in: older checkpoints load unchanged.
    delta_actions: bool = False
    # Sim diagnostic, 0 = off (a real robot has no such input): the privileged object state (k values per frame,
    # qvgm.sim's layout: m and rotation entries), normalised with the 1%/99% quantiles in norm_stats.json (SFT
    # stores them; checkpoints saved before it did have none and use the raw values), clipped to [-1, 1] and
    # appended to the prompt's 256-bin state tokens, so the model is told where the objects are instead of seeing
    # it. Separates "cannot localise from pixels" from "cannot learn the task" (bench/sft_success.py). Observations
    # then need `privileged` [k].
    privileged_dim: int = 0
    # From-scratch configs: the embeddings of the 256 state-bin tokens start ordered (Pi05Model.init_ordinal_bins:
    # smooth in the bin value), so nearby bins start close; off = the LM's random init. Irrelevant for imported
    # weights (they overwrite it). Opt-in: older checkpoints load unchanged.
    ordinal_state_bins: bool = False
    # From-scratch configs: one more prefix token, a linear projection of the normalised state (and, with
    # privileged_dim, the normalised object state clipped to [-1, 1]), after the prompt: the state as numbers the
    # network reads linearly, as pi0 feeds it (pi0 puts that token with the action tokens; here it sits in the
    # cached prefix; pi0.5 itself has only the prompt bins, which the published weights read through a pretrained
    # LM). Opt-in: older checkpoints load unchanged.
    continuous_state: bool = False
    # From-scratch configs: the same state vector also conditions the action expert directly, added into the hidden
    # layer of the flow-time MLP that drives every adaRMSNorm (FiLM, as Diffusion Policy conditions its denoiser on
    # the observation), instead of only through attention to the prefix. Zero-initialised. Opt-in: older
    # checkpoints load unchanged.
    state_film: bool = False
    # The action dims past real_action_dim (padding to action_dim). False = openpi's convention, which the published
    # weights were trained with: the expert reads and denoises all action_dim dims and the flow loss covers them
    # (target eps - 0), so the padded dims go to 0 along the sampling path as they do in training. True = they are
    # not the model's business: zeroed on the expert's input, velocity 0 there, loss on the real dims only (as the
    # `state` backbone does). What must not happen is the mix (loss on the real dims, padded dims read): their
    # velocity is then never trained, so at sampling they drift away from the t * eps the expert saw in training,
    # worst at the low-noise steps that set the action.
    zero_padded_actions: bool = False
    # From-scratch configs, 0 = off: K spatial-softmax keypoints per camera (Pi05Model.keypoints: a small conv net,
    # each of its K maps turned into the expected image (x, y) in [-1, 1]; Levine et al. 2016, as robomimic and
    # Diffusion Policy encode images), projected to one more token per camera after its SigLIP tokens. Where a
    # small blob is in the image becomes two numbers the network reads linearly, which a SigLIP tower trained from
    # scratch on a few demos does not learn (docs/RESULTS.md). Published weights have no such layer: leave it off
    # with them. Opt-in: older checkpoints load unchanged.
    keypoint_tokens: int = 0
    # With keypoint_tokens: the keypoint net is FiLM-conditioned on the prompt (SpatialKeypoints; its token
    # embeddings pooled by a learned query), so its maps can find the object the prompt names by colour: the sim
    # tasks name the target among cubes of random colours. Opt-in.
    keypoint_film: bool = False
    # With keypoint_tokens: one token per keypoint (its (x, y), the features and RGB under it, an index embedding)
    # instead of one per camera, so the LM can select the keypoint whose colour the prompt names by attention.
    # Opt-in.
    keypoint_per_token: bool = False
    # With keypoint_tokens: Q more keypoints per camera whose maps are asked by the prompt: map_j(p) = q_j . f(p),
    # f the keypoint net's hidden features at pixel p, q_j a query pooled from the prompt's token embeddings by a
    # learned attention (with positions, so a query can take the word in one slot of the template: the target's
    # colour) and projected to the feature width. The prompt-times-image product that grounding a colour word
    # needs is then in the architecture, not left to the LM. Spatial softmax and tokens as for the others. Opt-in.
    keypoint_prompt_queries: int = 0
    # With keypoint_tokens, training only (model.train(), like dropout): each sample's SigLIP patch tokens of a camera
    # are masked with this probability, its keypoint tokens kept, so the policy must learn to act from the
    # keypoints (a policy that fits the demos through the patch tokens alone ignores them; docs/RESULTS.md). 0 = off.
    patch_token_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StateConfig:
    """Compact `state` backbone: MLP encoder over normalised proprio + privileged state, MLP flow head."""

    backbone: str = "state"
    hidden: int = 256
    embed_dim: int = 128
    head_hidden: int = 512
    head_depth: int = 3
    time_dim: int = 64
    horizon: int = 10
    action_dim: int = 32
    real_action_dim: int = 7
    state_dim: int = 7
    privileged_dim: int = 0
    camera_names: list[str] = field(default_factory=list)
    # Opt-in (get_config("state", delta_actions=True, ...) or SFTConfig.overrides); all off = the original model,
    # and checkpoints written before these fields existed load unchanged. Measured in
    # bench/results/sft_success_state_flags_*.json: they did not raise closed-loop success, so they stay off.
    delta_actions: bool = False  # arm joints predicted relative to the current joint state (gripper absolute)
    privileged_norm: bool = False  # privileged state standardised with stored mean/std buffers
    tool_features: bool = False  # add tool0 pose (FK of the arm joints, URDF) and object-minus-tool positions
    # Flow head: "mlp" (above) or "transformer", a diagnostic copy of pi05's action-expert shape on this backbone's
    # inputs: one token per chunk step, adaRMS time conditioning, attention to one conditioning token (the encoder
    # embedding, as pi05's expert reads the state from a prefix token). head_width / head_layers / head_heads size it
    # (pi05-tiny's expert: 64 / 2 / 2; MLP 4x width).
    head: str = "mlp"
    # Encoder: "mlp" (above) or "linear" (one linear map to embed_dim, as pi05's continuous_state token), diagnostic.
    encoder: str = "mlp"
    head_width: int = 64
    head_layers: int = 2
    head_heads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pi05_tiny() -> Pi05Config:
    return Pi05Config(vision_width=64, vision_depth=2, vision_heads=2, vision_mlp=256, image_size=32, patch_size=8,
                      width=128, depth=2, mlp=512, heads=2, kv_heads=1, head_dim=32, vocab_size=None,
                      expert_width=64, expert_mlp=256, horizon=10, action_dim=32, max_token_len=48,
                      zero_padded_actions=True)


def _pi05_small() -> Pi05Config:
    """~10 M parameters, sized for few-shot pixel SFT on 2 CPU cores (bench/results/pi05small_profile.json):
    64 px images in 16 px patches (16 tokens per camera), a 32-token prompt budget (the longest sim prompt with
    the 7 state bins is 23 tokens), 4 layers of width 256. The 22.5 M predecessor (patch 8, 64-token budget,
    6 x 384) cost ~10x more per SFT step; its checkpoints still load through their own config.json."""
    return Pi05Config(vision_width=128, vision_depth=4, vision_heads=2, vision_mlp=512, image_size=64, patch_size=16,
                      width=256, depth=4, mlp=1024, heads=4, kv_heads=1, head_dim=64, vocab_size=None,
                      expert_width=256, expert_mlp=1024, horizon=10, action_dim=32, max_token_len=32,
                      zero_padded_actions=True)


def _pi05_small_v1() -> Pi05Config:
    """The previous pi05-small (22.5 M params; 7.8-26 s per SFT step on 2 shared cores), for comparisons only."""
    return Pi05Config(vision_width=192, vision_depth=4, vision_heads=3, vision_mlp=768, image_size=64, patch_size=8,
                      width=384, depth=6, mlp=1536, heads=4, kv_heads=1, head_dim=64, vocab_size=None,
                      expert_width=256, expert_mlp=1024, horizon=10, action_dim=32, max_token_len=64)


CONFIGS = {
    "pi05": Pi05Config,
    "pi05-small": _pi05_small,
    "pi05-small-v1": _pi05_small_v1,
    "pi05-tiny": _pi05_tiny,
    "state": StateConfig,
}


def get_config(name: str, **overrides: Any) -> Pi05Config | StateConfig:
    """A fresh config by name (`pi05`, `pi05-small`, `pi05-tiny`, `state`) with field overrides."""
    if name not in CONFIGS:
        raise KeyError(f"unknown policy config {name!r}; known: {sorted(CONFIGS)}")
    cfg = CONFIGS[name]()
    return dataclasses.replace(cfg, **overrides)


def config_from_dict(d: dict[str, Any]) -> Pi05Config | StateConfig:
    """Rebuild a config from `to_dict()` output; unknown fields are an error (a foreign or newer config)."""
    backbone = d.get("backbone")
    cls = {"pi05": Pi05Config, "state": StateConfig}.get(backbone)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"config backbone {backbone!r} is not one of 'pi05', 'state'")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)} for backbone {backbone}")
    return cls(**d)

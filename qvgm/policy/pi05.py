"""pi0.5 in PyTorch: PaliGemma prefix (transformers' SigLIP + Gemma, random init from configs) and an action
expert written here (Gemma-style layers with adaRMSNorm time conditioning) sharing attention layer by layer.

Attention: per layer, Q/K/V of prefix tokens (VLM weights) and suffix tokens (expert weights) go through ONE
attention. Prefix tokens attend bidirectionally to valid prefix tokens only; suffix (action) tokens attend to
valid prefix tokens and all suffix tokens. Hence `encode` caches the per-layer prefix K/V (after RoPE) once
per observation and `velocity` runs only the expert over the cache.

Flow-time convention (openpi): t = 1 noise, t = 0 clean; x_t = t * eps + (1 - t) * a, v target = eps - a.
Module names mirror openpi's `paligemma_with_expert` so published weights map by key (see weights_import.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb
from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel

from qvgm.policy.config import Pi05Config
from qvgm.policy.flow import FlowPolicyBase, batch_time, sinusoidal_time_embedding
from qvgm.policy.processor import STATE_BINS, NormStats, Processor
from qvgm.policy.rl_token import RLToken, RLTokenConfig


class SpatialKeypoints(nn.Module):
    """Images [B, 3, S, S] in [-1, 1] -> keypoint tokens [B, T, width]: a small conv net (3x3, 3x3, 1x1; `channels`
    wide) gives K feature maps; a spatial softmax turns each into its expected (x, y) in [-1, 1] (x left to right,
    y top to bottom). Pooled (T = 1): the 2K numbers are projected linearly to one token. `per_token` (T = K): one
    token per keypoint from its (x, y), what the image holds there (the softmax-weighted mean of the hidden features
    and of the RGB) and a learned embedding of its index, so the LM can pick a keypoint by attention (the one whose
    colour the prompt names) instead of reading a fixed mix of all. With `cond_width`, a conditioning vector
    [B, cond_width] (the prompt) scales and shifts both hidden layers' channels (FiLM, as RT-1 conditions its image
    tokenizer on the instruction; zero-initialised, so unconditioned at first): the maps can follow the object the
    prompt names. With `prompt_queries` Q > 0, Q more maps are given per image as queries [B, Q, channels]
    (PromptQueries): map_j = query_j . hidden features per pixel / sqrt(channels); their keypoints follow the K
    learned ones everywhere (coordinates, tokens)."""

    def __init__(self, k: int, width: int, channels: int = 32, cond_width: int = 0, per_token: bool = False,
                 prompt_queries: int = 0) -> None:
        super().__init__()
        self.conv = nn.ModuleList([nn.Conv2d(3, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1),
                                   nn.Conv2d(channels, k, 1)])
        self.per_token = per_token
        self.channels, self.prompt_queries = channels, prompt_queries
        n = k + prompt_queries  # keypoints: the K learned maps, then the Q prompt-query maps
        self.proj = nn.Linear(2 + channels + 3 if per_token else 2 * n, width)
        self.index = nn.Parameter(torch.randn(n, width) * 0.02) if per_token else None
        self.film = nn.Linear(cond_width, 4 * channels) if cond_width else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        # With keep_coordinates, forward() keeps its coordinates [B, K + Q, 2] (with their graph) in
        # last_coordinates, so a training loss on them needs no second pass through the conv net (SFT keypoint_aux)
        self.keep_coordinates = False
        self.last_coordinates: torch.Tensor | None = None

    def keypoints(self, images: torch.Tensor, cond: torch.Tensor | None = None, appearance: bool = True,
                  queries: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[B, 3, S, S] (and cond [B, cond_width] with FiLM, queries [B, Q, channels] with prompt queries) ->
        (coordinates [B, K + Q, 2] (x, y) in [-1, 1], the hidden features under each keypoint's softmax
        [B, K + Q, channels], the RGB under it [B, K + Q, 3] in [-1, 1]); without `appearance` the last two are None
        (not computed)."""
        if (self.film is None) != (cond is None):
            raise ValueError("SpatialKeypoints: a conditioning vector is needed exactly when the keypoints have FiLM")
        if (queries is None) != (self.prompt_queries == 0) or (
                queries is not None and tuple(queries.shape[1:]) != (self.prompt_queries, self.channels)):
            raise ValueError(f"SpatialKeypoints: expected prompt queries [B, {self.prompt_queries}, {self.channels}]"
                             f"{' (none)' if not self.prompt_queries else ''}, got "
                             f"{None if queries is None else tuple(queries.shape)}")
        film = self.film(cond.to(self.film.weight.dtype)).chunk(4, dim=-1) if self.film is not None else None
        h = images
        for i, conv in enumerate(self.conv):
            if i == 2:
                hidden = h
            h = conv(h)
            if i < 2:
                if film is not None:
                    h = h * (1 + film[2 * i][:, :, None, None]) + film[2 * i + 1][:, :, None, None]
                h = F.gelu(h)
        b, k, hh, ww = h.shape
        maps = h.flatten(2).float()  # [B, K, S * S]
        if queries is not None:  # + one map per prompt query: its dot product with the features at each pixel
            asked = torch.einsum("bqc,bcp->bqp", queries.float(), hidden.flatten(2).float()) / math.sqrt(self.channels)
            maps = torch.cat([maps, asked], dim=1)
            k = maps.shape[1]
        p = torch.softmax(maps, dim=-1)  # [B, K (+ Q), S * S]
        xs = torch.linspace(-1.0, 1.0, ww, device=h.device)
        ys = torch.linspace(-1.0, 1.0, hh, device=h.device)
        pm = p.view(b, k, hh, ww)
        xy = torch.stack([(pm.sum(2) * xs).sum(-1), (pm.sum(3) * ys).sum(-1)], dim=-1)
        if not appearance:
            return xy, None, None
        feats = torch.einsum("bkp,bcp->bkc", p, hidden.flatten(2).float())
        rgb = torch.einsum("bkp,bcp->bkc", p, images.flatten(2).float())
        return xy, feats, rgb

    def coordinates(self, images: torch.Tensor, cond: torch.Tensor | None = None,
                    queries: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, S, S] (cond / queries as for keypoints) -> keypoint coordinates [B, K + Q, 2] (x, y) in [-1, 1]."""
        return self.keypoints(images, cond, appearance=False, queries=queries)[0]

    def forward(self, images: torch.Tensor, cond: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """-> tokens [B, 1, width] (pooled) or [B, K + Q, width] (per_token)."""
        xy, feats, rgb = self.keypoints(images, cond, appearance=self.per_token, queries=queries)
        self.last_coordinates = xy if self.keep_coordinates else None
        dtype = self.proj.weight.dtype
        if not self.per_token:
            return self.proj(xy.flatten(1).to(dtype))[:, None]
        return self.proj(torch.cat([xy, feats, rgb], dim=-1).to(dtype)) + self.index.to(dtype)


class PromptQueries(nn.Module):
    """The prompt's token embeddings [B, L, width] and mask [B, L] -> Q query vectors [B, Q, channels] for
    SpatialKeypoints' prompt-query maps. Query j pools the embeddings with its own softmax attention, scored on the
    embedding plus a learned position embedding (so it can take the word in one slot of a template, e.g. the target's
    colour in "pick up the red cube ..."), normalises it (zero mean, unit variance over the width) and projects it
    (no position) to the feature width."""

    def __init__(self, q: int, width: int, channels: int, max_len: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(max_len, width))
        self.attention = nn.Parameter(torch.randn(q, width) * 0.02)
        self.proj = nn.Parameter(torch.randn(q, width, channels) * width ** -0.5)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = embeddings.float()
        if e.shape[1] > self.position.shape[0]:
            raise ValueError(f"PromptQueries: {e.shape[1]} prompt tokens, positions for {self.position.shape[0]}")
        scores = torch.einsum("blw,qw->bql", e + self.position[: e.shape[1]].float(), self.attention.float())
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        pooled = torch.einsum("bql,blw->bqw", scores.softmax(dim=-1), e)
        # unit scale per dim before the projection: the LM's embeddings start at ~0.02 per dim, which would leave
        # every query ~0, every asked map flat and its keypoint at the image centre with almost no gradient
        pooled = F.layer_norm(pooled, pooled.shape[-1:])
        return torch.einsum("bqw,qwc->bqc", pooled, self.proj.float())


class AdaRMSNorm(nn.Module):
    """RMSNorm conditioned on c: y = rms(x) * (1 + scale) + shift; also returns gate for x + gate * f(y).

    `dense`: Linear(cond_dim -> 3 * dim) producing (scale, shift, gate), zero-initialised (weight and bias),
    so at init scale = shift = gate = 0.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, L, dim], cond [B, cond_dim] -> (normed [B, L, dim], gate [B, 1, dim])."""
        dtype = x.dtype
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond).float()[:, None].chunk(3, dim=-1)
        return (normed * (1.0 + scale) + shift).to(dtype), gate.to(dtype)


class ExpertAttention(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        w, hd = cfg.expert_width, cfg.head_dim
        self.q_proj = nn.Linear(w, cfg.heads * hd, bias=False)
        self.k_proj = nn.Linear(w, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(w, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * hd, w, bias=False)


class ExpertMLP(nn.Module):
    """Gemma MLP: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class ExpertLayer(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.self_attn = ExpertAttention(cfg)
        self.mlp = ExpertMLP(cfg.expert_width, cfg.expert_mlp)
        self.input_layernorm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.rms_eps)
        self.post_attention_layernorm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.rms_eps)


class ExpertBody(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(cfg) for _ in range(cfg.depth))
        self.norm = AdaRMSNorm(cfg.expert_width, cfg.expert_width, cfg.rms_eps)


class GemmaExpert(nn.Module):
    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        self.model = ExpertBody(cfg)


class PaliGemmaHolder(nn.Module):
    """Holds transformers' PaliGemmaModel as `.model` (keys `paligemma.model.{vision_tower,...}` like openpi)."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        vision = SiglipVisionConfig(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp,
                                    num_hidden_layers=cfg.vision_depth, num_attention_heads=cfg.vision_heads,
                                    image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False,
                                    projection_dim=cfg.width)
        text = GemmaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp,
                           num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                           num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                           hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.rms_eps)
        pg = PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=cfg.width,
                             image_token_index=cfg.vocab_size)
        pg.vision_config.vision_use_head = False
        pg.text_config.vocab_size = cfg.vocab_size
        self.model = PaliGemmaModel(pg)


@dataclass
class Pi05Context:
    """Cached prefix: per-layer K/V [B, kv_heads, P, head_dim] (RoPE applied), key mask [B, P], the number of
    valid prefix tokens [B] (suffix positions start there), the final-norm prefix embedding [B, P, width], and with
    `delta_actions` the current joint state in normalised action units [B, 1, D] (FlowPolicyBase.delta_anchor),
    with `state_film` the state's share of the expert's adaRMS conditioning [B, expert_width]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix_mask: torch.Tensor
    prefix_len: torch.Tensor
    prefix_out: torch.Tensor
    anchor: torch.Tensor | None = None
    state_cond: torch.Tensor | None = None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d], allowed bool [B, Lq, Lk] -> [B, Lq, Hq * d]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)
    b, h, lq, d = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * d)


class Pi05Model(nn.Module):
    """The pi0.5 network (no pre/post-processing). See module docstring for the attention pattern."""

    def __init__(self, cfg: Pi05Config) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("Pi05Config.vocab_size is unset (build through Pi05Policy with a tokenizer)")
        self.cfg = cfg
        self.paligemma = PaliGemmaHolder(cfg)
        self.gemma_expert = GemmaExpert(cfg)
        self.action_in_proj = nn.Linear(cfg.action_dim, cfg.expert_width)
        self.action_out_proj = nn.Linear(cfg.expert_width, cfg.action_dim)
        self.time_mlp_in = nn.Linear(cfg.expert_width, cfg.expert_width)
        self.time_mlp_out = nn.Linear(cfg.expert_width, cfg.expert_width)
        self.scale = cfg.head_dim ** -0.5
        # continuous_state: [normalised state, clipped privileged] -> one prefix token after the prompt
        self.state_proj = (nn.Linear(cfg.state_dim + cfg.privileged_dim, cfg.width) if cfg.continuous_state
                           else None)
        # state_film: the same vector into the time MLP's hidden layer (zero init: time-only conditioning at first)
        self.state_cond_proj = (nn.Linear(cfg.state_dim + cfg.privileged_dim, cfg.expert_width) if cfg.state_film
                                else None)
        if self.state_cond_proj is not None:
            nn.init.zeros_(self.state_cond_proj.weight)
            nn.init.zeros_(self.state_cond_proj.bias)
        # keypoint_tokens: K spatial-softmax keypoints per camera -> one more token after its SigLIP tokens (K more
        # with keypoint_per_token)
        # (keypoint_film: FiLM-conditioned on the prompt, pooled by a learned query over its token embeddings)
        # (keypoint_prompt_queries: Q more maps per camera asked by the prompt, PromptQueries)
        if (cfg.keypoint_film or cfg.keypoint_per_token or cfg.patch_token_dropout
                or cfg.keypoint_prompt_queries) and not cfg.keypoint_tokens:
            raise ValueError("keypoint_film / keypoint_per_token / patch_token_dropout / keypoint_prompt_queries need "
                             "keypoint_tokens > 0 (the keypoints they shape)")
        if not 0.0 <= cfg.patch_token_dropout < 1.0:
            raise ValueError(f"patch_token_dropout must be a probability in [0, 1), got {cfg.patch_token_dropout}")
        if cfg.keypoint_prompt_queries < 0:
            raise ValueError(f"keypoint_prompt_queries must be >= 0, got {cfg.keypoint_prompt_queries}")
        self.keypoints = (SpatialKeypoints(cfg.keypoint_tokens, cfg.width,
                                           cond_width=cfg.width if cfg.keypoint_film else 0,
                                           per_token=cfg.keypoint_per_token,
                                           prompt_queries=cfg.keypoint_prompt_queries)
                          if cfg.keypoint_tokens else None)
        self.keypoint_query = (nn.Parameter(torch.zeros(cfg.width)) if cfg.keypoint_tokens and cfg.keypoint_film
                               else None)
        self.keypoint_prompt = (PromptQueries(cfg.keypoint_prompt_queries, cfg.width, self.keypoints.channels,
                                              cfg.max_token_len)
                                if self.keypoints is not None and cfg.keypoint_prompt_queries else None)

    @property
    def lm(self) -> nn.Module:
        return self.paligemma.model.language_model

    @torch.no_grad()
    def init_ordinal_bins(self, bin_ids: list[int]) -> None:
        """Set the embedding rows of the state-bin tokens (`bin_ids[b]` = token id of bin b, b = 0..n-1) to
        Fourier features of the bin centre v in [-1, 1]: [cos(f_j v), sin(f_j v)], frequencies f_j geometric from
        pi / 2 to 64 pi, so bins a few apart have similar rows and distant ones do not. Rows are scaled to the mean
        norm of the other rows (the LM's init scale)."""
        emb = self.lm.embed_tokens.weight
        n, width = len(bin_ids), emb.shape[1]
        v = (torch.arange(n, dtype=torch.float64) + 0.5) / n * 2.0 - 1.0
        freqs = math.pi * torch.logspace(-1.0, 6.0, width // 2, base=2.0, dtype=torch.float64)
        feats = torch.cat([torch.cos(v[:, None] * freqs), torch.sin(v[:, None] * freqs)], dim=1)
        feats = torch.nn.functional.pad(feats, (0, width - feats.shape[1]))
        ids = torch.tensor(bin_ids, device=emb.device)
        others = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
        others[ids] = False
        scale = emb[others].float().norm(dim=1).mean() if others.any() else torch.tensor(1.0)
        feats = feats / feats.norm(dim=1, keepdim=True) * scale.double().cpu()
        emb[ids] = feats.to(emb.dtype).to(emb.device)

    # --- prefix -------------------------------------------------------------------------------------------
    def prompt_vector(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """tokens [B, L], token_mask [B, L] -> [B, width]: the prompt's token embeddings pooled by softmax attention
        to a learned query (keypoint_film's conditioning; zero query = the mean over the valid tokens)."""
        e = self.lm.embed_tokens(tokens).float()
        scores = (e @ self.keypoint_query.float()).masked_fill(~token_mask.bool(), float("-inf"))
        return torch.einsum("bl,blw->bw", scores.softmax(dim=1), e)

    def keypoint_conditioning(self, tokens: torch.Tensor | None, token_mask: torch.Tensor | None, n: int
                              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the keypoint net reads from the prompt, repeated for each of the n cameras (batch-major, as the
        images are flattened): (FiLM vector [B * n, width] with keypoint_film, prompt queries [B * n, Q, channels]
        with keypoint_prompt_queries), None where off. tokens / token_mask [B, L] are needed when either is on."""
        if self.keypoint_query is None and self.keypoint_prompt is None:
            return None, None
        if tokens is None or token_mask is None:
            raise ValueError("keypoint_film / keypoint_prompt_queries: the keypoints read the prompt; pass tokens and "
                             "token_mask")
        cond = (self.prompt_vector(tokens, token_mask).repeat_interleave(n, dim=0)
                if self.keypoint_query is not None else None)
        queries = None
        if self.keypoint_prompt is not None:
            queries = self.keypoint_prompt(self.lm.embed_tokens(tokens), token_mask).repeat_interleave(n, dim=0)
        return cond, queries

    def image_tokens(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor | None = None,
                     token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, N, 3, S, S] in [-1, 1], image_masks [B, N] -> (SigLIP tokens projected to the LM width
        [B, N * T, width], valid [B, N * T]); T = (S / patch)^2 per camera (+ 1 with keypoint_tokens, + K + Q with
        keypoint_per_token), cameras in order. With keypoint_film or keypoint_prompt_queries the keypoints read the
        prompt: `tokens` / `token_mask` [B, L] are then needed. In training mode, patch_token_dropout masks a
        camera's patch tokens (not its keypoint tokens) per sample."""
        b, n = images.shape[:2]
        pm = self.paligemma.model
        dtype = pm.multi_modal_projector.linear.weight.dtype
        feats = pm.vision_tower(pixel_values=images.flatten(0, 1).to(dtype)).last_hidden_state
        img = pm.multi_modal_projector(feats)  # [B * N, T, width]
        if self.keypoints is not None:  # + keypoint tokens per camera: T + 1 (T + K + Q with keypoint_per_token)
            cond, queries = self.keypoint_conditioning(tokens, token_mask, n)
            kp = self.keypoints(images.flatten(0, 1).to(dtype), cond, queries=queries)
            img = torch.cat([img, kp.to(img.dtype)], dim=1)
        patches, tpi = feats.shape[1], img.shape[1]
        valid = image_masks[:, :, None].expand(b, n, tpi)
        if self.training and self.cfg.patch_token_dropout > 0:  # the keypoint tokens must carry the camera
            keep = torch.rand(b, n, device=valid.device) >= self.cfg.patch_token_dropout
            valid = torch.cat([valid[:, :, :patches] & keep[:, :, None], valid[:, :, patches:]], dim=2)
        return img.reshape(b, n * tpi, -1), valid.reshape(b, n * tpi)

    def embed_prefix(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                     token_mask: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, N, 3, S, S] in [-1, 1], image_masks [B, N], tokens [B, L], token_mask [B, L]
        -> (embeddings [B, N * T + L, width], valid mask [B, N * T + L]). Text embeddings scaled by sqrt(width).
        With `continuous_state`, `state` [B, state_dim + privileged_dim] adds one token at the end (+1 on both)."""
        b = images.shape[0]
        img, img_mask = self.image_tokens(images, image_masks, tokens, token_mask)
        txt = self.lm.embed_tokens(tokens) * math.sqrt(self.cfg.width)
        parts, masks = [img, txt.to(img.dtype)], [img_mask, token_mask.bool()]
        if self.state_proj is not None:
            if state is None:
                raise ValueError("continuous_state: the model needs the state vector")
            parts.append(self.state_proj(state.to(self.state_proj.weight.dtype))[:, None].to(img.dtype))
            masks.append(torch.ones(b, 1, dtype=torch.bool, device=img_mask.device))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def _qkv(self, attn: nn.Module, h: torch.Tensor, hd: int) -> tuple[torch.Tensor, ...]:
        b, seq = h.shape[:2]
        q = attn.q_proj(h).view(b, seq, -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, seq, -1, hd).transpose(1, 2)
        v = attn.v_proj(h).view(b, seq, -1, hd).transpose(1, 2)
        return q, k, v

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(x, pos)

    def _time_cond(self, t: torch.Tensor, state_cond: torch.Tensor | None = None) -> torch.Tensor:
        """t [B] (1 = noise) [+ state_film's state_cond [B, expert_width]] -> adaRMS conditioning [B, expert_width]."""
        emb = sinusoidal_time_embedding(t, self.cfg.expert_width).to(self.time_mlp_in.weight.dtype)
        h = self.time_mlp_in(emb)
        if state_cond is not None:
            h = h + state_cond.to(h.dtype)
        return F.silu(self.time_mlp_out(F.silu(h)))

    def state_condition(self, state: torch.Tensor | None) -> torch.Tensor | None:
        """state_film: state vector [B, state_dim + privileged_dim] -> its share of the time MLP's hidden layer."""
        if self.state_cond_proj is None:
            return None
        if state is None:
            raise ValueError("state_film: the model needs the state vector")
        return self.state_cond_proj(state.to(self.state_cond_proj.weight.dtype))

    def encode_prefix(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                      token_mask: torch.Tensor, state: torch.Tensor | None = None) -> Pi05Context:
        """Run the VLM over the prefix once; cache per-layer K/V. Prefix attention is bidirectional."""
        x, mask = self.embed_prefix(images, image_masks, tokens, token_mask, state)
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self._rope(x, pos)
        allowed = mask[:, None, :].expand(-1, x.shape[1], -1)
        keys, values = [], []
        hd = self.cfg.head_dim
        for layer in self.lm.layers:
            h = layer.input_layernorm(x)
            q, k, v = self._qkv(layer.self_attn, h, hd)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys.append(k)
            values.append(v)
            x = x + layer.self_attn.o_proj(_attend(q, k, v, allowed, self.scale))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return Pi05Context(keys, values, mask, mask.long().sum(-1), self.lm.norm(x),
                           state_cond=self.state_condition(state))

    # --- suffix -------------------------------------------------------------------------------------------
    def suffix_velocity(self, x_t: torch.Tensor, t: torch.Tensor, ctx: Pi05Context) -> torch.Tensor:
        """Expert pass over cached prefix K/V: x_t [B, H, D], t [B] -> v [B, H, D]."""
        cfg = self.cfg
        b, h_len = x_t.shape[:2]
        a = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        cond = self._time_cond(t, ctx.state_cond)
        pos = ctx.prefix_len[:, None] + torch.arange(h_len, device=a.device)[None]
        cos, sin = self._rope(a, pos)
        allowed = torch.cat([ctx.prefix_mask, torch.ones(b, h_len, dtype=torch.bool, device=a.device)], dim=1)
        allowed = allowed[:, None, :].expand(-1, h_len, -1)
        for i, layer in enumerate(self.gemma_expert.model.layers):
            h, gate = layer.input_layernorm(a, cond)
            q, k, v = self._qkv(layer.self_attn, h, cfg.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([ctx.keys[i], k], dim=2)
            v = torch.cat([ctx.values[i], v], dim=2)
            a = a + gate * layer.self_attn.o_proj(_attend(q, k, v, allowed, self.scale))
            h, gate = layer.post_attention_layernorm(a, cond)
            a = a + gate * layer.mlp(h)
        a, _ = self.gemma_expert.model.norm(a, cond)
        return self.action_out_proj(a).float()

    def joint_forward(self, images: torch.Tensor, image_masks: torch.Tensor, tokens: torch.Tensor,
                      token_mask: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, state: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix and suffix in one pass (training path, no cache): returns (prefix_out [B, P, width] after the
        final norm, v [B, H, D]). Same attention pattern as encode_prefix + suffix_velocity."""
        cfg = self.cfg
        xp, pmask = self.embed_prefix(images, image_masks, tokens, token_mask, state)
        b, p_len = pmask.shape
        a = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        h_len = a.shape[1]
        cond = self._time_cond(t, self.state_condition(state))
        ppos = (pmask.long().cumsum(-1) - 1).clamp_min(0)
        spos = pmask.long().sum(-1)[:, None] + torch.arange(h_len, device=a.device)[None]
        pcos, psin = self._rope(xp, ppos)
        scos, ssin = self._rope(a, spos)
        key_valid = torch.cat([pmask, torch.ones(b, h_len, dtype=torch.bool, device=a.device)], dim=1)
        is_suffix_row = torch.arange(p_len + h_len, device=a.device) >= p_len
        is_prefix_col = torch.arange(p_len + h_len, device=a.device) < p_len
        allowed = key_valid[:, None, :] & (is_suffix_row[:, None] | is_prefix_col[None, :])[None]
        for layer, ex in zip(self.lm.layers, self.gemma_expert.model.layers, strict=True):
            hp = layer.input_layernorm(xp)
            hs, gate = ex.input_layernorm(a, cond)
            qp, kp, vp = self._qkv(layer.self_attn, hp, cfg.head_dim)
            qs, ks, vs = self._qkv(ex.self_attn, hs, cfg.head_dim)
            qp, kp = apply_rotary_pos_emb(qp, kp, pcos, psin)
            qs, ks = apply_rotary_pos_emb(qs, ks, scos, ssin)
            att = _attend(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), allowed, self.scale)
            xp = xp + layer.self_attn.o_proj(att[:, :p_len])
            a = a + gate * ex.self_attn.o_proj(att[:, p_len:])
            xp = xp + layer.mlp(layer.post_attention_layernorm(xp))
            hs, gate = ex.post_attention_layernorm(a, cond)
            a = a + gate * ex.mlp(hs)
        a, _ = self.gemma_expert.model.norm(a, cond)
        return self.lm.norm(xp), self.action_out_proj(a).float()


class Pi05Policy(FlowPolicyBase):
    """FlowPolicy over Pi05Model. Context = Pi05Context (cached prefix K/V).

    critic_features: the RL token z_rl when the config has `rl_token` (METHOD.md §2, qvgm.policy.rl_token), else
    the mean-pooled final prefix embedding over valid tokens [B, width].
    """

    def __init__(self, cfg: Pi05Config, tokenizer: Tokenizer, norm_stats: NormStats) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            cfg.vocab_size = tokenizer.get_vocab_size()
        elif tokenizer.get_vocab_size() > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens > model vocab {cfg.vocab_size}")
        self.config = cfg
        self.horizon = cfg.horizon
        self.action_dim = cfg.action_dim
        self.real_action_dim = cfg.real_action_dim
        self.model = Pi05Model(cfg)
        if cfg.ordinal_state_bins:
            bin_ids = [tokenizer.token_to_id(str(b)) for b in range(STATE_BINS)]
            if any(i is None for i in bin_ids):
                raise ValueError("ordinal_state_bins: the tokenizer has no single token for every state bin 0..255")
            self.model.init_ordinal_bins(bin_ids)
        self.processor = Processor(camera_names=cfg.camera_names, image_size=cfg.image_size,
                                   state_dim=cfg.state_dim, real_action_dim=cfg.real_action_dim,
                                   action_dim=cfg.action_dim, norm_stats=norm_stats, tokenizer=tokenizer,
                                   max_token_len=cfg.max_token_len, privileged_dim=cfg.privileged_dim)
        self.rl_token: RLToken | None = None
        if cfg.rl_token is not None:
            self.rl_token = RLToken(RLTokenConfig.from_dict(cfg.rl_token))
        self.init_delta_anchor(cfg.delta_actions, cfg.state_dim, norm_stats)

    @staticmethod
    def _prefix_args(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return inputs["images"], inputs["image_masks"], inputs["tokens"], inputs["token_mask"]

    def _state_vector(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """continuous_state / state_film: [normalised state, (normalised) privileged clipped to [-1, 1]]
        [B, state_dim + privileged_dim]; None without either."""
        if not (self.config.continuous_state or self.config.state_film):
            return None
        parts = [inputs["state"]]
        if self.config.privileged_dim:
            parts.append(inputs["privileged"].clamp(-1.0, 1.0))
        return torch.cat(parts, dim=1)

    def encode(self, inputs: dict[str, torch.Tensor]) -> Pi05Context:
        """Prefix (images + prompt with discretised state) -> cached K/V context (+ the delta-action anchor)."""
        ctx = self.model.encode_prefix(*self._prefix_args(inputs), self._state_vector(inputs))
        ctx.anchor = self.delta_anchor(inputs["state"])
        return ctx

    def batch_size(self, context: Pi05Context) -> int:
        return context.prefix_mask.shape[0]

    @property
    def loss_dims(self) -> int:
        """All action_dim dims in openpi's convention (the padding is denoised too); the real ones when the padding
        is zeroed (Pi05Config.zero_padded_actions)."""
        return self.real_action_dim if self.config.zero_padded_actions else self.action_dim

    def _expert_input(self, x_t: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        x = self.anchored_input(x_t, t, anchor)
        if self.config.zero_padded_actions:
            x = F.pad(x[..., : self.real_action_dim], (0, self.action_dim - self.real_action_dim))
        return x

    def _expert_output(self, v: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        if self.config.zero_padded_actions:
            v = F.pad(v[..., : self.real_action_dim], (0, self.action_dim - self.real_action_dim))
        return self.anchored_output(v, anchor)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: Pi05Context) -> torch.Tensor:
        """v(x_t, t | cached prefix): x_t [B, H, D] normalised, t [B] (1 = noise) -> [B, H, D]."""
        t = batch_time(t, x_t.shape[0], x_t.device)
        v = self.model.suffix_velocity(self._expert_input(x_t, t, context.anchor), t, context)
        return self._expert_output(v, context.anchor)

    def velocity_uncached(self, inputs: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x_t, t) from one joint prefix+suffix pass (no cache; the training path)."""
        t = batch_time(t, x_t.shape[0], x_t.device)
        anchor = self.delta_anchor(inputs["state"])
        v = self.model.joint_forward(*self._prefix_args(inputs), self._expert_input(x_t, t, anchor), t,
                                     self._state_vector(inputs))[1]
        return self._expert_output(v, anchor)

    def critic_features(self, context: Pi05Context) -> torch.Tensor:
        """z_rl [B, rl_token.dim] when the checkpoint has a trained RL token (METHOD.md §2); otherwise [B, width]:
        the mean of the final-norm prefix embeddings over valid prefix tokens."""
        if self.rl_token is not None:
            return self.rl_token.encode(context.prefix_out.float(), context.prefix_mask).float()
        m = context.prefix_mask.to(context.prefix_out.dtype)[..., None]
        return ((context.prefix_out * m).sum(1) / m.sum(1).clamp_min(1.0)).float()

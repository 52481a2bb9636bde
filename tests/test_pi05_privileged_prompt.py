"""pi05's sim diagnostic `privileged_dim`: the object state appended to the prompt's state bins, so SFT can be told
where the objects are (bench/sft_success.py separates "cannot localise from pixels" from "cannot learn the task").
Real rendered sim demos, real pi05-tiny training and a closed-loop episode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, load_demo_data, rollout, train_sft
from qvgm.policy import load_policy, make_policy, save_policy
from qvgm.policy.pi05 import AdaRMSNorm
from qvgm.policy.processor import NormStats, ObservationError
from qvgm.policy.rl_token import prefix_length

torch.set_num_threads(1)  # 2 shared CPU cores

TASKS = ["pick up the red cube", "push the blue block to the left"]


def make_obs(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"images": {"base": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
                       "wrist": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
            "state": rng.uniform(-1, 1, 7).astype(np.float32), "prompt": TASKS[seed % 2]}


def randomize_adarms(policy: torch.nn.Module) -> None:
    """adaRMS layers are zero-init (the expert ignores the prefix at init); give them weights."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, AdaRMSNorm):
                m.dense.weight.copy_(torch.randn(m.dense.weight.shape, generator=g) * 0.2)
                m.dense.bias.copy_(torch.randn(m.dense.bias.shape, generator=g) * 0.2)


def test_pi05_told_the_object_state_trains_and_acts(tmp_path: Path) -> None:
    ds = tmp_path / "cam"
    collect_demos("pick_place", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    k = data.privileged.shape[1]
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=4, seed=0, batch_size=4, checkpoint_every=4, warmup=2)
    told = train_sft(SFTConfig(out=str(tmp_path / "told"), overrides={"privileged_dim": k, "max_token_len": 48},
                               **common), data=data, progress=False)["policy"]
    proc = told.processor
    # SFT stores the told state's quantiles, so the processor hands the model values spanning [-1, 1]
    assert proc.norm_stats.privileged_q01 is not None and proc.norm_stats.privileged_q01.shape == (k,)
    p_norm = proc(data.observations(range(len(data))))["privileged"].numpy()
    moving = np.ptp(data.privileged, axis=0) > 1e-6
    assert np.all(np.percentile(p_norm[:, moving], 99, axis=0) > 0.9)
    assert np.all(np.percentile(p_norm[:, moving], 1, axis=0) < -0.9)
    obs = data.observations([0])[0]
    a, b = proc([obs]), proc([{**obs, "privileged": obs["privileged"] + 0.2}])
    n_words = int(a["token_mask"].sum())
    assert n_words == int(b["token_mask"].sum()) and not torch.equal(a["tokens"], b["tokens"])  # the bins moved
    plain = train_sft(SFTConfig(out=str(tmp_path / "plain"), overrides={"max_token_len": 48}, **common),
                      data=data, progress=False)["policy"]
    assert int(plain.processor([obs])["token_mask"].sum()) == n_words - k  # k more state bins, nothing else
    with pytest.raises(ObservationError, match="told the sim's object state"):
        proc([{key: v for key, v in obs.items() if key != "privileged"}])
    with pytest.raises(ObservationError, match="privileged"):
        proc([{**obs, "privileged": np.full(k, np.nan)}])
    # closed loop: the sim's observation carries `privileged`, the policy acts on it
    res = rollout(told, "pick_place", seed=100_000, image_size=(32, 32), max_steps=15)
    assert res["steps"] >= 1
    # a width that does not match the data is refused before training
    with pytest.raises(ValueError, match="privileged_dim=3"):
        train_sft(SFTConfig(out=str(tmp_path / "bad"), overrides={"privileged_dim": 3}, **common), data=data,
                  progress=False)
    assert not (tmp_path / "bad").exists()


def test_ordinal_state_bins_start_ordered(tmp_path: Path) -> None:
    ds = tmp_path / "cam"
    collect_demos("push", 1, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=2, seed=0, batch_size=4, warmup=1)
    pol = train_sft(SFTConfig(out=str(tmp_path / "ord"), overrides={"ordinal_state_bins": True}, **common),
                    data=data, progress=False)["policy"]
    rand = train_sft(SFTConfig(out=str(tmp_path / "rand"), **common), data=data, progress=False)["policy"]

    def bins(p) -> torch.Tensor:
        tok = p.processor.tokenizer
        e = p.model.lm.embed_tokens.weight.detach()
        rows = e[[tok.token_to_id(str(b)) for b in range(256)]]
        return torch.nn.functional.normalize(rows, dim=1)

    o, r = bins(pol), bins(rand)
    near = (o[:-1] * o[1:]).sum(1).mean()  # neighbouring bins
    far = (o[:128] * o[128:]).sum(1).mean()  # half the range apart
    assert near > 0.8 and abs(far) < 0.2
    assert (r[:-1] * r[1:]).sum(1).mean().abs() < 0.3  # the random init has no order
    # same scale as the other rows, and a saved checkpoint keeps the trained rows
    e = pol.model.lm.embed_tokens.weight.detach()
    tok = pol.processor.tokenizer
    ids = [tok.token_to_id(str(b)) for b in range(256)]
    rest = torch.ones(len(e), dtype=torch.bool)
    rest[ids] = False
    assert torch.isclose(e[ids].norm(dim=1).mean(), e[rest].norm(dim=1).mean(), rtol=0.2)
    loaded = load_policy(tmp_path / "ord")
    assert loaded.config.ordinal_state_bins
    assert torch.equal(loaded.model.lm.embed_tokens.weight, pol.model.lm.embed_tokens.weight)


@torch.no_grad()
def test_continuous_state_token_is_read_cached_and_uncached(tmp_path: Path) -> None:
    """continuous_state: one prefix token projected from [state, clipped privileged]; the cached path (encode +
    velocity) equals the training path (velocity_uncached); the prefix grows by one (rl_token.prefix_length too);
    the output depends on the object state; a checkpoint round-trips."""
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, continuous_state=True, privileged_dim=5,
                      max_token_len=40).eval()
    plain = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, max_token_len=40).eval()
    randomize_adarms(pol)
    obs = [{**make_obs(i), "privileged": np.linspace(-0.5, 0.5, 5) * (i + 1)} for i in range(2)]
    inp = pol.preprocess(obs)
    ctx = pol.encode(inp)
    assert ctx.prefix_mask.shape[1] == plain.encode(plain.preprocess(obs)).prefix_mask.shape[1] + 1
    assert ctx.prefix_mask.shape[1] == prefix_length(pol.config)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 10, 32, generator=g), torch.tensor([0.8, 0.3])
    torch.testing.assert_close(pol.velocity(x, t, ctx), pol.velocity_uncached(inp, x, t), rtol=1e-4, atol=1e-5)
    # the object state reaches the output through the token alone (same prompt tokens, only the token's input
    # differs), and the token's input is [state, privileged clipped to [-1, 1]]
    vec = pol._state_vector(inp)
    assert vec.shape == (2, 12) and torch.equal(vec[:, :7], inp["state"])
    assert torch.equal(vec[:, 7:], inp["privileged"].clamp(-1.0, 1.0))
    flipped = torch.cat([vec[:, :7], -vec[:, 7:]], dim=1)
    ctx_flipped = pol.model.encode_prefix(*pol._prefix_args(inp), flipped)
    ctx_flipped.anchor = ctx.anchor
    assert not torch.allclose(pol.velocity(x, t, ctx_flipped), pol.velocity(x, t, ctx))
    save_policy(pol, tmp_path / "ck", version="v1")
    back = load_policy(tmp_path / "ck")
    assert back.config.continuous_state and back.model.state_proj is not None
    torch.testing.assert_close(back.velocity(x, t, back.encode(back.preprocess(obs))), pol.velocity(x, t, ctx))


def test_privileged_quantiles_normalise_round_trip_and_refuse_mismatch(tmp_path: Path) -> None:
    """NormStats.with_privileged: q01 -> -1, q99 -> +1 per value, saved in norm_stats.json and loaded back;
    stats without them (older checkpoints) leave the values as observed; a width mismatch or a malformed entry is
    refused with a message naming it."""
    rng = np.random.default_rng(0)
    priv = np.column_stack([rng.uniform(0.3, 0.6, 500), rng.uniform(-0.2, 0.2, 500), np.full(500, 0.02)])
    stats = NormStats.identity(7, 7).with_privileged(priv)
    np.testing.assert_allclose(stats.privileged_q01[:2], np.quantile(priv, 0.01, axis=0)[:2])
    pol = make_policy("pi05-tiny", stats, tasks=TASKS, continuous_state=True, privileged_dim=3, max_token_len=40)
    obs = {**make_obs(0), "privileged": np.array([stats.privileged_q99[0], stats.privileged_q01[1], 0.02])}
    got = pol.preprocess([obs])["privileged"][0].numpy()
    np.testing.assert_allclose(got[:2], [1.0, -1.0], atol=1e-6)
    assert abs(got[2]) <= 1.0  # a constant value maps inside the range, not to inf
    save_policy(pol, tmp_path / "ck", version="v1")
    back = load_policy(tmp_path / "ck")
    np.testing.assert_allclose(back.processor.norm_stats.privileged_q99, stats.privileged_q99)
    torch.testing.assert_close(back.preprocess([obs])["privileged"], pol.preprocess([obs])["privileged"])
    raw = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, privileged_dim=3, max_token_len=40)
    np.testing.assert_allclose(raw.preprocess([obs])["privileged"][0].numpy(), obs["privileged"], rtol=1e-6)
    with pytest.raises(ValueError, match="3 privileged dims, config 5"):
        make_policy("pi05-tiny", stats, tasks=TASKS, privileged_dim=5, max_token_len=40)
    bad = stats.to_json()
    bad["privileged"] = {"q01": [0.0, float("nan"), 0.0], "q99": [1.0, 1.0, 1.0]}
    with pytest.raises(ValueError, match="privileged quantiles must be finite"):
        NormStats.from_json(bad)
    with pytest.raises(ValueError, match="privileged: missing field"):
        NormStats.from_json({**bad, "privileged": {"q01": [0.0]}})
    with pytest.raises(ValueError, match="finite"):
        stats.with_privileged(np.full((4, 3), np.inf))


def test_state_film_conditions_the_expert_cached_and_uncached(tmp_path: Path) -> None:
    """state_film: [state, privileged] enters the flow-time MLP (zero init: at first the same velocity as without);
    once trained (here: random weights) the velocity depends on it with the prefix tokens unchanged; cached ==
    uncached; the prefix length is unchanged; a checkpoint round-trips."""
    torch.manual_seed(0)
    kw = dict(tasks=TASKS, privileged_dim=5, max_token_len=40)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), state_film=True, **kw).eval()
    plain = make_policy("pi05-tiny", NormStats.identity(7, 7), **kw).eval()
    randomize_adarms(pol)
    plain.load_state_dict({k: v for k, v in pol.state_dict().items() if "state_cond_proj" not in k})
    obs = [{**make_obs(i), "privileged": np.linspace(-0.5, 0.5, 5) * (i + 1)} for i in range(2)]
    inp = pol.preprocess(obs)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 10, 32, generator=g), torch.tensor([0.8, 0.3])
    ctx = pol.encode(inp)
    assert ctx.state_cond is not None and ctx.state_cond.shape == (2, pol.config.expert_width)
    assert ctx.prefix_mask.shape[1] == prefix_length(pol.config)
    torch.testing.assert_close(pol.velocity(x, t, ctx), plain.velocity(x, t, plain.encode(inp)))  # zero init
    with torch.no_grad():
        pol.model.state_cond_proj.weight.copy_(torch.randn(pol.model.state_cond_proj.weight.shape, generator=g))
    ctx = pol.encode(inp)
    v = pol.velocity(x, t, ctx)
    torch.testing.assert_close(v, pol.velocity_uncached(inp, x, t), rtol=1e-4, atol=1e-5)
    vec = pol._state_vector(inp)  # same prompt tokens, only the film's input differs
    assert vec.shape == (2, 12) and torch.equal(vec[:, :7], inp["state"])
    ctx_moved = pol.model.encode_prefix(*pol._prefix_args(inp), torch.cat([vec[:, :7], -vec[:, 7:]], dim=1))
    ctx_moved.anchor = ctx.anchor
    assert torch.equal(ctx_moved.keys[0], ctx.keys[0]) and not torch.allclose(pol.velocity(x, t, ctx_moved), v)
    save_policy(pol, tmp_path / "ck", version="v1")
    back = load_policy(tmp_path / "ck")
    assert back.config.state_film
    torch.testing.assert_close(back.velocity(x, t, back.encode(back.preprocess(obs))), v)


@pytest.mark.parametrize("zero_padded", [False, True])
def test_padded_action_dims_are_denoised_or_zeroed_never_left_untrained(zero_padded: bool) -> None:
    """Pi05Config.zero_padded_actions. False (openpi): the flow loss covers all action_dim dims, so the padded
    dims' velocity is trained (they go to 0 along the path as in training). True: the padded dims are zeroed on
    the expert's input and their velocity is 0, so what the sampler leaves there cannot reach the real dims; the
    loss covers the real dims. Either way, cached and training paths agree."""
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, zero_padded_actions=zero_padded,
                      delta_actions=True).eval()
    randomize_adarms(pol)
    obs = [make_obs(i) for i in range(2)]
    inp = pol.preprocess(obs)
    ctx = pol.encode(inp)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 10, 32, generator=g), torch.tensor([0.8, 0.3])
    v = pol.velocity(x, t, ctx)
    torch.testing.assert_close(v, pol.velocity_uncached(inp, x, t), rtol=1e-4, atol=1e-5)
    x_other = x.clone()
    x_other[..., 7:] = 5.0 * torch.randn(2, 10, 25, generator=g)  # what an untrained padding drifts to
    v_other = pol.velocity(x_other, t, ctx)
    acts = torch.randn(2, 10, 32, generator=g)
    acts[..., 7:] = 0.0  # the processor's zero padding
    eps = torch.randn(2, 10, 32, generator=g)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * acts
    err = (pol.velocity_uncached(inp, x_t, t) - (eps - acts)) ** 2
    loss = pol.flow_loss(inp, acts, noise=eps, time=t)
    if zero_padded:
        assert pol.loss_dims == 7 and torch.all(v[..., 7:] == 0)
        torch.testing.assert_close(v_other, v)  # the padding does not reach the real dims
        torch.testing.assert_close(loss, err[..., :7].mean())
    else:
        assert pol.loss_dims == 32 and not torch.allclose(v_other[..., :7], v[..., :7])
        torch.testing.assert_close(loss, err.mean())  # the padded dims' velocity is trained too


@torch.no_grad()
@pytest.mark.parametrize("per_token", [False, True], ids=["pooled", "per_token"])
def test_keypoint_tokens_locate_a_blob_and_join_the_prefix(tmp_path: Path, per_token: bool) -> None:
    """keypoint_tokens: the spatial softmax returns where a feature map peaks, in [-1, 1] image coordinates (x to
    the right, y down), and (per_token) the colour under it; one token per camera (K with keypoint_per_token, each
    from its keypoint's (x, y), features, RGB and an index embedding) joins the prefix (rl_token.prefix_length too);
    cached == uncached; a masked camera's keypoint tokens are masked with it; the output depends on where a blob is;
    a checkpoint round-trips; the keypoint flags without keypoints are refused."""
    from qvgm.policy.pi05 import SpatialKeypoints

    kp = SpatialKeypoints(1, 8, per_token=per_token)
    for m in kp.conv:  # a red detector by hand: map 0 = GELU(GELU(40 (R - G - B))), every other weight 0
        torch.nn.init.zeros_(m.weight)
        torch.nn.init.zeros_(m.bias)
    c0, c1, c2 = kp.conv
    c0.weight[0, 0, 1, 1], c0.weight[0, 1, 1, 1], c0.weight[0, 2, 1, 1] = 40.0, -40.0, -40.0
    c1.weight[0, 0, 1, 1] = 1.0
    c2.weight[0, 0, 0, 0] = 1.0
    img = -torch.ones(2, 3, 32, 32)
    img[:, 1:, 10:14, 10:14] = 1.0  # a cyan distractor (G + B) in both images
    img[0, 0, 4:8, 24:28] = 1.0  # red blob top right
    img[1, 0, 20:24, 2:6] = 1.0  # bottom left
    xy, feats, rgb = kp.keypoints(img)
    assert xy.shape == (2, 1, 2) and feats.shape == (2, 1, 32) and rgb.shape == (2, 1, 3)
    xy = xy[:, 0]
    assert xy[0, 0] > 0.4 and xy[0, 1] < -0.4 and xy[1, 0] < -0.6 and xy[1, 1] > 0.1
    torch.testing.assert_close(rgb[:, 0], torch.tensor([[1.0, -1.0, -1.0]] * 2), atol=1e-3, rtol=0)  # red
    assert kp(img).shape == (2, 1, 8)

    torch.manual_seed(0)
    k = 4
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, keypoint_tokens=k,
                      keypoint_per_token=per_token).eval()
    plain = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS).eval()
    randomize_adarms(pol)
    obs = [make_obs(i) for i in range(2)]
    inp = pol.preprocess(obs)
    ctx = pol.encode(inp)
    extra = k if per_token else 1  # per camera
    assert ctx.prefix_mask.shape[1] == plain.encode(plain.preprocess(obs)).prefix_mask.shape[1] + 2 * extra
    assert ctx.prefix_mask.shape[1] == prefix_length(pol.config)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 10, 32, generator=g), torch.tensor([0.8, 0.3])
    v = pol.velocity(x, t, ctx)
    torch.testing.assert_close(v, pol.velocity_uncached(inp, x, t), rtol=1e-4, atol=1e-5)
    tokens, valid = pol.model.image_tokens(inp["images"], inp["image_masks"])
    per_cam = tokens.shape[1] // 2
    keypoint_tokens = pol.model.keypoints(inp["images"][:, 1])
    assert keypoint_tokens.shape == (2, extra, pol.config.width)
    torch.testing.assert_close(tokens[:, 2 * per_cam - extra:], keypoint_tokens)  # the last tokens of camera 2
    if per_token:
        assert not torch.allclose(keypoint_tokens[:, 0], keypoint_tokens[:, 1])  # the index embedding
    masked = {**inp, "image_masks": inp["image_masks"].clone()}
    masked["image_masks"][:, 1] = False
    assert not pol.model.image_tokens(masked["images"], masked["image_masks"])[1][:, per_cam:].any()
    # the keypoint path alone moves the output: perturb the weights of its first map only
    pol.model.keypoints.conv[-1].weight[0] += 5.0 * torch.randn_like(pol.model.keypoints.conv[-1].weight[0])
    assert not torch.allclose(pol.velocity(x, t, pol.encode(inp)), v)
    save_policy(pol, tmp_path / "kp", version="kp")
    loaded = load_policy(tmp_path / "kp")
    assert loaded.config.keypoint_tokens == k and loaded.config.keypoint_per_token == per_token
    torch.testing.assert_close(loaded.velocity(x, t, loaded.encode(loaded.preprocess(obs))),
                               pol.velocity(x, t, pol.encode(inp)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="need keypoint_tokens"):
        make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS,
                    **({"keypoint_per_token": True} if per_token else {"keypoint_film": True}))


@torch.no_grad()
def test_prompt_query_keypoints_find_the_named_colour(tmp_path: Path) -> None:
    """keypoint_prompt_queries: Q more keypoints whose maps are the prompt's query dotted with the keypoint net's
    features. With the net set by hand to a red and a blue detector and the word embeddings of "red" / "blue" along
    two axes the query reads, the query keypoint lands on the red blob for "... red cube" and on the blue one for
    "... blue cube", in the same image. It joins the prefix (rl_token.prefix_length), cached == uncached, round-trips
    a checkpoint, and is refused without keypoints, with a negative Q, or with queries of the wrong shape."""
    from qvgm.policy.pi05 import SpatialKeypoints

    tasks = ["pick up the red cube", "pick up the blue cube"]
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=tasks, keypoint_tokens=2,
                      keypoint_prompt_queries=1).eval()
    m = pol.model
    kp = m.keypoints
    for c in kp.conv:
        torch.nn.init.zeros_(c.weight)
        torch.nn.init.zeros_(c.bias)
    c0, c1, _ = kp.conv
    c0.weight[0, :, 1, 1] = torch.tensor([40.0, -40.0, -40.0])  # hidden channel 0: red
    c0.weight[1, :, 1, 1] = torch.tensor([-40.0, -40.0, 40.0])  # hidden channel 1: blue
    c1.weight[0, 0, 1, 1] = c1.weight[1, 1, 1, 1] = 1.0
    emb = m.lm.embed_tokens.weight
    emb[:, :2] = 0.0  # no word but the two colours has a component on axes 0 / 1
    tok = pol.processor.tokenizer
    emb[tok.token_to_id("red"), 0] = emb[tok.token_to_id("blue"), 1] = 1.0
    torch.nn.init.zeros_(m.keypoint_prompt.proj)
    m.keypoint_prompt.proj[0, 0, 0] = m.keypoint_prompt.proj[0, 1, 1] = 400.0  # axis 0 -> red feature, 1 -> blue
    obs = [{**make_obs(0), "prompt": tasks[0]}, {**make_obs(0), "prompt": tasks[1]}]
    inp = pol.preprocess(obs)
    cond, queries = m.keypoint_conditioning(inp["tokens"], inp["token_mask"], 1)
    assert cond is None and queries.shape == (2, 1, kp.channels)
    img = -torch.ones(2, 3, 32, 32)
    img[:, 0, 4:8, 24:28] = 1.0  # a red blob top right in both images
    img[:, 2, 20:24, 2:6] = 1.0  # a blue blob bottom left
    xy = kp.coordinates(img, queries=queries)
    assert xy.shape == (2, 3, 2)  # the 2 learned keypoints, then the query's
    red, blue = xy[0, -1], xy[1, -1]
    assert red[0] > 0.4 and red[1] < -0.4 and blue[0] < -0.6 and blue[1] > 0.1
    with pytest.raises(ValueError, match="prompt queries"):
        kp.coordinates(img)
    with pytest.raises(ValueError, match="prompt queries"):
        SpatialKeypoints(2, 8).coordinates(img, queries=queries)
    with pytest.raises(ValueError, match="read the prompt"):
        m.image_tokens(inp["images"], inp["image_masks"])
    # the whole policy: one keypoint token per camera, prompt-dependent; cached == uncached; checkpoint round trip
    ctx = pol.encode(inp)
    assert ctx.prefix_mask.shape[1] == prefix_length(pol.config)
    tokens = m.image_tokens(inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])[0]
    per_cam = tokens.shape[1] // 2
    assert not torch.allclose(tokens[0, per_cam - 1], tokens[1, per_cam - 1])
    randomize_adarms(pol)
    x, t = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0.8, 0.3])
    v = pol.velocity(x, t, pol.encode(inp))
    torch.testing.assert_close(v, pol.velocity_uncached(inp, x, t), rtol=1e-4, atol=1e-5)
    save_policy(pol, tmp_path / "pq", version="pq")
    loaded = load_policy(tmp_path / "pq")
    assert loaded.config.keypoint_prompt_queries == 1
    torch.testing.assert_close(loaded.velocity(x, t, loaded.encode(loaded.preprocess(obs))), v, rtol=1e-4, atol=1e-5)
    per_token = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=tasks, keypoint_tokens=2,
                            keypoint_prompt_queries=3, keypoint_per_token=True).eval()
    assert per_token.encode(per_token.preprocess(obs)).prefix_mask.shape[1] == prefix_length(per_token.config)
    for bad, kw in (("need keypoint_tokens", {"keypoint_prompt_queries": 1}),
                    (">= 0", {"keypoint_tokens": 2, "keypoint_prompt_queries": -1})):
        with pytest.raises(ValueError, match=bad):
            make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=tasks, **kw)


@torch.no_grad()
def test_patch_token_dropout_masks_patches_in_training_only() -> None:
    """patch_token_dropout: in training mode each (sample, camera)'s SigLIP patch tokens are masked with probability
    p, its keypoint tokens never (nor a missing camera's revived); in eval mode nothing is dropped; refused without
    keypoints or outside [0, 1)."""
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, keypoint_tokens=2,
                      patch_token_dropout=0.5)
    obs = [make_obs(i % 2) for i in range(64)]
    inp = pol.preprocess(obs)
    inp["image_masks"][:8, 1] = False  # a missing camera stays missing
    m = pol.model
    m.eval()
    _, full = m.image_tokens(inp["images"], inp["image_masks"])
    per_cam = full.shape[1] // 2
    torch.testing.assert_close(full.view(64, 2, per_cam), inp["image_masks"][:, :, None].expand(64, 2, per_cam))
    m.train()
    torch.manual_seed(1)
    _, dropped = m.image_tokens(inp["images"], inp["image_masks"])
    torch.manual_seed(1)
    assert torch.equal(m.image_tokens(inp["images"], inp["image_masks"])[1], dropped)  # seeded
    d = dropped.view(64, 2, per_cam)
    assert torch.equal(d[:, :, -1], inp["image_masks"])  # keypoint tokens: as the camera mask says
    patches = d[:, :, :-1]
    assert (patches.all(dim=2) | ~patches.any(dim=2)).all()  # all of a camera's patches go together
    kept = patches.all(dim=2)[inp["image_masks"]].float().mean().item()
    assert 0.35 < kept < 0.65
    assert not (patches & ~inp["image_masks"][:, :, None]).any()
    for bad, kw in (("need keypoint_tokens", {"patch_token_dropout": 0.5}),
                    ("probability", {"keypoint_tokens": 2, "patch_token_dropout": 1.0})):
        with pytest.raises(ValueError, match=bad):
            make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, **kw)


@torch.no_grad()
def test_keypoint_film_reads_the_prompt() -> None:
    """keypoint_film: the keypoint net is FiLM-conditioned on the prompt (zero-initialised: at first the same as
    without it); once its weights are set, two prompts over the same images give different keypoint tokens; it
    refuses to run without the prompt tokens; cached == uncached."""
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=TASKS, keypoint_tokens=4, keypoint_film=True).eval()
    randomize_adarms(pol)
    m = pol.model
    obs = [make_obs(0), {**make_obs(0), "prompt": TASKS[1]}]  # same images and state, two prompts
    inp = pol.preprocess(obs)
    args = (inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])
    tok0 = m.image_tokens(*args)[0]
    torch.testing.assert_close(tok0[0], tok0[1])  # zero-init FiLM: the prompt does not matter yet
    with pytest.raises(ValueError, match="keypoint_film"):
        m.image_tokens(inp["images"], inp["image_masks"])
    torch.nn.init.normal_(m.keypoints.film.weight, std=0.5)
    m.keypoint_query.normal_()
    pooled = m.prompt_vector(inp["tokens"], inp["token_mask"])
    assert pooled.shape == (2, pol.config.width) and not torch.allclose(pooled[0], pooled[1])
    tok = m.image_tokens(*args)[0]
    per_cam = tok.shape[1] // 2
    assert not torch.allclose(tok[0, per_cam - 1], tok[1, per_cam - 1])  # keypoint token: prompt-dependent
    torch.testing.assert_close(tok[0, : per_cam - 1], tok[1, : per_cam - 1])  # SigLIP tokens: not
    x, t = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0.8, 0.3])
    torch.testing.assert_close(pol.velocity(x, t, pol.encode(inp)), pol.velocity_uncached(inp, x, t),
                               rtol=1e-4, atol=1e-5)

"""Processor: resize-with-pad, [-1, 1] pixels, camera masking, bad-input errors, quantile normalisation,
pi0.5 prompt with the 256-bin state, tokeniser truncation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from qvgm.policy.processor import (
    NormStats,
    ObservationError,
    Processor,
    build_tokenizer,
    discretize_state,
    pi05_prompt,
)

torch.set_num_threads(1)  # 2 shared CPU cores


def make_processor(max_token_len: int = 48) -> Processor:
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(0.5, 2.0, (500, 7)), rng.normal(-1.0, 0.3, (500, 7)))
    return Processor(camera_names=["base", "wrist"], image_size=32, state_dim=7, real_action_dim=7, action_dim=32,
                     norm_stats=stats, tokenizer=build_tokenizer(["pick up the red cube"]),
                     max_token_len=max_token_len)


def obs(**kw) -> dict:
    d = {"images": {"base": np.full((20, 40, 3), 255, np.uint8), "wrist": np.zeros((32, 32, 3), np.uint8)},
         "state": np.zeros(7, np.float32), "prompt": "Pick_up the red cube."}
    d.update(kw)
    return d


def test_images_resize_with_pad_to_minus_one_one() -> None:
    out = make_processor()([obs()])
    img = out["images"]
    assert img.shape == (1, 2, 3, 32, 32) and img.dtype == torch.float32
    base = img[0, 0]
    # 20x40 white -> 16x32 white band centred vertically, black (-1) bars above and below
    assert torch.allclose(base[:, 8:24, :], torch.ones(3, 16, 32), atol=1e-5)
    assert torch.all(base[:, :8, :] == -1.0) and torch.all(base[:, 24:, :] == -1.0)
    assert torch.all(img[0, 1] == -1.0)
    assert out["image_masks"].tolist() == [[True, True]]


def test_missing_camera_masked_and_extra_ignored() -> None:
    o = obs()
    del o["images"]["wrist"]
    o["images"]["side"] = np.zeros((8, 8, 3), np.uint8)
    out = make_processor()([o, obs()])
    assert out["image_masks"].tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((32, 32, 4), np.uint8), "3 channels"),
    (np.zeros((32, 32), np.uint8), "3 channels"),
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (b"\xff\xd8\xff\xe0jpegbytes", "encoded bytes"),
    ([[0, 0, 0]], "numpy"),
])
def test_bad_image_errors_name_the_camera(bad, msg) -> None:
    o = obs()
    o["images"]["wrist"] = bad
    with pytest.raises(ObservationError, match=f"'wrist'.*{msg}"):
        make_processor()([o])


@pytest.mark.parametrize("state, msg", [
    (np.zeros(6), r"expected \[7\]"),
    (np.zeros((7, 1)), r"expected \[7\]"),
    (np.array([0, 0, np.nan, 0, 0, 0, 0.0]), r"NaN/inf at dims \[2\]"),
    (np.array([0, 0, 0, 0, 0, 0, np.inf]), r"NaN/inf at dims \[6\]"),
])
def test_bad_state_errors(state, msg) -> None:
    with pytest.raises(ObservationError, match=msg):
        make_processor()([obs(state=state)])


def test_quantile_normalisation_roundtrip() -> None:
    p = make_processor()
    st = p.norm_stats
    assert np.allclose(p.normalize_state(st.state_q01), -1) and np.allclose(p.normalize_state(st.state_q99), 1)
    a = np.random.default_rng(1).normal(-1.0, 0.3, (2, 10, 7))
    n = p.normalize_actions(a)
    assert n.shape == (2, 10, 32) and torch.all(n[..., 7:] == 0)
    np.testing.assert_allclose(p.unnormalize_actions(n), a, rtol=1e-5, atol=1e-5)
    again = NormStats.from_json(st.to_json())
    np.testing.assert_array_equal(again.action_q99, st.action_q99)
    with pytest.raises(ValueError, match="missing field"):
        NormStats.from_json({"state": {"q01": [0]}})


def test_pi05_prompt_and_state_bins() -> None:
    assert discretize_state(np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 3.0])).tolist() == [0, 0, 128, 255, 255, 255]
    want = "Task: pick up the red cube, State: 0 128;\nAction: "
    assert pi05_prompt("Pick_up the red cube.", np.array([-1.0, 0.0])) == want
    p = make_processor()
    out = p([obs()])
    ids = out["tokens"][0][out["token_mask"][0]].tolist()
    text = p.tokenizer.decode(ids)
    assert text.startswith("task : pick up the red cube , state :") and text.endswith("; action :")
    assert 1 not in ids  # no [UNK] for known words


def test_long_prompt_truncated_with_warning() -> None:
    p = make_processor(max_token_len=20)
    with pytest.warns(UserWarning, match="truncated to the budget of 20"):
        out = p([obs(prompt="pick up the red cube " * 10)])
    assert out["tokens"].shape == (1, 20) and bool(out["token_mask"].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_processor(max_token_len=48)([obs()])


def test_openpi_norm_stats_format() -> None:
    d = {"norm_stats": {"state": {"mean": [0] * 32, "std": [1] * 32, "q01": [-2.0] * 32, "q99": [2.0] * 32},
                        "actions": {"mean": [0] * 32, "std": [1] * 32, "q01": [-1.0] * 32, "q99": [3.0] * 32}}}
    st = NormStats.from_openpi(d, state_dim=7, action_dim=7)
    assert st.state_q01.shape == (7,) and float(st.action_q99[0]) == 3.0
    with pytest.raises(ValueError, match="need 7 / 40"):
        NormStats.from_openpi(d, state_dim=7, action_dim=40)
    with pytest.raises(ValueError, match="quantile stats are required"):
        NormStats.from_openpi({"norm_stats": {"state": {"mean": [0]}, "actions": {}}}, 1, 1)

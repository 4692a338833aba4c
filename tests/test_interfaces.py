"""The interfaces and the batch contract."""

import numpy as np
import pytest
import torch

import robovla
from robovla.backbone import pad_tokens
from robovla.batch import Batch


def make_batch(b=2, t=8, c=10, a=7, lib=np):
    zeros = (lambda shape, dtype: torch.zeros(shape, dtype=getattr(torch, dtype))) if lib is torch else \
        (lambda shape, dtype: np.zeros(shape, dtype=dtype))
    return Batch(images={"static": zeros((b, t, 200, 200, 3), "uint8"), "gripper": zeros((b, t, 84, 84, 3), "uint8")},
                 instruction=["open the drawer"] * b, robot_obs=zeros((b, t, 15), "float32"),
                 actions=zeros((b, t, c, a), "float32"), action_mask=zeros((b, t, c), "bool"),
                 frame_mask=zeros((b, t), "bool"))


@pytest.mark.parametrize("lib", [np, torch])
def test_a_well_formed_batch_validates(lib):
    batch = make_batch(lib=lib)
    assert batch.validate() is batch


def test_batch_validation_lists_every_problem():
    batch = make_batch()
    batch.action_mask = np.zeros((2, 8, 9), dtype=bool)
    batch.robot_obs = np.zeros((2, 8, 15), dtype=np.float64)
    batch.images["gripper"] = np.zeros((2, 7, 84, 84, 3), dtype=np.uint8)
    batch.instruction = ["one"]
    with pytest.raises(ValueError) as err:
        batch.validate()
    assert str(err.value).splitlines() == [
        "invalid Batch:",
        "  action_mask: axis 2 (C) is 9, expected 10",
        "  robot_obs: expected dtype float32, got float64",
        "  images['gripper']: axis 1 (T) is 7, expected 8",
        "  instruction: 1 strings for B=2",
    ]


def test_batch_instruction_must_be_a_list_of_strings():
    batch = make_batch()
    batch.instruction = "open the drawer"
    with pytest.raises(ValueError, match="instruction: expected a list of B=2 strings, got str"):
        batch.validate()


def test_batch_moves_tensors():
    moved = make_batch(lib=torch).to("cpu")
    assert moved.images["static"].device.type == "cpu" and moved.validate()


def test_top_level_exports_load_lazily():
    assert robovla.PolicyHead.__module__ == "robovla.head" and issubclass(robovla.Backbone, torch.nn.Module)
    assert robovla.Dims(D=2048) == robovla.Dims(D=2048, K=1, T=8, C=10, A=7)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        robovla.Nope  # noqa: B018
    for name in robovla.__all__:
        assert getattr(robovla, name) is not None


def test_pad_tokens_right_pads_every_row_to_the_longest():
    tokens = pad_tokens([[5, 6, 7], [], [8]], pad_id=1)
    assert tokens.ids.tolist() == [[5, 6, 7], [1, 1, 1], [8, 1, 1]] and tokens.ids.dtype == torch.long
    assert tokens.mask.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    empty = pad_tokens([[], []], pad_id=0)
    assert empty.ids.shape == empty.mask.shape == (2, 1) and not empty.mask.any()  # one column, all padding

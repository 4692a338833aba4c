"""The CALVIN reader and the windows cut from it, against hand computations."""

import numpy as np
import pytest

import robovla
from robovla import windows
from robovla.loader import Preprocess, make_loader
from robovla.batch import ROBOT_OBS_DIM
from robovla_plugins.datasets.calvin.dataset import CalvinDataError

from calvin_files import FIRST, rel_action, write_split

A, B = FIRST + 3, FIRST + 15  # annotation inside the first recording: 13 frames, both ends inclusive


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("calvin") / "training",
                       recordings=[(FIRST, FIRST + 29), (FIRST + 40, FIRST + 49)],
                       annotations=[(A, B, "open the drawer", "open_drawer"),
                                    (FIRST + 40, FIRST + 49, "push the red block left", "push_red_block_left")])


def test_reads_segments_frames_and_keys_as_stored(split):
    data = robovla.create("dataset", "calvin", {"path": split})
    assert data.segments() == [robovla.Segment(A, B, "open the drawer", "open_drawer"),
                               robovla.Segment(FIRST + 40, FIRST + 49, "push the red block left", "push_red_block_left")]
    frames = data.load(A, A + 2)
    assert frames.images["static"].shape == (3, 200, 200, 3) and frames.images["static"].dtype == np.uint8
    assert frames.images["gripper"].shape == (3, 84, 84, 3)
    assert frames.images["static"][1, 0, 0, 0] == (A + 1) % 256  # frame ids are global
    assert frames.robot_obs.shape == (3, ROBOT_OBS_DIM) and frames.robot_obs.dtype == np.float64
    assert set(frames.actions) == {"rel_actions", "actions"}
    np.testing.assert_array_equal(frames.actions["rel_actions"][2], rel_action(A + 2))
    only = robovla.create("dataset", "calvin", {"path": split, "cameras": ["gripper"], "action_keys": ["actions"],
                                                "tasks": ["push_red_block_left"]})
    assert [s.task for s in only.segments()] == ["push_red_block_left"]
    assert set(only.load(A, A).images) == {"gripper"} and set(only.load(A, A).actions) == {"actions"}


def test_windows_chunks_and_masks_match_a_hand_computation(split):
    data = robovla.create("dataset", "calvin", {"path": split})
    space = robovla.create("action_space", "rel-world")
    T, C = 8, 10
    ds = windows.WindowDataset(data, space, T, C)
    # (end - start - T + 2) samples per annotation: 15 - 3 - 8 + 2 = 6, and 9 - 0 - 8 + 2 = 3
    assert len(ds) == 6 + 3
    assert ds.index[:6, 1].tolist() == list(range(A, A + 6))
    last = ds[5]  # starts at B - T + 1, so its last step is frame B itself
    assert last.actions.shape == (T, C, 7) and last.images["static"].shape == (T, 200, 200, 3)
    assert last.images["static"][-1, 0, 0, 0] == B % 256
    for t in range(T):
        for k in range(C):
            frame = B - T + 1 + t + k
            assert last.action_mask[t, k] == (frame <= B), (t, k)
            expected = space.encode(rel_action(min(frame, B)), None)  # past the end: the end's action, repeated
            np.testing.assert_allclose(last.actions[t, k], expected, rtol=0, atol=1e-6)
    assert last.action_mask[T - 1, 0] and not last.action_mask[T - 1, 1:].any()  # the last real frame counts
    first = ds[0]
    assert first.action_mask[0].all() and first.action_mask[:, :].sum() == sum(
        min(C, B - (A + t) + 1) for t in range(T))
    assert first.frame_mask.all() and first.instruction == "open the drawer"
    batch = next(iter(make_loader(ds, 2, preprocess=Preprocess(train=False), shuffle=False, num_workers=0)))
    batch.validate()
    assert tuple(batch.actions.shape) == (2, T, C, 7) and batch.instruction == ["open the drawer"] * 2


def test_missing_folder_and_annotations_are_clear_errors(tmp_path):
    with pytest.raises(CalvinDataError, match="no such folder"):
        robovla.create("dataset", "calvin", {"path": tmp_path / "nowhere"})
    with pytest.raises(CalvinDataError, match="auto_lang_ann.npy: missing"):
        robovla.create("dataset", "calvin", {"path": tmp_path}).segments()


def test_scene_info_selects_annotations_by_scene_and_is_checked(tmp_path):
    scenes = {"calvin_scene_B": (FIRST, FIRST + 29), "calvin_scene_C": (FIRST + 30, FIRST + 49)}
    split = write_split(tmp_path / "training", recordings=[(FIRST, FIRST + 29), (FIRST + 40, FIRST + 49)],
                        annotations=[(A, B, "open the drawer", "open_drawer"),
                                     (FIRST + 40, FIRST + 49, "push the red block left", "push_red_block_left")],
                        scenes=scenes)
    data = robovla.create("dataset", "calvin", {"path": split, "scenes": ["calvin_scene_C"]})
    assert data.scene_ranges() == scenes
    assert [s.task for s in data.segments()] == ["push_red_block_left"]
    assert data.describe()["scenes"] == 2 and data.check() == []
    with pytest.raises(CalvinDataError, match=r"\['calvin_scene_A'\] not in .*it has \['calvin_scene_B', "
                                              r"'calvin_scene_C'\]"):
        robovla.create("dataset", "calvin", {"path": split, "scenes": ["calvin_scene_A"]}).segments()
    np.save(split / "scene_info.npy", {"calvin_scene_B": [FIRST, FIRST + 29]}, allow_pickle=True)  # C is gone
    problems = robovla.create("dataset", "calvin", {"path": split}).check()
    assert [(p.key, p.message) for p in problems] == [
        ("info.indx[1]", f"annotation ({FIRST + 40}, {FIRST + 49}) lies in no scene of scene_info.npy")]
    (split / "scene_info.npy").write_bytes(b"\x93NUMPY garbage")
    problems = robovla.create("dataset", "calvin", {"path": split}).check()
    assert [p.file for p in problems] == [str(split / "scene_info.npy")] and "pickled dict" in problems[0].message
    (split / "scene_info.npy").unlink()  # validation splits have none
    with pytest.raises(CalvinDataError, match="validation splits never do"):
        robovla.create("dataset", "calvin", {"path": split, "scenes": ["calvin_scene_B"]}).segments()

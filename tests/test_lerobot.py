"""The ``lerobot`` dataset plugin against LeRobotDatasets written by lerobot itself, and
``robo-run data export --to lerobot`` against the same files.

The fixtures in tests/data/lerobot were written once by lerobot 0.4.4's own writer
(``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize``, every other
argument at its default: AV1 through libsvtav1, g=2, crf=30, preset 12, yuv420p) in a separate
environment, since lerobot pins torch<2.11: ``tests/data/lerobot/make_fixtures.py``, run as its
README says, from the first two language annotations (13 + 21 frames at 30 fps) of
robovla's synthetic reach task written with ``write_task(out, 3, 0, val_episodes=1)``.
``reach-video`` stores the cameras as MP4 files, ``reach-image`` as PNG bytes in the parquet
file; ``source.npz`` holds the numbers both were made from (frames, robot_obs, rel_actions,
instructions, episode lengths).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import robovla
from robovla.dataset import Dataset, Frames, Segment
from robovla.errors import RobovlaError

from helpers import ROBO_RUN, ROOT, run

FIXTURES = ROOT / "tests" / "data" / "lerobot"
CAMERAS = {"static": "rgb_static", "gripper": "rgb_gripper"}
pytest.importorskip("pyarrow")
pytest.importorskip("av")


@pytest.fixture(scope="module")
def source() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "source.npz") as z:
        return {k: z[k] for k in z.files}


def lerobot(path: Path | str, **config) -> Dataset:
    return robovla.create("dataset", "lerobot", {"path": str(path), **config})


# ----------------------------------------------------------------------- reading lerobot's files


@pytest.mark.parametrize("variant", ["reach-video", "reach-image"])
def test_fixture_written_by_lerobot_reads_back_as_its_source(variant, source):
    data = lerobot(FIXTURES / variant)
    lengths = source["episode_lengths"]
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    assert [(s.start, s.end, s.instruction) for s in data.segments()] == [
        (int(a), int(a + n - 1), str(t)) for a, n, t in zip(starts, lengths, source["instructions"])]
    assert data.cameras == ("static", "gripper")
    assert data.describe() == {"frames": 34, "episodes": 2, "segments": 2, "annotations": 2}
    for seg in data.segments():
        frames = data.load(seg.start, seg.end)
        rows = slice(seg.start, seg.end + 1)
        np.testing.assert_array_equal(frames.actions["action"], source["rel_actions"][rows].astype(np.float32))
        np.testing.assert_array_equal(frames.robot_obs, source["robot_obs"][rows].astype(np.float32))
        for camera, key in CAMERAS.items():
            want = source[key][rows]
            assert frames.images[camera].shape == want.shape and frames.images[camera].dtype == np.uint8
            if variant == "reach-image":  # PNG: lossless
                np.testing.assert_array_equal(frames.images[camera], want)
            else:  # AV1 at crf 30: close per frame, and each frame nearest its own source frame
                diff = np.abs(frames.images[camera].astype(int) - want).mean(axis=(1, 2, 3))
                assert diff.max() < 4.0, diff
                moving = [i for i in range(1, len(want)) if np.abs(want[i].astype(int) - want[i - 1]).mean() > 8]
                for i in moving:
                    assert diff[i] < np.abs(frames.images[camera][i].astype(int) - want[i - 1]).mean()
    assert not data.check()


def test_a_window_across_two_episodes_reads_as_both(source):
    """The frame cache reads adjacent episodes in one block; the reader joins them."""
    data = lerobot(FIXTURES / "reach-image")
    frames = data.load(10, 15)
    np.testing.assert_array_equal(frames.images["gripper"], source["rgb_gripper"][10:16])
    np.testing.assert_array_equal(frames.actions["action"], source["rel_actions"][10:16].astype(np.float32))


def test_video_frames_equal_through_the_frame_cache(tmp_path):
    from robovla.frame_cache import CachedDataset

    data = lerobot(FIXTURES / "reach-video", cameras=["gripper"])
    cached = CachedDataset(data, tmp_path / "cache")
    for a, b in [(0, 12), (13, 33), (5, 7), (20, 20)]:
        direct, fast = data.load(a, b), cached.load(a, b)
        np.testing.assert_array_equal(direct.images["gripper"], fast.images["gripper"])
        np.testing.assert_array_equal(direct.actions["action"], fast.actions["action"])
    assert cached.statistics("action") == data.statistics("action")


FORKED_LOADER = """
import robovla
from robovla.data import fit_action_space
from robovla.loader import Preprocess, make_loader
from robovla.windows import WindowDataset

data = robovla.create("dataset", "lerobot", {"path": %r})
data.load(0, 12)  # this process's decoders are open (and busy threads) when the workers fork
space = robovla.create("action_space", "continuous")
fit_action_space(space, data)
windows = WindowDataset(data, space, window=4, chunk=2)
loader = make_loader(windows, batch_size=4, preprocess=Preprocess(image_size=32), num_workers=2, seed=0)
print(sum(len(batch.instruction) for batch in loader))
"""


def test_video_reads_in_forked_loader_workers():
    """DataLoader workers fork with the parent's open decoders; each must open its own (an
    inherited FFmpeg decoder waits forever on threads that were not forked)."""
    import sys

    done = run([sys.executable, "-c", FORKED_LOADER % str(FIXTURES / "reach-video")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["28"]  # end - start - T + 2 per episode: (12 - 0 - 2) + (33 - 13 - 2)


def test_mapping_is_configuration(source):
    data = lerobot(FIXTURES / "reach-image", cameras=["wrist=observation.images.gripper"], state_key="none")
    assert data.cameras == ("wrist",)
    assert data.mapping() == {"camera wrist": "observation.images.gripper (image, 84x84x3)",
                              "robot_obs": "zeros [15] (--dataset.state_key none)",
                              "actions['action']": "action [7]", "instruction": "task (meta/tasks.parquet)"}
    frames = data.load(0, 3)
    np.testing.assert_array_equal(frames.images["wrist"], source["rgb_gripper"][:4])
    assert not frames.robot_obs.any() and frames.robot_obs.shape == (4, 15)


def test_a_camera_outside_observation_images_is_named_by_its_last_part(tmp_path, source):
    """lerobot/pusht-style: one camera stored as ``observation.image``."""
    import pyarrow.parquet as pq

    copy = damaged(tmp_path, "reach-image")
    info = json.loads((copy / "meta/info.json").read_text())
    info["features"] = {("observation.image" if k == "observation.images.gripper" else k): v
                        for k, v in info["features"].items() if k != "observation.images.static"}
    (copy / "meta/info.json").write_text(json.dumps(info))
    file = copy / "data/chunk-000/file-000.parquet"
    table = pq.read_table(file).drop_columns(["observation.images.static"])
    pq.write_table(table.rename_columns(["observation.image" if n == "observation.images.gripper" else n
                                         for n in table.column_names]), file)
    data = lerobot(copy)
    assert data.cameras == ("image",)
    np.testing.assert_array_equal(data.load(13, 20).images["image"], source["rgb_gripper"][13:21])


def test_data_check_reports_the_mapping():
    done = run([str(ROBO_RUN), "data", "check", "--dataset", "lerobot", str(FIXTURES / "reach-video")])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("34 frames, 2 segments, 2 annotations, 20 samples (window 8)")
    assert "  camera static     <- observation.images.static (video, 200x200x3)" in lines
    assert "  robot_obs         <- observation.state [15]" in lines
    assert lines[-1] == "0 problems"
    as_json = json.loads(run([str(ROBO_RUN), "data", "check", "--dataset", "lerobot", "--json",
                              str(FIXTURES / "reach-video")]).stdout)
    assert as_json["mapping"]["actions['action']"] == "action [7]" and as_json["problems"] == []


# ----------------------------------------------------------------------- bad input


def damaged(tmp_path: Path, variant: str = "reach-video") -> Path:
    copy = tmp_path / variant
    shutil.copytree(FIXTURES / variant, copy)
    return copy


def test_bad_folders_get_errors_that_say_what_and_how(tmp_path):
    with pytest.raises(RobovlaError, match=r"meta/info.json: missing; a LeRobotDataset folder holds meta/info.json"):
        lerobot(tmp_path)
    old = damaged(tmp_path)
    info = json.loads((old / "meta/info.json").read_text())
    (old / "meta/info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(RobovlaError, match=r"codebase_version is 'v2.1'.*v3.0 \(convert it with lerobot's "
                                           r"convert_dataset_v21_to_v30 script\)"):
        lerobot(old)
    with pytest.raises(RobovlaError, match=r"--dataset.cameras top: 'observation.images.top' is not an image or "
                                           r"video feature .* it has \['observation.images.gripper', "
                                           r"'observation.images.static'\]"):
        lerobot(FIXTURES / "reach-video", cameras=["top"])
    with pytest.raises(RobovlaError, match=r"--dataset.path nobody/no-such-dataset: no such local folder; as a Hugging "
                                           r"Face repo id it is not in the Hugging Face cache, and the hub cannot be "
                                           r"reached .*`hf download nobody/no-such-dataset --repo-type dataset "
                                           r"--local-dir DIR`"):
        lerobot("nobody/no-such-dataset")
    with pytest.raises(RobovlaError, match=r"--dataset.path \./missing: no such folder"):
        lerobot("./missing")


def test_state_of_another_size_is_refused_with_the_fix(tmp_path):
    data = lerobot(FIXTURES / "reach-image", state_key="action")
    with pytest.raises(RobovlaError, match=r"--dataset.state_key action: 7 values per frame, but robovla's robot "
                                           r"state has 15 .*pass --dataset.state_key none"):
        data.load(0, 1)
    assert any("robovla's robot state has 15 values" in p.message for p in data.check())


def test_check_finds_a_truncated_video_and_a_missing_data_file(tmp_path):
    copy = damaged(tmp_path)
    video = copy / "videos/observation.images.gripper/chunk-000/file-000.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    problems = lerobot(copy).check()
    assert problems and all("file-000" in p.file or "gripper" in p.message for p in problems), problems
    (copy / "data/chunk-000/file-000.parquet").unlink()
    problems = lerobot(copy).check()
    assert problems[0].message.endswith("missing; meta/episodes names it as holding frames"), problems


# ----------------------------------------------------------------------- the continuous action space


def test_continuous_round_trips_and_puts_the_gripper_last():
    space = robovla.create("action_space", "continuous", {"dim": 4, "gripper": 1, "gripper_open": 0.08,
                                                          "gripper_closed": 0.0, "gripper_threshold": 0.04})
    rng = np.random.default_rng(0)
    raw = np.c_[rng.uniform(-2, 3, 50), rng.choice([0.0, 0.08], 50), rng.uniform(0, 1, (50, 2))]
    space.fit([(raw, np.zeros((50, 15)))])
    targets = space.encode(raw, np.zeros((50, 15)))
    assert targets.min() >= -1 and targets.max() <= 1 and targets.dtype == np.float32
    np.testing.assert_array_equal(targets[:, -1], raw[:, 1] > 0.04)  # the gripper is the last target
    np.testing.assert_allclose(space.decode(targets, np.zeros((50, 15))), raw, atol=1e-6)
    with pytest.raises(ValueError, match=r"the 'action' actions have 5 dimensions, the space 4; pass "
                                         r"--action-space.dim 5"):
        space.encode(np.zeros((2, 5)), np.zeros((2, 15)))


def test_continuous_without_a_gripper_adds_a_constant_target_that_decoding_drops():
    space = robovla.create("action_space", "continuous", {"dim": 2, "gripper": None, "normalization": "meanstd"})
    assert (space.action_dim, space.command_dim) == (3, 2)
    raw = np.random.default_rng(1).normal(size=(40, 2))
    space.fit([(raw, np.zeros((40, 15)))])
    targets = space.encode(raw, np.zeros((40, 15)))
    assert targets.shape == (40, 3) and (targets[:, -1] == 1).all()
    inside = (np.abs(raw - raw.mean(0)) < 3 * raw.std(0)).all(1)  # meanstd keeps 3 standard deviations
    np.testing.assert_allclose(space.decode(targets, np.zeros((40, 15)))[inside], raw[inside], atol=1e-6)


def test_continuous_takes_the_datasets_statistics():
    from robovla.data import fit_action_space

    data = lerobot(FIXTURES / "reach-video")
    shipped = json.loads((FIXTURES / "reach-video/meta/stats.json").read_text())["action"]
    space = robovla.create("action_space", "continuous", {"normalization": "quantile"})
    fit_action_space(space, data)
    assert space.stats == {"q01": shipped["q01"], "q99": shipped["q99"]}
    fitted = robovla.create("action_space", "continuous", {"statistics": "fit"})
    fit_action_space(fitted, data)
    assert fitted.stats["max"] == pytest.approx(shipped["max"]) and fitted.stats["min"] == pytest.approx(shipped["min"])


# ----------------------------------------------------------------------- export


class Subset(Dataset):
    """The first ``n`` segments of a dataset (the fixtures hold the first two annotations)."""

    def __init__(self, source: Dataset, n: int):
        super().__init__(source.config)
        self.source, self.n = source, n

    @property
    def cameras(self):
        return self.source.cameras

    def segments(self) -> list[Segment]:
        return self.source.segments()[: self.n]

    def load(self, start: int, end: int) -> Frames:
        return self.source.load(start, end)

    def check(self):
        return []


@pytest.fixture(scope="module")
def calvin_source(tmp_path_factory, source):
    from robovla_plugins.datasets.calvin.synthetic import write_task

    out = tmp_path_factory.mktemp("calvin")
    write_task(out, 3, 0, val_episodes=1)
    data = Subset(robovla.create("dataset", "calvin", {"path": out / "training"}), 2)
    frames = [data.load(s.start, s.end) for s in data.segments()]
    np.testing.assert_array_equal(np.concatenate([f.images["static"] for f in frames]), source["rgb_static"])
    return data


def parquet_shape(file: Path) -> tuple:
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    meta = {k.decode(): json.loads(v) for k, v in (schema.metadata or {}).items()}
    meta.get("huggingface", {}).pop("fingerprint", None)
    meta.get("pandas", {}).pop("creator", None), meta.get("pandas", {}).pop("pandas_version", None)
    return [(f.name, str(f.type)) for f in schema], meta, pq.ParquetFile(file).num_row_groups


@pytest.mark.parametrize("variant", ["reach-video", "reach-image"])
def test_export_writes_what_lerobot_writes(variant, calvin_source, tmp_path):
    """Same files, same info.json, same parquet schemas and metadata, same statistics fields,
    same frame and episode columns, same video stream settings as lerobot's own writer."""
    import pyarrow.parquet as pq

    from robovla_plugins.datasets.lerobot.export import export

    out = tmp_path / variant
    export(calvin_source, out, robot_type="synthetic-reach", images=variant == "reach-image", progress=False)
    theirs = FIXTURES / variant

    def listing(root):  # lerobot leaves its PNG staging folder images/ behind; it is not part of the format
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                      and not str(p.relative_to(root)).startswith("images/"))

    assert listing(out) == listing(theirs)
    assert json.loads((out / "meta/info.json").read_text()) == json.loads((theirs / "meta/info.json").read_text())
    for part in ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet"]:
        assert parquet_shape(out / part) == parquet_shape(theirs / part), part
    mine, ref = (pq.read_table(r / "data/chunk-000/file-000.parquet").to_pydict() for r in (out, theirs))
    assert mine == ref  # frames, actions, state, indices (and PNG bytes decode equal: checked by reading below)
    mine_eps, ref_eps = ([{k: v for k, v in row.items() if not k.startswith("stats/")} for row in
                          pq.read_table(r / "meta/episodes/chunk-000/file-000.parquet").to_pylist()]
                         for r in (out, theirs))
    assert mine_eps == ref_eps
    stats, ref_stats = (json.loads((r / "meta/stats.json").read_text()) for r in (out, theirs))
    assert {k: sorted(v) for k, v in stats.items()} == {k: sorted(v) for k, v in ref_stats.items()}
    for feature in ("action", "observation.state"):
        for k in ("min", "max", "mean"):
            np.testing.assert_allclose(stats[feature][k], ref_stats[feature][k], atol=1e-6)
        # lerobot's std is sqrt(E[x^2] - mean^2) in float32: a constant dimension gets up to ~2e-3 of noise
        np.testing.assert_allclose(stats[feature]["std"], ref_stats[feature]["std"], atol=2e-3)
    assert stats["action"]["count"] == ref_stats["action"]["count"] == [34]
    if variant == "reach-video":
        import av

        for camera in CAMERAS:
            name = f"videos/observation.images.{camera}/chunk-000/file-000.mp4"
            a, b = (av.open(str(r / name)) for r in (out, theirs))
            sa, sb = a.streams.video[0], b.streams.video[0]
            assert (sa.codec_context.name, sa.codec_context.pix_fmt, sa.average_rate, sa.width, sa.height) == \
                   (sb.codec_context.name, sb.codec_context.pix_fmt, sb.average_rate, sb.width, sb.height)
            keys = [[f.key_frame for f in c.decode(video=0)] for c in (a, b)]
            assert keys[0] == keys[1] and len(keys[0]) == 34
    for seg, ref_seg in zip(lerobot(out).segments(), lerobot(theirs).segments()):
        assert seg == ref_seg
        mine_frames, ref_frames = lerobot(out).load(seg.start, seg.end), lerobot(theirs).load(seg.start, seg.end)
        for camera in CAMERAS:
            diff = np.abs(mine_frames.images[camera].astype(int) - ref_frames.images[camera]).mean()
            assert diff < (1.0 if variant == "reach-video" else 1e-9), (camera, diff)


def test_export_command_refuses_a_folder_in_use_and_writes_a_new_one(calvin_source, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    src = calvin_source.source.root
    done = run([str(ROBO_RUN), "data", "export", "--to", "lerobot", str(src), str(taken)])
    assert done.returncode != 0 and "a folder that is not empty" in done.stderr
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    done = run([str(ROBO_RUN), "data", "export", "--to", "lerobot", "--json", str(src), str(tmp_path / "new")])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"episodes": 3, "frames": 44, "tasks": 3}
    assert not lerobot(tmp_path / "new").check()


# ----------------------------------------------------------------------- the demo, through LeRobot


@pytest.mark.slow
def test_demo_recipe_on_a_lerobot_export_reaches_the_demos_bar(tmp_path):
    """The synthetic reach task of the demo, exported with ``robo-run data export --to lerobot``
    (training/ and validation/, AV1), trained with the demo recipe through ``--dataset lerobot
    --action-space continuous``: at least 90% closed-loop success on the demo's 100 unseen
    episodes, the bar of the CALVIN-layout demo. About 3 minutes on 2 cores."""
    from robovla import registry_file

    demo = registry_file.preset("demo")
    task = robovla.create("dataset", "calvin", {k: v for k, v in demo["dataset"].items() if k != "name"}).root.parent
    for split in ("training", "validation"):
        done = run([str(ROBO_RUN), "data", "export", "--to", "lerobot", str(task / split), str(tmp_path / split)])
        assert done.returncode == 0, done.stderr
    done = run([str(ROBO_RUN), "--preset", "demo", "--dataset", "lerobot", "--dataset.path", str(tmp_path / "training"),
                "--dataset.cameras", "gripper", "--action-space", "continuous", "--train.output_dir",
                str(tmp_path / "runs")])
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    config = (run_dir / "config.toml").read_text()
    assert 'name = "lerobot"' in config and 'name = "continuous"' in config
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["episodes"] == 100 and report["errors"]["count"] == 0
    assert report["success_rate"] >= 0.9, report["success_rate"]
    stats = json.loads((run_dir / "action_stats.json").read_text())["stats"]
    shipped = json.loads((tmp_path / "training/meta/stats.json").read_text())["action"]
    assert stats == {"min": shipped["min"], "max": shipped["max"]}  # the dataset's own statistics

"""The frame cache reads what the npz files hold; the loader shuffles, shards and augments
deterministically."""

import os

import numpy as np
import pytest
import torch

import robovla
from robovla.frame_cache import CachedDataset, is_current
from robovla.loader import Preprocess, ShardedSampler, make_loader, resize
from robovla.windows import Window, WindowDataset

from calvin_files import FIRST, write_split


@pytest.fixture
def split(tmp_path):
    return write_split(tmp_path / "training", recordings=[(FIRST, FIRST + 24), (FIRST + 30, FIRST + 45)],
                       annotations=[(FIRST + 1, FIRST + 12, "open the drawer", "open_drawer"),
                                    (FIRST + 8, FIRST + 20, "close the drawer", "close_drawer"),
                                    (FIRST + 30, FIRST + 45, "lift the red block", "lift_red_block")])


def test_cached_windows_equal_npz_windows(split, tmp_path):
    source = robovla.create("dataset", "calvin", {"path": split})
    cached = CachedDataset(source, tmp_path / "cache")
    assert is_current(source, tmp_path / "cache") and cached.ranges.tolist() == [
        [FIRST + 1, FIRST + 20, 0], [FIRST + 30, FIRST + 45, 20]]  # the annotated frames, merged
    space = robovla.create("action_space", "rel-world")
    a, b = WindowDataset(source, space, 8, 10), WindowDataset(cached, space, 8, 10)
    assert len(a) == len(b) == (12 - 1 - 8 + 2) + (20 - 8 - 8 + 2) + (45 - 30 - 8 + 2)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for cam in x.images:
            np.testing.assert_array_equal(x.images[cam], y.images[cam])
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.action_mask, y.action_mask)
        np.testing.assert_array_equal(x.robot_obs, y.robot_obs)
    with pytest.raises(KeyError, match="not in the frame cache"):
        cached.load(FIRST + 21, FIRST + 22)


def test_cache_is_rebuilt_when_the_source_changes(split, tmp_path):
    source = robovla.create("dataset", "calvin", {"path": split})
    CachedDataset(source, tmp_path / "cache")
    frame = split / f"episode_{FIRST + 5:07d}.npz"
    with np.load(frame) as npz:
        data = dict(npz)
    data["rel_actions"] = data["rel_actions"] * 0 + 0.5
    np.savez_compressed(frame, **data)
    os.utime(frame, ns=(1, 10**19))  # a newer time, whatever the file system's resolution
    assert not is_current(source, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no current frame cache"):
        CachedDataset(source, tmp_path / "cache", rebuild=False)
    rebuilt = CachedDataset(source, tmp_path / "cache")
    assert rebuilt.load(FIRST + 5, FIRST + 5).actions["rel_actions"][0, 0] == 0.5
    other = robovla.create("dataset", "calvin", {"path": split, "cameras": ["gripper"]})
    assert not is_current(other, tmp_path / "cache")  # other options, other content
    (tmp_path / "cache" / "index.json").unlink()  # an interrupted build leaves no index
    assert not is_current(source, tmp_path / "cache")


def shifted(images: np.ndarray, pad: int, seed: int) -> np.ndarray:
    """The gripper frames of a window after the training shift of ``pad`` px."""
    t = len(images)
    window = Window(images={"gripper": images}, instruction="x", robot_obs=np.zeros((t, 15), np.float32),
                    actions=np.zeros((t, 1, 7), np.float32), action_mask=np.ones((t, 1), bool),
                    frame_mask=np.ones(t, bool))
    return Preprocess(shift={"gripper": pad})(window, np.random.default_rng(seed)).images["gripper"]


def test_the_training_shift_is_an_edge_padded_crop_per_frame():
    images = np.random.default_rng(0).integers(0, 255, (8, 20, 20, 3), dtype=np.uint8)
    out = shifted(images, 4, seed=1)
    dy, dx = np.random.default_rng(1).integers(0, 9, size=(2, 8))
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
    for t in range(8):
        np.testing.assert_array_equal(out[t], padded[t, dy[t]: dy[t] + 20, dx[t]: dx[t] + 20])
    assert len({(a, b) for a, b in zip(dy, dx)}) > 1  # drawn per frame
    np.testing.assert_array_equal(shifted(images, 0, seed=1), images)


def test_resize_keeps_uint8_and_values():
    flat = np.full((2, 84, 84, 3), 77, np.uint8)
    out = resize(flat, 224)
    assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8 and (out == 77).all()
    ramp = np.tile(np.linspace(0, 255, 200).astype(np.uint8)[None, None, :, None], (1, 200, 1, 3))
    float_ref = torch.nn.functional.interpolate(torch.from_numpy(ramp).permute(0, 3, 1, 2).float(), size=(224, 224),
                                                mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(resize(ramp, 224).astype(int) - float_ref.round().permute(0, 2, 3, 1).numpy()).max() <= 1


def test_bicubic_resize_is_pils_and_the_vlm_backbones_read_with_it():
    from PIL import Image

    y, x = np.mgrid[0:200, 0:200] / 200
    smooth = np.stack([127.5 + 127.5 * np.sin(7 * x + 4 * y), 255 * x * y, 127.5 + 127.5 * np.cos(9 * x)], -1)
    noise = np.random.default_rng(0).integers(0, 256, (84, 84, 3), dtype=np.uint8)
    for img in (smooth.round().astype(np.uint8), noise, smooth[::3, ::3].round().astype(np.uint8)):  # 200, 84, 67
        pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC)).astype(int)
        assert (resize(img[None], 224, "bicubic")[0].astype(int) == pil).all()
        assert np.abs(resize(img[None], 224).astype(int)[0] - pil).max() >= 2  # bilinear is another filter
    with pytest.raises(ValueError, match="use one of bilinear, bicubic"):
        resize(noise[None], 224, "lanczos")
    kosmos = robovla.create("backbone", "kosmos", {"size": "tiny"})
    assert kosmos.resize_filter == "bicubic" and Preprocess.for_backbone(kosmos).filter == "bicubic"
    assert robovla.create("backbone", "kosmos", {"size": "tiny", "resize": "bilinear"}).resize_filter == "bilinear"
    assert robovla.create("backbone", "cnn-pool", {}).resize_filter == "bilinear"
    # images that reach the backbone at another size are resized with its filter too
    frames = torch.from_numpy(np.stack([noise, noise[::-1]]))
    pixels = kosmos.preprocess_images(frames, "static")
    expected = kosmos.preprocess_images(torch.from_numpy(resize(frames.numpy(), 32, "bicubic")), "static")
    assert pixels.shape == (2, 3, 32, 32) and torch.equal(pixels, expected)


def test_sampler_shards_cover_every_sample_and_depend_only_on_seed_and_epoch():
    parts = [list(ShardedSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4] and set(sum(parts, [])) == set(range(10))
    assert list(ShardedSampler(10, seed=3)) == list(ShardedSampler(10, seed=3))
    later = ShardedSampler(10, seed=3)
    later.set_epoch(1)
    assert list(later) != list(ShardedSampler(10, seed=3))
    assert list(ShardedSampler(5, shuffle=False, rank=1, world_size=2)) == [1, 3, 0]
    with pytest.raises(ValueError, match="rank 2 is outside world size 2"):
        ShardedSampler(5, rank=2, world_size=2)


def test_loader_batches_are_the_same_with_or_without_workers(split):
    source = robovla.create("dataset", "calvin", {"path": split})
    windows = WindowDataset(source, robovla.create("action_space", "rel-world"), 8, 10)
    runs = []
    for workers in (0, 2):
        loader = make_loader(windows, 4, preprocess=Preprocess(image_size=32), num_workers=workers, seed=7)
        runs.append(list(loader))
    assert len(runs[0]) == len(windows) // 4
    for a, b in zip(*runs):
        a.validate()
        assert tuple(a.images["static"].shape) == (4, 8, 32, 32, 3)
        assert a.instruction == b.instruction
        for cam in a.images:
            assert torch.equal(a.images[cam], b.images[cam])
        assert torch.equal(a.actions, b.actions)


def test_concurrent_builders_leave_one_complete_cache(split, tmp_path):
    import subprocess
    import sys

    code = ("import robovla; from robovla.frame_cache import ensure; "
            f"ensure(robovla.create('dataset', 'calvin', {{'path': {str(split)!r}}}), {str(tmp_path / 'cache')!r}, False)")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    source = robovla.create("dataset", "calvin", {"path": split})
    cached = CachedDataset(source, tmp_path / "cache", rebuild=False)
    frames = source.load(FIRST + 1, FIRST + 20)
    np.testing.assert_array_equal(cached.load(FIRST + 1, FIRST + 20).images["static"], frames.images["static"])
    assert not list(tmp_path.glob("cache.tmp-*"))


def test_a_same_size_rewrite_with_the_old_time_still_invalidates(split, tmp_path):
    source = robovla.create("dataset", "calvin", {"path": split})
    CachedDataset(source, tmp_path / "cache")
    frame = split / f"episode_{FIRST + 2:07d}.npz"
    before = frame.stat()
    other = (split / f"episode_{FIRST + 3:07d}.npz").read_bytes()
    frame.write_bytes(other[: before.st_size].ljust(before.st_size, b"\0"))
    os.utime(frame, ns=(before.st_atime_ns, before.st_mtime_ns))  # what cp -p or rsync -t do
    assert frame.stat().st_size == before.st_size and frame.stat().st_mtime_ns == before.st_mtime_ns
    assert not is_current(source, tmp_path / "cache")


def test_augmentation_changes_with_the_epoch_and_shards_stay_equal(split):
    source = robovla.create("dataset", "calvin", {"path": split})
    windows = WindowDataset(source, robovla.create("action_space", "rel-world"), 8, 10)
    loader = make_loader(windows, 2, preprocess=Preprocess(image_size=32), shuffle=False, num_workers=0)
    first = next(iter(loader)).images["static"]
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader)).images["static"], first)
    lengths = [len(list(ShardedSampler(3, seed=0, rank=r, world_size=8))) for r in range(8)]
    assert lengths == [1] * 8


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_reuses_a_batch_buffer_only_once_nothing_holds_it(split, workers):
    source = robovla.create("dataset", "calvin", {"path": split})
    windows = WindowDataset(source, robovla.create("action_space", "rel-world"), 8, 10)
    make = lambda: make_loader(windows, 2, preprocess=Preprocess(image_size=16), shuffle=False,  # noqa: E731
                               num_workers=workers)
    reference = [(b.images["static"].clone(), b.actions.clone()) for b in make()]
    loader, seen = make(), []
    for k, batch in enumerate(loader):
        assert torch.equal(batch.images["static"], reference[k][0]) and torch.equal(batch.actions, reference[k][1])
        if k == 0:
            held = batch  # the whole batch
        elif k == 1:
            view = batch.images["static"][1, 2].numpy()  # only a numpy view of one frame
        seen.append(batch.images["static"].data_ptr())
    assert len(seen) == len(windows) // 2 == 10
    assert torch.equal(held.images["static"], reference[0][0]) and torch.equal(held.actions, reference[0][1])
    np.testing.assert_array_equal(view, reference[1][0][1, 2].numpy())  # still-referenced memory is untouched
    assert loader.fresh_batches == 0 and held.images["static"].data_ptr() not in seen[1:]
    hoarded = list(make())  # holding every batch: the buffers run out and fresh memory takes over
    assert all(torch.equal(b.images["static"], r[0]) for b, r in zip(hoarded, reference))


def test_a_shift_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="does not fit a 6x6 image"):
        shifted(np.zeros((1, 6, 6, 3), np.uint8), 8, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_without_the_storage_use_count_every_batch_is_fresh_and_the_same(split, workers, monkeypatch):
    from robovla import batch_ring

    assert batch_ring.storage_use_count() is not None  # this torch has it: the ring is in use by default
    source = robovla.create("dataset", "calvin", {"path": split})
    windows = WindowDataset(source, robovla.create("action_space", "rel-world"), 8, 10)
    make = lambda: make_loader(windows, 2, preprocess=Preprocess(image_size=16), seed=3,  # noqa: E731
                               num_workers=workers)
    reference = [(b.images["static"].clone(), b.actions.clone(), b.instruction) for b in make()]
    monkeypatch.setattr(batch_ring, "_USE_COUNT", None)
    monkeypatch.setattr(torch._C, "_storage_Use_Count", None, raising=False)
    assert batch_ring.storage_use_count() is None
    loader = make_loader(windows, 2, preprocess=Preprocess(image_size=16), seed=3, num_workers=workers)
    got = [(b.images["static"].clone(), b.actions.clone(), b.instruction) for b in loader]
    assert loader.fresh_batches == len(got) == len(reference) == 10
    for (a, b, c), (x, y, z) in zip(got, reference):
        assert torch.equal(a, x) and torch.equal(b, y) and c == z

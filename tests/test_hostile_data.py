"""Hostile and careless dataset folders, each planted for real: no code from a download runs,
no read blocks or balloons, and every problem names its file.

- a pickle payload in either pickled index file (auto_lang_ann.npy, scene_info.npy): a
  marker file it would create stays absent; `data check` reports the file; every other
  reader (the dataset, `data stats`, `data cache`, training) stops with a clear error;
- a hydra ``_target_`` outside calvin_env in merged_config.yaml: refused before it is
  imported, naming the key and the target;
- a recording range of 1e9 frames, a FIFO or a symbolic-link loop in place of a frame,
  mixed image sizes, annotations that are not text, a frame member whose header promises
  gigabytes: each a problem or an error naming the file, in bounded memory.
"""

import builtins
import codecs
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

import robovla
from robovla.cli import main
from robovla.errors import missing_folder
from robovla.safe_read import RefusedPickleError, RestrictedUnpickler, load_npy
from robovla.windows import WindowDataset
from robovla_plugins.datasets.calvin.dataset import CalvinDataError
from robovla_plugins.datasets.calvin.sim import CalvinSimError

from calvin_files import FIRST, write_split

ANN = "lang_annotations/auto_lang_ann.npy"
SCENES = "scene_info.npy"
LAST = FIRST + 11  # a 12-frame split: one recording, one annotation
MB = 2 ** 20


class Payload:
    """Unpickling this runs ``builtins.exec``, which creates ``marker``: the classic pickle attack."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


class SystemPayload(Payload):
    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("calvin") / "training", recordings=[(FIRST, LAST)],
                       annotations=[(FIRST + 1, FIRST + 10, "open the drawer", "open_drawer")],
                       scenes={"calvin_scene_D": (FIRST, LAST)})


@pytest.fixture
def split(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "training")


def check_json(path, capsys):
    code = main(["data", "check", str(path), "--json"])
    return code, json.loads(capsys.readouterr().out)


def plant(split, name, payload):
    """Put ``payload`` inside the pickled dict of ``name``, as a downloaded file could hold it."""
    if name == ANN:
        ann = {"language": {"ann": [payload], "task": ["open_drawer"], "emb": np.zeros((1, 1, 384), np.float32)},
               "info": {"indx": [(FIRST + 1, FIRST + 10)], "episodes": []}}
        np.save(split / ANN, ann, allow_pickle=True)
    else:
        np.save(split / SCENES, {"calvin_scene_D": payload}, allow_pickle=True)


# ------------------------------------------------------------------------------ pickles

@pytest.mark.parametrize("name", [ANN, SCENES])
@pytest.mark.parametrize("kind, called", [(Payload, "builtins.exec"), (SystemPayload, "posix.system")])
def test_a_pickle_payload_runs_no_code_and_data_check_names_the_file(split, tmp_path, capsys, name, kind, called):
    marker = tmp_path / "marker"
    plant(split, name, kind(marker))
    code, report = check_json(split, capsys)
    assert not marker.exists()
    assert code == 1
    found = [p for p in report["problems"] if p["file"] == str(split / name)]
    assert len(found) == 1 and "refused to unpickle" in found[0]["message"], report["problems"]
    assert f"asks for {called}" in found[0]["message"] and "download it again" in found[0]["message"]
    # every reader of the split stops with the same clear error, and still runs nothing
    options = {"path": split, "scenes": ["calvin_scene_D"]} if name == SCENES else {"path": split}
    dataset = robovla.create("dataset", "calvin", options)
    for read in (dataset.segments, dataset.describe,
                 lambda: WindowDataset(dataset, robovla.create("action_space", "rel-world"), 8, 10)):
        with pytest.raises(CalvinDataError, match=f"{name}: refused to unpickle"):
            read()
    for command in ("stats", "cache"):  # these read scene_info.npy only when scenes are chosen
        assert main(["data", command, str(split)]) == (1 if name == ANN else 0) and not marker.exists()
        assert (f"{name}: refused to unpickle" in capsys.readouterr().err) == (name == ANN)
    assert not marker.exists()


def test_training_on_a_planted_split_stops_before_any_code_runs(split, tmp_path, capsys):
    marker = tmp_path / "marker"
    plant(split, ANN, Payload(marker))
    code = main(["train", "--preset", "demo", "--dataset.path", str(split), "--train.val_path", "none",
                 "--train.eval_env", "none", "--train.output_dir", str(tmp_path / "runs"), "--train.max_steps", "1"])
    err = capsys.readouterr().err
    assert code in (1, 2) and f"{split / ANN}: refused to unpickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_plain_calvin_data_unpickles_exactly_under_every_protocol(tmp_path):
    stored = {"language": {"ann": ["open the drawer", "héllo"], "task": ["open_drawer"] * 2,
                           "emb": np.arange(6, dtype=np.float32).reshape(2, 1, 3)},
              "info": {"indx": [(np.int64(3), 9), (10, 20)], "episodes": []},
              "misc": (None, True, 1.5, -(2 ** 70), b"\x00\xff", np.float64(0.25), np.array(["a", "bc"]))}
    for protocol in range(0, 6):
        file = tmp_path / f"p{protocol}.npy"
        with open(file, "wb") as f:  # np.save's layout, with the pickle protocol chosen
            np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
            pickle.dump(np.array(stored, dtype=object), f, protocol=protocol)
        back = load_npy(file, allow_pickle=True).item()
        assert back["language"]["ann"] == stored["language"]["ann"] and back["info"] == stored["info"]
        np.testing.assert_array_equal(back["language"]["emb"], stored["language"]["emb"])
        assert back["misc"][:6] == stored["misc"][:6] and back["misc"][6].tolist() == ["a", "bc"], protocol
    with pytest.raises(pickle.UnpicklingError, match="asks for collections.OrderedDict"):  # harmless, not plain
        RestrictedUnpickler(io.BytesIO(pickle.dumps(collections.OrderedDict(a=1)))).load()


# ------------------------------------------------------------------------------ hydra targets

def write_config(folder, body):
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "merged_config.yaml").write_text(body)


@pytest.fixture
def fake_calvin_env(tmp_path, monkeypatch):
    """A calvin_env package on sys.path whose env module imports os (as calvin_env's does)."""
    assert not any(m == "calvin_env" or m.startswith("calvin_env.") for m in sys.modules)
    root = tmp_path / "site"
    (root / "calvin_env" / "envs").mkdir(parents=True)
    (root / "calvin_env" / "__init__.py").write_text("")
    (root / "calvin_env" / "envs" / "__init__.py").write_text("")
    (root / "calvin_env" / "envs" / "play_table_env.py").write_text(
        "import os\nclass PlayTableSimEnv:\n    pass\n")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m == "calvin_env" or m.startswith("calvin_env.")]:
        del sys.modules[name]  # the next test finds calvin_env as uninstalled as before


GOOD_ENV = "env:\n  _target_: calvin_env.envs.play_table_env.PlayTableSimEnv\n  use_egl: true\n"


@pytest.mark.parametrize("body, key, target", [
    ("env:\n  _target_: marker_module.run\n", "env._target_", "'marker_module.run'"),
    (GOOD_ENV + "robot:\n  arm: [{_target_: marker_module.run}]\n", "robot.arm[0]._target_", "'marker_module.run'"),
    (GOOD_ENV + "scene:\n  _target_: ${robot.cls}\nrobot:\n  cls: marker_module.run\n", "scene._target_",
     "'${robot.cls}'"),
    (GOOD_ENV + "scene: '${oc.create:\"{_target_: marker_module.run}\"}'\n", "scene", "oc.create"),
])
def test_a_foreign_hydra_target_is_refused_before_anything_is_imported(tmp_path, monkeypatch, body, key, target):
    monkeypatch.setitem(sys.modules, "calvin_env", None)  # as if not installed: the check comes first
    write_config(tmp_path / "validation", body)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "marker_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').write('x')\n")
    with pytest.raises(CalvinSimError, match="refused") as err:
        robovla.create("env", "calvin", {"path": tmp_path / "validation"})
    assert f"{key}: " in str(err.value) and target in str(err.value)
    assert str(tmp_path / "validation" / ".hydra" / "merged_config.yaml") in str(err.value)
    assert not (tmp_path / "imported").exists() and "marker_module" not in sys.modules


def test_a_target_reaching_outside_calvin_env_through_its_imports_is_refused(tmp_path, fake_calvin_env, monkeypatch):
    write_config(tmp_path / "validation", GOOD_ENV + "robot:\n  _target_: calvin_env.envs.play_table_env.os.system\n")
    with pytest.raises(CalvinSimError, match=r"robot\._target_: target 'calvin_env\.envs\.play_table_env\.os\."
                                             r"system': calvin_env\.envs\.play_table_env\.os is the module os"):
        robovla.create("env", "calvin", {"path": tmp_path / "validation"})
    write_config(tmp_path / "validation", GOOD_ENV)  # calvin_env's own class passes on to hydra
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    with pytest.raises(CalvinSimError, match="pip install omegaconf"):
        robovla.create("env", "calvin", {"path": tmp_path / "validation"})


def test_a_fifo_as_merged_config_is_refused_not_read(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "calvin_env", None)
    (tmp_path / ".hydra").mkdir()
    os.mkfifo(tmp_path / ".hydra" / "merged_config.yaml")
    with pytest.raises(CalvinSimError, match=r"merged_config.yaml: a named pipe \(FIFO\), not a regular file"):
        robovla.create("env", "calvin", {"path": tmp_path})


# ------------------------------------------------------------------------------ careless data

def peak_mb(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] / MB
    finally:
        tracemalloc.stop()


def test_a_billion_frame_recording_is_one_problem_in_bounded_memory(split, capsys):
    np.save(split / "ep_start_end_ids.npy", np.array([[FIRST, FIRST + 10 ** 9]]))
    ann = load_npy(split / ANN, allow_pickle=True).item()
    ann["info"]["indx"] = [(FIRST + 1, FIRST + 10), (FIRST, FIRST + 10 ** 9 - 1)]
    ann["language"]["ann"].append("wander")
    ann["language"]["task"].append("wander")
    np.save(split / ANN, ann, allow_pickle=True)
    np.save(split / SCENES, {"calvin_scene_D": [FIRST, FIRST + 10 ** 9]}, allow_pickle=True)
    (code, report), peak = peak_mb(lambda: check_json(split, capsys))
    assert code == 1 and peak < 20, peak
    assert report["frames"] == 10 ** 9 + 1 and report["samples"] == (10 - 1 - 8 + 2) + (10 ** 9 - 1 - 8 + 2)
    assert report["problems"] == [{
        "file": str(split / f"episode_{LAST + 1:07d}.npz"), "key": "",
        "message": f"frames {LAST + 1}..{FIRST + 10 ** 9} missing ({10 ** 9 - 11} files, episode_{LAST + 1:07d}.npz "
                   f"to episode_{FIRST + 10 ** 9:07d}.npz) inside a recording range of ep_start_end_ids.npy"}]


def test_many_missing_ranges_are_listed_up_to_a_limit_then_counted(split, capsys):
    lone = [[f, f] for f in range(LAST + 2, LAST + 302, 2)]  # 150 one-frame recordings, none of them there
    np.save(split / "ep_start_end_ids.npy", np.array([[FIRST, LAST]] + lone))
    code, report = check_json(split, capsys)
    problems = report["problems"]
    assert code == 1 and len(problems) == 101 and problems[0]["file"] == str(split / f"episode_{LAST + 2:07d}.npz")
    assert problems[-1] == {"file": str(split / f"episode_{LAST + 202:07d}.npz"), "key": "",
                            "message": "... and 50 more missing frame ranges like the above"}


def test_a_fifo_and_a_link_loop_in_place_of_frames_are_named_not_waited_on(split, capsys):
    fifo, loop = split / f"episode_{FIRST + 3:07d}.npz", split / f"episode_{FIRST + 5:07d}.npz"
    fifo.unlink()
    os.mkfifo(fifo)
    loop.unlink()
    loop.symlink_to(loop.name)
    code, report = check_json(split, capsys)
    assert code == 1
    assert {p["file"]: p["message"] for p in report["problems"]} == {
        str(fifo): "a named pipe (FIFO), not a regular file; put the file itself there",
        str(loop): "a loop of symbolic links (or too many levels of them); replace the link with the file itself"}
    dataset = robovla.create("dataset", "calvin", {"path": split})
    with pytest.raises(CalvinDataError, match=f"{fifo}: a named pipe"):
        dataset.load(FIRST, FIRST + 4)
    with pytest.raises(CalvinDataError, match=f"{loop}: a loop of symbolic links"):
        dataset.load(FIRST + 5, FIRST + 5)
    assert len(dataset.fingerprint()) == 64  # the frame cache's check of the files lists them without reading
    assert main(["data", "cache", str(split)]) == 1 and f"{fifo}: a named pipe" in capsys.readouterr().err


def test_mixed_image_sizes_name_the_file_and_shape(split, capsys):
    odd = split / f"episode_{FIRST + 4:07d}.npz"
    with np.load(odd) as npz:
        data = dict(npz)
    data["rgb_static"] = np.zeros((100, 100, 3), np.uint8)
    np.savez_compressed(odd, **data)
    message = r"shape \(100, 100, 3\), expected \(200, 200, 3\)"
    with pytest.raises(CalvinDataError, match=rf"{odd} \[rgb_static\]: {message}"):
        robovla.create("dataset", "calvin", {"path": split}).load(FIRST + 2, FIRST + 6)
    assert main(["data", "cache", str(split)]) == 1
    assert f"{odd} [rgb_static]: shape (100, 100, 3)" in capsys.readouterr().err
    code, report = check_json(split, capsys)
    assert report["problems"] == [{"file": str(odd), "key": "rgb_static",
                                   "message": "shape (100, 100, 3), expected (200, 200, 3)"}]


NESTED = "nested-placeholder"


def save_nested(file, tree, depth=10 ** 5):
    """np.save of ``tree`` (a dict) with the string NESTED in it replaced by a list nested ``depth``
    deep: pickle itself cannot write one (it recurses), but a file can hold one."""
    body = pickle.dumps(np.array(tree, dtype=object), protocol=2)
    placeholder = b"X" + len(NESTED).to_bytes(4, "little") + NESTED.encode()
    assert body.count(placeholder) == 1
    with open(file, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(body.replace(placeholder, b"]" * depth + b"a" * (depth - 1)))


@pytest.mark.parametrize("text, shown", [(b"\xff\xfeopen", "bytes that are not UTF-8 text b'\\xff\\xfeopen'"),
                                         (b"open", "bytes b'open'"), ("op\udcffen", "a str that is not valid Unicode"),
                                         (7, "of type int (7)"), (NESTED, "of type list ([[[[...]]]])")])
def test_annotations_that_are_not_text_are_a_problem_of_the_file(split, capsys, text, shown):
    ann = load_npy(split / ANN, allow_pickle=True).item()
    ann["language"]["ann"][0] = text
    save_nested(split / ANN, ann) if text == NESTED else np.save(split / ANN, ann, allow_pickle=True)
    code, report = check_json(split, capsys)
    assert code == 1 and [p["file"] for p in report["problems"]] == [str(split / ANN)]
    assert f"1 entry of language.ann not text: language.ann[0] is {shown}" in report["problems"][0]["message"]
    with pytest.raises(CalvinDataError, match="language.ann not text"):
        robovla.create("dataset", "calvin", {"path": split}).segments()


def test_annotation_ranges_nested_past_the_recursion_limit_are_a_problem(split, capsys):
    ann = load_npy(split / ANN, allow_pickle=True).item()
    ann["info"]["indx"] = NESTED
    save_nested(split / ANN, ann)
    code, report = check_json(split, capsys)
    assert code == 1 and [p["file"] for p in report["problems"]] == [str(split / ANN)]
    assert "info.indx: not (start, end) integer pairs" in report["problems"][0]["message"]


def write_member(file, shape, data_bytes, dtype="|u1"):
    """An npz whose rgb_static member has header ``shape`` and ``data_bytes`` zero bytes of data,
    streamed (the test never holds them), plus the other keys as CALVIN has them."""
    with np.load(file) as npz:
        rest = {k: npz[k] for k in npz.files if k != "rgb_static"}
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("rgb_static.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(4 * MB)
            for _ in range(data_bytes // len(zeros)):
                f.write(zeros)
            f.write(bytes(data_bytes % len(zeros)))
        for key, value in rest.items():
            with z.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value)


@pytest.mark.parametrize("shape, size, message", [
    ((10000, 10000, 3), 300_000_000, "shape (10000, 10000, 3), expected (200, 200, 3)"),
    ((200, 200, 3), 300_000_000, "more data than its header's (200, 200, 3) uint8"),
])
def test_an_inflating_frame_member_is_refused_from_its_header(split, capsys, shape, size, message):
    big = split / f"episode_{FIRST + 2:07d}.npz"
    write_member(big, shape, size)
    assert big.stat().st_size < 2 * MB  # inflates to 300 MB
    (code, report), peak = peak_mb(lambda: check_json(split, capsys))
    assert peak < 20, peak
    assert report["problems"] == [{"file": str(big), "key": "rgb_static", "message": message}]
    (_, peak) = peak_mb(lambda: pytest.raises(CalvinDataError, robovla.create(
        "dataset", "calvin", {"path": split}).load, FIRST + 2, FIRST + 2))
    assert peak < 20, peak


def test_a_frame_member_in_a_compression_numpy_never_writes_is_refused_unread(split, capsys):
    odd = split / f"episode_{FIRST + 6:07d}.npz"
    with np.load(odd) as npz:
        data = dict(npz)
    with zipfile.ZipFile(odd, "w", compression=zipfile.ZIP_BZIP2) as z:
        for key, value in data.items():
            with z.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, value)
    code, report = check_json(split, capsys)
    assert code == 1 and sorted((p["file"], p["key"], p["message"]) for p in report["problems"]) == [
        (str(odd), key, "compressed with zip method 12; numpy's npz members are stored or deflated")
        for key in sorted(["rgb_static", "rgb_gripper", "robot_obs", "rel_actions", "actions"])]


def test_an_index_file_whose_header_promises_more_than_it_holds_is_refused_unread(split, capsys):
    with open(split / "ep_start_end_ids.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 12, 2)})
        f.write(bytes(32))
    (code, report), peak = peak_mb(lambda: check_json(split, capsys))
    assert peak < 20 and code == 1
    assert report["problems"] == [{"file": str(split / "ep_start_end_ids.npy"), "key": "", "message": (
        f"{split / 'ep_start_end_ids.npy'}: cannot read (truncated: the header says (1000000000000, 2) int64, the "
        "file holds 32 bytes of data)")}]


def test_many_annotations_are_held_in_arrays(tmp_path):
    """200k annotations of 10 frames: the windows of the split keep arrays, not an object per
    annotation or per window."""
    n = 200_000
    root = tmp_path / "training"
    (root / "lang_annotations").mkdir(parents=True)
    np.save(root / "ep_start_end_ids.npy", np.array([[0, 10 * n - 1]]))
    texts = [f"instruction {i % 389}" for i in range(n)]
    np.save(root / ANN, {"language": {"ann": texts, "task": ["open_drawer"] * n},
                         "info": {"indx": [(10 * i, 10 * i + 9) for i in range(n)]}}, allow_pickle=True)
    dataset = robovla.create("dataset", "calvin", {"path": root})
    tracemalloc.start()
    try:
        windows = WindowDataset(dataset, robovla.create("action_space", "rel-world"), 8, 10)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(windows) == 3 * n and windows.index[-1].tolist() == [n - 1, 10 * n - 8]
    assert windows.segments[n - 1] == robovla.Segment(10 * n - 10, 10 * n - 1, texts[-1], "open_drawer")
    # bytes per annotation: 48 kept (bounds, two text codes, the window index); the peak is
    # reading the pickle itself (a tuple and two ints per annotation, one str per text)
    assert kept / n < 64 and peak / n < 400, (kept / n, peak / n)


# ------------------------------------------------------------------------------ folders given to write into

def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_frame_cache_never_replaces_a_folder_that_is_not_one(split, tmp_path, capsys, monkeypatch):
    run = tmp_path / "runs" / "r2"  # a trained run with the user's notes in it
    (run / "checkpoints").mkdir(parents=True)
    (run / "NOTES.md").write_text("my notes")
    (run / "checkpoints" / "state.json").write_text("{}")
    before = tree(run)
    assert main(["data", "cache", str(split), "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"--out {run}: not a robovla frame cache (it holds NOTES.md, checkpoints)" in err
    assert "choose a new or empty folder" in err and "Traceback" not in err
    assert tree(run) == before and not list(run.parent.glob("r2.*"))  # no lock, no temporary folder
    mydata = tmp_path / "mydata"  # --train.cache DIR caches into DIR/train
    (mydata / "train").mkdir(parents=True)
    (mydata / "train" / "important.txt").write_text("keep")
    source = robovla.create("dataset", "calvin", {"path": split})
    with pytest.raises(robovla.RobovlaError, match=f"{mydata / 'train'}: not a robovla frame cache .it holds "
                                                   "important.txt."):
        robovla.frame_cache.CachedDataset(source, mydata / "train")
    assert (mydata / "train" / "important.txt").read_text() == "keep"
    fake = tmp_path / "fake"  # an index.json that is not robovla's, or one beside a user's file
    fake.mkdir()
    (fake / "index.json").write_text('{"version": 1}')
    assert main(["data", "cache", str(split), "--out", str(fake)]) == 1 and (fake / "index.json").exists()
    assert f"--out {fake}: not a robovla frame cache (it holds index.json)" in capsys.readouterr().err
    cache, empty = tmp_path / "cache", tmp_path / "empty"
    empty.mkdir()
    stale = '"fingerprint": "x'
    for folder in (cache, empty, cache):  # new, empty, and an earlier (stale) cache are (re)built
        assert main(["data", "cache", str(split), "--out", str(folder)]) == 0
        assert "built" in capsys.readouterr().out and stale not in (folder / "index.json").read_text()
        (folder / "index.json").write_text((folder / "index.json").read_text().replace('"fingerprint": "', stale))
    (cache / "NOTES.md").write_text("mine")  # a user's file inside an earlier cache: not replaced either
    assert main(["data", "cache", str(split), "--out", str(cache)]) == 1 and (cache / "NOTES.md").exists()
    assert "(it holds NOTES.md, action_actions.npy" in capsys.readouterr().err
    monkeypatch.chdir(empty)
    for where in (".", "..", "/"):
        assert main(["data", "cache", str(split), "--out", where]) == 1
        err = capsys.readouterr().err
        assert f"--out {where}: the " in err and "choose a new or empty folder" in err and "Traceback" not in err
    assert tree(tmp_path / "empty") and (tmp_path / "empty").is_dir()


def test_data_synth_writes_only_into_a_new_or_empty_folder(split, tmp_path, capsys):
    before = tree(split)
    dropped = tmp_path / "file"
    dropped.write_text("x")
    for out, what in ((split, "a folder that is not empty"), (dropped, "not a folder")):
        assert main(["data", "synth", "--out", str(out), "--episodes", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}: {what}" in err and "pass a new or empty folder" in err and "Traceback" not in err
    assert tree(split) == before and dropped.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["data", "synth", "--out", str(empty), "--episodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["episodes"] == 1
    assert (empty / "training" / ANN).exists() and (empty / "validation" / ANN).exists()


@pytest.mark.parametrize("argv, message", [
    (["synth", "--episodes", "-3"], "--episodes -3: the number of training episodes is an integer from 1 to 100000"),
    (["synth", "--episodes", "0"], "--episodes 0: the number of training episodes is an integer from 1"),
    (["synth", "--seed", "-1"], "--seed -1: the seed is an integer from 0 to 4294967295"),
    (["synth", "--seed", str(2 ** 32)], f"--seed {2 ** 32}: the seed is an integer from 0"),
    (["check", "SPLIT", "--window", "100000000000000000000"], "--window 100000000000000000000: the window T"),
    (["check", "SPLIT", "--window", "0"], "--window 0: the window T (frames per training sample) is an integer "
                                          "from 1 to 1024"),
    (["check", "SPLIT", "--window", "-5"], "--window -5: the window T"),
])
def test_out_of_range_data_flags_are_usage_errors_naming_the_flag(split, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [str(split) if a == "SPLIT" else a for a in argv] + (["--out", str(out)] if argv[0] == "synth" else [])
    assert main(["data", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "pass one in that range" in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------ small pickles that expand

BOMB_CHECK = """
import json, os, resource, sys
from robovla.cli import main
def vm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
limit = vm() + 2 ** 31  # a regression fails with MemoryError here instead of filling the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(["data", "check", sys.argv[1], "--json"])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"code": code, "grown_mb": grown / 1024}))
"""


def check_in_bounded_process(split):
    """`data check --json` in a fresh process: its report and its peak memory growth in MB."""
    done = subprocess.run([sys.executable, "-c", BOMB_CHECK, str(split)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    decoder = json.JSONDecoder()
    report, end = decoder.raw_decode(done.stdout)
    return report, json.loads(done.stdout[end:])


def test_one_string_referred_to_a_hundred_thousand_times_is_refused_in_small_memory(split):
    n, text = 10 ** 5, "x" * MB  # 100 GB of text once joined; the file is about 1.3 MB
    np.save(split / ANN, {"language": {"ann": [text] * n, "task": ["open_drawer"] * n},
                          "info": {"indx": [(FIRST + 1, FIRST + 10)] * n}}, allow_pickle=True)
    assert (split / ANN).stat().st_size < 2 * MB
    report, run = check_in_bounded_process(split)
    assert run["code"] == 1 and run["grown_mb"] < 100, run
    assert [p["file"] for p in report["problems"]] == [str(split / ANN)]
    message = report["problems"][0]["message"]
    assert "refused to unpickle: the pickle refers to at least" in message and "characters of strings" in message


def test_lists_nested_and_referred_to_many_times_are_refused_in_small_memory(split):
    bomb = [FIRST + 1, FIRST + 10]
    for _ in range(10):  # 8 ** 10 pairs once numpy builds them all: 16 GB
        bomb = [bomb] * 8
    ann = load_npy(split / ANN, allow_pickle=True).item()
    ann["info"]["indx"] = bomb
    np.save(split / ANN, ann, allow_pickle=True)
    assert (split / ANN).stat().st_size < 10_000
    report, run = check_in_bounded_process(split)
    assert run["code"] == 1 and run["grown_mb"] < 100, run
    assert [p["file"] for p in report["problems"]] == [str(split / ANN)]
    message = report["problems"][0]["message"]
    assert "info.indx: not (start, end) integer pairs (entry 0 is of type list ([[[[...], [...], [...], ...], " \
        "[[...], [...], [...], ...]," in message and len(message) < 600  # shown in a line, not expanded


def test_a_long_annotation_is_a_problem_named_by_its_index(split, capsys):
    ann = load_npy(split / ANN, allow_pickle=True).item()
    ann["language"]["ann"][0] = "y" * 5000
    np.save(split / ANN, ann, allow_pickle=True)
    code, report = check_json(split, capsys)
    assert code == 1 and "1 entry of language.ann longer than 4096 characters: language.ann[0] has 5000" in \
        report["problems"][0]["message"]


class Reduce:
    """Pickles as ``call(*args)`` (then ``state``): how a file asks the unpickler to call something."""

    def __init__(self, call, args, state=None):
        self.call, self.args, self.state = call, args, state

    def __reduce__(self):
        return (self.call, self.args) if self.state is None else (self.call, self.args, self.state)


_reconstruct = np.empty(0).__reduce__()[0]


@pytest.mark.parametrize("payload, message", [
    (Reduce(np.ndarray, ((10 ** 9,), "O")), "calls numpy.ndarray directly"),
    (Reduce(_reconstruct, (np.ndarray, (10 ** 9,), b"O")), "8000000000 bytes, which np.save never writes"),
    (Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (10 ** 9,), np.dtype("O"), False, [None])),
     "an array of shape (1000000000,) object (8000000000 bytes) comes with 1 items of data"),
    (Reduce(codecs.encode, (Reduce(codecs.encode, ("ab", "hex")), "hex")), "encodes str with 'hex'"),
])
def test_numpy_and_codecs_calls_that_would_allocate_are_refused_before(tmp_path, payload, message):
    file = tmp_path / "bomb.npy"
    with open(file, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(payload, f, protocol=2)
    (_, peak) = peak_mb(lambda: pytest.raises(RefusedPickleError, load_npy, file, allow_pickle=True))
    with pytest.raises(RefusedPickleError, match="refused to unpickle") as err:
        load_npy(file, allow_pickle=True)
    assert message in str(err.value) and str(file) in str(err.value) and peak < 20, peak


def test_legitimate_pickles_that_reuse_strings_or_hold_long_lines_still_load(tmp_path):
    n = 20_000  # CALVIN-sized: each task name referred to thousands of times, one long line under protocol 0
    stored = {"language": {"ann": [f"instruction {i % 389}" for i in range(n)], "task": ["open_drawer"] * n,
                           "emb": np.arange(n * 8, dtype=np.float32).reshape(n, 1, 8)},
              "info": {"indx": [(10 * i, 10 * i + 9) for i in range(n)]}}
    for protocol in (0, 2, 3, 4, 5):
        file = tmp_path / f"p{protocol}.npy"
        with open(file, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
            pickle.dump(np.array(stored, dtype=object), f, protocol=protocol)
        back = load_npy(file, allow_pickle=True).item()
        assert back["language"]["ann"] == stored["language"]["ann"] and back["info"] == stored["info"], protocol
        assert type(back["language"]["emb"]) is np.ndarray  # a plain array, as np.load gives
        np.testing.assert_array_equal(back["language"]["emb"], stored["language"]["emb"])


def test_missing_folder_names_the_nearest_folder_what_it_holds_and_the_near_miss(tmp_path):
    task = tmp_path / "task_D_D"
    for name in ("training", "validation", ".hidden"):
        (task / name).mkdir(parents=True)
    (task / "notes.txt").write_text("x")
    holds = f"no such folder; the nearest existing folder is {task}, which holds notes.txt, training/, validation/"
    assert missing_folder(task / "trainng") == f"{holds} (did you mean {task / 'training'}?)"
    assert missing_folder(task / "zzz" / "training") == holds  # no near miss: no hint
    assert missing_folder(task / "notes.txt") == "is a file, not a folder"
    assert missing_folder(task / "notes.txt" / "training") == f"no such folder ({task / 'notes.txt'} is a file)"
    assert missing_folder(task / "training" / "x") == \
        f"no such folder; the nearest existing folder is {task / 'training'}, which holds nothing"
    many = tmp_path / "many"
    for i in range(14):
        (many / f"ep{i}").mkdir(parents=True)
    assert missing_folder(many / "ep100x") == \
        f"no such folder; the nearest existing folder is {many}, which holds ep0/, ep1/, ep2/, ep3/, ep4/, ep5/, " \
        f"ep6/, ep7/, ep8/, ep9/, ep10/, ep11/, ... (14 entries) (did you mean {many / 'ep10'}?)"
    (task / "dangling").symlink_to(tmp_path / "nowhere")
    assert missing_folder(task / "dangling") == \
        f"no such folder: {task / 'dangling'} is a broken symbolic link (to {tmp_path / 'nowhere'})"

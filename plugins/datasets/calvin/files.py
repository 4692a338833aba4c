"""CALVIN's files, read as data: what each holds, and readers that check it.

A downloaded split is not trusted. The two pickled index files (``auto_lang_ann.npy``,
``scene_info.npy``) are rebuilt by robovla's restricted unpickler (plain containers,
strings, numbers and numpy arrays only), frame members are checked from their npy header
before their data is inflated, and only regular files are opened.
"""

from __future__ import annotations

import array
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

import robovla
from robovla.batch import ROBOT_OBS_DIM
from robovla.safe_read import RefusedPickleError, UnsafeFileError, load_npy

CAMERA_KEYS = {"static": "rgb_static", "gripper": "rgb_gripper"}
SHAPES = {"rgb_static": (200, 200, 3), "rgb_gripper": (84, 84, 3), "robot_obs": (ROBOT_OBS_DIM,), "actions": (7,),
          "rel_actions": (7,)}
ANNOTATIONS = "lang_annotations/auto_lang_ann.npy"
SCENES = "scene_info.npy"
ANNOTATIONS_FORMAT = ("a pickled dict with language.ann, language.task (lists of str) and info.indx (list of "
                      "(start, end))")
SCENES_FORMAT = "a pickled dict {scene name: [first id, last id]}"
FRAME_NAME = re.compile(r"episode_(\d+)\.npz")
TEXT_LIMIT = 4096  # characters of one instruction or task name (CALVIN's are a few dozen)
_REPR = reprlib.Repr()  # how a value that is not what it should be is shown: a few levels, a few items
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxother = 3, 3, 3, 3, 40


class CalvinDataError(robovla.RobovlaError, ValueError):
    """A CALVIN split cannot be read; the message names the file and key."""


def frame_file(root: Path, frame: int) -> Path:
    return root / f"episode_{frame:07d}.npz"


def frame_ids(root: Path) -> np.ndarray:
    """The ids of the frame files in ``root`` (whatever they are: files, links, pipes), sorted,
    int64 [n]; one pass over the folder, 8 bytes per frame."""
    ids = array.array("q")
    with os.scandir(root) as entries:
        for entry in entries:
            match = FRAME_NAME.fullmatch(entry.name)
            if match and frame_file(root, int(match[1])).name == entry.name:
                ids.append(int(match[1]))
    return np.sort(np.frombuffer(ids, dtype=np.int64))


def _frame_check(key: str) -> Callable[[tuple[int, ...], np.dtype], str | None]:
    def check(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        problems = [] if shape == SHAPES[key] else [f"shape {shape}, expected {SHAPES[key]}"]
        if key.startswith("rgb_"):
            if dtype != np.uint8:
                problems.append(f"dtype {dtype}, expected uint8")
        elif dtype.kind != "f":
            problems.append(f"dtype {dtype}, expected float64")
        return "; ".join(problems) or None
    return check


FRAME_CHECKS = {key: _frame_check(key) for key in SHAPES}
"""Per frame key: the check of its npy header (shape and dtype), made before its data is read."""


def read_pickled_dict(file: Path, what: str) -> dict | None:
    """The dict a CALVIN ``.npy`` pickles (np.save of a dict), or None when the file is absent.
    Anything but plain data in the pickle is refused unbuilt, naming the file."""
    try:
        stored = load_npy(file, allow_pickle=True)
    except RefusedPickleError as exc:
        raise CalvinDataError(str(exc)) from None
    except UnsafeFileError as exc:
        if exc.missing:
            return None
        raise CalvinDataError(f"{file}: expected {what} ({exc.detail})") from None
    value = stored.item() if stored.shape == () and stored.dtype == object else stored
    if not isinstance(value, dict):
        got = f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else \
            f"a {type(value).__name__}"
        raise CalvinDataError(f"{file}: expected {what}, got {got}")
    return value


def _at(tree: Any, path: tuple[str, ...], problems: list[str]) -> Any:
    for i, key in enumerate(path):
        if not isinstance(tree, dict) or key not in tree:
            problems.append(f"no key {'.'.join(path[:i + 1])}")
            return None
        tree = tree[key]
    return tree


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
            return f"bytes {value[:24]!r}"
        except UnicodeDecodeError:
            return f"bytes that are not UTF-8 text {value[:24]!r}"
    if isinstance(value, str):
        return f"a str that is not valid Unicode {value[:24].encode('utf-8', 'backslashreplace')!r}"
    shown = _REPR.repr(value)  # bounded depth and items per level
    return f"of type {type(value).__name__} ({shown if len(shown) <= 80 else shown[:77] + '...'})"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def texts_at(tree: Any, path: tuple[str, ...], problems: list[str]) -> list[str]:
    """The list of str at ``path`` (e.g. language.ann); what is not text goes to ``problems``
    by index (bytes are not decoded behind the user's back)."""
    name = ".".join(path)
    seq = _at(tree, path, problems)
    if seq is None:
        return []
    if not isinstance(seq, (list, tuple, np.ndarray)) or (isinstance(seq, np.ndarray) and seq.ndim != 1):
        problems.append(f"{name} is a {type(seq).__name__}, not a list of str")
        return []
    seq = list(seq)
    bad = [i for i, t in enumerate(seq) if not isinstance(t, str)]
    long = [i for i, t in enumerate(seq) if isinstance(t, str) and len(t) > TEXT_LIMIT]
    if long and not bad:  # each text checked by itself: a file may refer to one long string many times
        problems.append(f"{len(long)} entr{'ies' if len(long) > 1 else 'y'} of {name} longer than {TEXT_LIMIT} "
                        f"characters: {name}[{long[0]}] has {len(seq[long[0]])}")
        return []
    if not bad:  # lone surrogates: no tokenizer can read them
        bad = [i for i, t in enumerate(seq) if not (t.isascii() or _utf8(t))]
    if bad:
        shown = ", ".join(f"{name}[{i}] is {_show(seq[i])}" for i in bad[:3])
        problems.append(f"{len(bad)} entr{'ies' if len(bad) > 1 else 'y'} of {name} not text: {shown}"
                        f"{' ...' * (len(bad) > 3)}")
        return []
    return [str(t) for t in seq]


def pairs_at(tree: Any, path: tuple[str, ...], problems: list[str]) -> np.ndarray:
    """The (start, end) integer pairs at ``path`` (e.g. info.indx) as int64 [n, 2]."""
    name = ".".join(path)
    seq = _at(tree, path, problems)
    if seq is None:
        return np.empty((0, 2), np.int64)
    return as_pairs(seq, name, problems, rows=None)


def as_pairs(seq: Any, name: str, problems: list[str], rows: int | None) -> np.ndarray:
    """``seq`` as int64 [n, 2] (``rows`` of them when given), or a problem and an empty array.
    Each entry is checked to be a pair of integers before numpy sees the whole: lists nested
    in lists that a small pickle refers to many times over would make numpy build every copy."""
    bad = _not_a_pair(seq)
    if bad is not None:
        problems.append(f"{name}: not (start, end) integer pairs ({bad})")
        return np.empty((0, 2), np.int64)
    try:
        pairs = np.asarray(seq)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:  # e.g. ints past int64
        problems.append(f"{name}: not (start, end) integer pairs ({type(exc).__name__}: {exc})")
        return np.empty((0, 2), np.int64)
    if pairs.size == 0 and rows is None:
        return np.empty((0, 2), np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu" or \
            (rows is not None and len(pairs) != rows) or \
            (pairs.dtype.kind == "u" and pairs.size and pairs.max() > np.iinfo(np.int64).max):
        problems.append(f"{name}: expected (start, end) integer pairs, got a {pairs.dtype} array of shape "
                        f"{pairs.shape}")
        return np.empty((0, 2), np.int64)
    return pairs.astype(np.int64)


def _not_a_pair(seq: Any) -> str | None:
    """What makes ``seq`` not a sequence of (start, end) integer pairs, found entry by entry;
    None when each entry is a pair of integers (or ``seq`` a numeric array: numpy's own)."""
    if isinstance(seq, np.ndarray) and not seq.dtype.hasobject:
        return None
    if not isinstance(seq, (list, tuple, np.ndarray)):
        return f"a {type(seq).__name__} ({_show(seq)})"
    for i, pair in enumerate(seq):
        if isinstance(pair, np.ndarray) and pair.shape == (2,):
            pair = pair.tolist()
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or \
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
            return f"entry {i} is {_show(pair)}"
    return None

"""`robo-run data check` finds planted faults by file and key; `data stats` writes statistics."""

import json
import shutil

import numpy as np
import pytest

from robovla.cli import main

from calvin_files import FIRST, rel_action, write_split


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("calvin") / "training", recordings=[(FIRST, FIRST + 19)],
                       annotations=[(FIRST + 2, FIRST + 15, "lift the red block", "lift_red_block"),
                                    (FIRST + 5, FIRST + 19, "open the drawer", "open_drawer")])


def check_json(path, capsys, *extra):
    code = main(["data", "check", str(path), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_a_clean_split_passes_with_counts(clean, capsys):
    code, report = check_json(clean, capsys)
    # samples: (15 - 2 - 8 + 2) + (19 - 5 - 8 + 2) = 7 + 8
    mapping = {"camera static": "rgb_static", "camera gripper": "rgb_gripper", "robot_obs": "robot_obs [15]",
               "actions['rel_actions']": "rel_actions [7]", "actions['actions']": "actions [7]",
               "instruction": "language.ann (lang_annotations/auto_lang_ann.npy)"}
    assert (code, report) == (0, {"frames": 20, "segments": 1, "annotations": 2, "samples": 15, "mapping": mapping,
                                  "problems": []})
    assert check_json(clean, capsys, "--window", "4")[1]["samples"] == 11 + 12


def test_each_planted_fault_is_reported_with_its_file(clean, tmp_path, capsys):
    bad = tmp_path / "training"
    shutil.copytree(clean, bad)
    truncated = bad / f"episode_{FIRST + 3:07d}.npz"
    truncated.write_bytes(truncated.read_bytes()[:500])
    with np.load(bad / f"episode_{FIRST + 4:07d}.npz") as npz:
        kept = {k: npz[k] for k in npz.files if k != "robot_obs"}
    np.savez_compressed(bad / f"episode_{FIRST + 4:07d}.npz", **kept)
    with np.load(bad / f"episode_{FIRST + 5:07d}.npz") as npz:
        data = dict(npz)
    data["rel_actions"] = np.array([0.1, np.nan, 0, 0, 0, 0, 1.0])
    np.savez_compressed(bad / f"episode_{FIRST + 5:07d}.npz", **data)
    (bad / f"episode_{FIRST + 6:07d}.npz").unlink()
    ann = np.load(bad / "lang_annotations/auto_lang_ann.npy", allow_pickle=True).item()
    ann["info"]["indx"][1] = (FIRST + 5, FIRST + 25)  # past the last frame
    np.save(bad / "lang_annotations/auto_lang_ann.npy", ann, allow_pickle=True)

    code, report = check_json(bad, capsys)
    assert code == 1
    found = {(p["file"].rsplit("/", 1)[-1], p["key"]): p["message"] for p in report["problems"]}
    assert found.pop(("auto_lang_ann.npy", "info.indx[1]")).startswith(f"annotation ({FIRST + 5}, {FIRST + 25}) is not inside")
    assert found.pop((f"episode_{FIRST + 3:07d}.npz", "")).startswith("unreadable or truncated npz")
    assert found.pop((f"episode_{FIRST + 4:07d}.npz", "robot_obs")).startswith("missing key")
    assert found.pop((f"episode_{FIRST + 5:07d}.npz", "rel_actions")) == "non-finite values at [1]"
    assert found.pop((f"episode_{FIRST + 6:07d}.npz", "")).startswith("frame missing inside a recording range")
    assert found == {}
    assert main(["data", "check", str(bad)]) == 1
    text = capsys.readouterr().out
    assert f"episode_{FIRST + 5:07d}.npz [rel_actions]: non-finite values at [1]" in text and "5 problems" in text


def test_stats_are_written_next_to_the_data(clean, capsys):
    assert main(["data", "stats", str(clean), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((clean / "robovla_stats.json").read_text()) == result
    frames = range(FIRST + 2, FIRST + 20)  # the union of the annotated ranges
    rel = np.stack([rel_action(f) for f in frames])
    assert result["rel_actions"]["count"] == [18.0]
    np.testing.assert_allclose(result["rel_actions"]["mean"], rel.mean(0), atol=1e-12)
    np.testing.assert_allclose(result["rel_actions"]["max"], rel.max(0))
    assert set(result) == {"robot_obs", "rel_actions", "actions"} and len(result["robot_obs"]["q99"]) == 15


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "lang_annotations/auto_lang_ann.npy").write_bytes(b""), "auto_lang_ann.npy: expected a pickled dict"),
    (lambda d: np.save(d / "lang_annotations/auto_lang_ann.npy", np.arange(3)), "auto_lang_ann.npy: expected a pickled dict"),
    (lambda d: np.save(d / "ep_start_end_ids.npy", np.array([[FIRST + 19, FIRST]])), "end before they start"),
    (lambda d: (d / "ep_start_end_ids.npy").write_bytes(b""), "ep_start_end_ids.npy: cannot read"),
    (lambda d: np.save(d / f"episode_{FIRST + 4:07d}.npz", np.zeros(3)), "not an npz archive"),
])
def test_malformed_files_are_problems_not_crashes(clean, tmp_path, capsys, damage, message):
    bad = tmp_path / "training"
    shutil.copytree(clean, bad)
    damage(bad)
    if (bad / f"episode_{FIRST + 4:07d}.npz.npy").exists():  # np.save appends .npy: put it under the frame's name
        (bad / f"episode_{FIRST + 4:07d}.npz.npy").rename(bad / f"episode_{FIRST + 4:07d}.npz")
    code, report = check_json(bad, capsys)
    assert code == 1 and any(message in p["message"] or message in p["file"] + ": " + p["message"]
                             for p in report["problems"]), report["problems"]

"""robovla against RoboVLMs' own numbers: the Kosmos-2 and PaLI-Gemma LSTM policies.

The fixtures hold what RoboVLMs' classes computed on a tiny random Kosmos-2 and a tiny
random PaLI-Gemma (inputs, image tokens, the assembled sequence, hidden states, [LRN] states,
head outputs, loss terms, five gradients, online steps) and the whole VLA under RoboVLMs'
tensor names. The weights go through ``robo-run convert robovlms``, and robovla then
computes everything from the uint8 images and the instruction strings, stage by stage.

``ROBOVLA_PARITY_DIR`` names the parity folder that holds one folder per fixture
(``robovlms-kosmos-lstm/``, ``robovlms-paligemma-lstm/``), or one of those folders; .ci/run
sets it. Unset, these tests skip; set to a folder without complete fixtures, they fail.

One departure is deliberate and tested as such: RoboVLMs puts [LRN] at one index for the
whole padded batch, so a sample with a shorter instruction reads [LRN] after its EOS and
padding; robovla puts it right after each sample's own instruction, so a padded sample
equals the same sample run alone (``unequal``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import robovla
from robovla.cli import main
from robovla.convert import convert
from robovla.dataset import Frames, Segment
from robovla.env import Observation
from robovla.windows import frames_needed, make_window
from robovla_plugins.backbones.robovlms import FAMILIES, HEAD_RULES, rename

from helpers import synth_split, train_tiny

FIXTURES = {"kosmos": "robovlms-kosmos-lstm", "paligemma": "robovlms-paligemma-lstm"}
CASES = {"kosmos": ("equal", "hand", "unequal"), "paligemma": ("equal", "hand")}
FILES = {"kosmos": ("weights.safetensors", "grads.safetensors", "equal.npz", "hand.npz", "unequal.npz", "step.npz",
                    "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"),
         "paligemma": ("weights.safetensors", "grads.safetensors", "equal.npz", "hand.npz", "hf/config.json",
                       "hf/model.safetensors", "hf/tokenizer.json")}
T, C = 4, 3  # the fixtures' window and chunk
HIDDEN, ACTIONS, LOSS, GRADIENT = 1e-5, 1e-5, 1e-5, 1e-5  # absolute; gradients: relative to the reference norm


def fixture_dir(family: str) -> Path:
    root = os.environ.get("ROBOVLA_PARITY_DIR")
    if not root:
        pytest.skip("ROBOVLA_PARITY_DIR is not set: it names the folder of RoboVLMs parity fixtures "
                    "(.ci/run sets it to ../shared/parity)")
    root = Path(root).expanduser()
    if root.name in FIXTURES.values():  # one fixture's folder named: its siblings are the others
        root = root.parent
    folder = root / FIXTURES[family]
    missing = [f for f in FILES[family] if not (folder / f).is_file()]
    assert not missing, (f"ROBOVLA_PARITY_DIR={root}: {folder} lacks {missing}; the variable names the parity folder "
                         f"holding {sorted(FIXTURES.values())}")
    return folder


def robovlms_config(family: str, hand: bool) -> dict:
    """The RoboVLMs JSON config of the fixture's run (its README's settings), as --config reads it."""
    name = {"kosmos": "RoboKosMos", "paligemma": "RoboPaligemma"}[family]
    return {"robovlm_name": name, "model": family, "window_size": T, "fwd_pred_next_n": C, "use_hand_rgb": hand,
            "norm_action": True, "norm_min": -0.65, "norm_max": 0.65, "arm_gripper_loss_ratio": 0.01,
            "act_head": {"type": "LSTMDecoder", "hidden_size": 64, "action_dim": 7, "latent": 1,
                         "action_space": "continuous", "history_type": "post"}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, case) -> run folder converted from the fixture's weights (cameras as the case reads them)."""
    runs: dict[tuple[str, bool], Path] = {}

    def get(family: str, case: str) -> Path:
        folder, hand = fixture_dir(family), case == "hand"
        if (family, hand) not in runs:
            tmp = tmp_path_factory.mktemp(f"{family}-{'hand' if hand else 'static'}")
            (tmp / "robovlms.json").write_text(json.dumps(robovlms_config(family, hand)))
            runs[family, hand] = convert("robovlms", folder / "weights.safetensors", str(folder / "hf"),
                                         tmp / "run", tmp / "robovlms.json", [("fabric.precision", "32-true")],
                                         echo=lambda *_: None)
        return runs[family, hand]

    return get


def close(actual, expected, atol: float, what: str) -> None:
    actual = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, RoboVLMs {expected.shape}"
    gap = float(np.abs(actual.astype(np.float64) - expected).max()) if actual.size else 0.0
    assert gap <= atol, f"{what}: largest difference to RoboVLMs {gap:.3g} > {atol:g}"


def cameras(case: str) -> list[str]:
    return ["gripper", "static"] if case == "hand" else ["static"]


def images(data, case: str) -> dict[str, torch.Tensor]:
    return {cam: torch.from_numpy(data[f"images_{cam}"]) for cam in cameras(case)}


def image_scale(vla) -> float:
    """robovla's image tokens over RoboVLMs': PaLI-Gemma's are 8x (transformers 5's get_image_features does not
    divide by sqrt(D); Gemma multiplies every input by it), Kosmos-2's the same."""
    return math.sqrt(vla.backbone.hidden_size) if vla.backbone.learned_token_scale != 1.0 else 1.0


def targets(data, vla, space):
    """Targets [B, T, C, A] and mask [B, T, C] cut by robovla's own windows from the raw actions."""
    acts, masks = [], []
    for b, instruction in enumerate(data["instructions"]):
        end = int(data["action_mask_raw"][b].sum()) - 1  # the sample's last real action
        segment = Segment(0, end, str(instruction))
        first, last = frames_needed(0, segment, T, C)
        raw = data["actions_raw"][b, first:last + 1]
        frames = Frames(images={}, robot_obs=np.zeros((len(raw), 15)), actions={"rel_actions": raw})
        window = make_window(frames, 0, segment, T, C, space)
        acts.append(window.actions)
        masks.append(window.action_mask)
    return torch.from_numpy(np.stack(acts)), torch.from_numpy(np.stack(masks))


PARAMS = [(f, c) for f in FIXTURES for c in CASES[f]]


@pytest.mark.parametrize("family, case", PARAMS)
def test_tokens_pixels_image_tokens_and_sequence(converted, family, case):
    data = np.load(fixture_dir(family) / f"{case}.npz")
    vla = robovla.Policy.from_run(converted(family, case)).vla
    bb = vla.backbone
    tokens = vla.tokenize(list(data["instructions"]))
    for b in range(len(tokens.ids)):
        ours = [bb.bos_token_id, *tokens.ids[b][tokens.mask[b]].tolist(), bb.eos_token_id]
        assert ours == data["text_ids"][b][data["text_mask"][b]].tolist(), f"sample {b}: token ids"
    for cam in cameras(case):
        pixels = bb.preprocess_images(torch.from_numpy(data[f"images_{cam}"]).flatten(0, 1), cam)
        close(pixels, data[f"pixel_values_{cam}"].reshape(-1, 3, *pixels.shape[-2:]), 1e-6, f"{cam} pixels")
        with torch.no_grad():
            tokens_img = bb.encode_images(pixels, cam) / image_scale(vla)
        close(tokens_img, data[f"image_tokens_{cam}"].reshape(tokens_img.shape), 1e-6, f"{cam} image tokens")
    if case == "unequal":
        return  # the layout differs on purpose: test_padded_sample_equals_itself_alone
    with torch.no_grad():
        embeds, attention, lrn_at, _ = vla.assemble(images(data, case), tokens)
        hidden = bb.forward_embeddings(embeds, attention)
    close(embeds / image_scale(vla), data["input_embeds"], 1e-6, "assembled sequence")
    assert torch.equal(attention, torch.from_numpy(data["attention_mask"])), "attention mask"
    assert lrn_at[:, 0].tolist() == data["lrn_position_mask"].argmax(1).tolist(), "[LRN] positions"
    close(hidden, data["hidden_last"], HIDDEN, "last hidden states")


@pytest.mark.parametrize("family, case", PARAMS)
def test_lrn_states_head_outputs_and_loss_terms(converted, family, case):
    data = np.load(fixture_dir(family) / f"{case}.npz")
    policy = robovla.Policy.from_run(converted(family, case))
    vla = policy.vla
    with torch.no_grad():
        features = vla.features(images(data, case), list(data["instructions"]))
        prediction = vla.head(features)
        lstm_out = vla.head.body(vla.head.frame_features(features))
    suffix, rows = ("_alone", [0]) if case == "unequal" else ("", [0, 1])
    if case == "unequal":  # sample 1 is not padded: it equals the batch reference too
        close(features[1], data["lrn_hidden"][1], HIDDEN, "[LRN] states, unpadded sample")
        close(prediction["arm"][1], data["arm"][1], ACTIONS, "arm, unpadded sample")
    close(features[rows], data[f"lrn_hidden{suffix}"][rows], HIDDEN, "[LRN] states")
    close(prediction["arm"][rows], data[f"arm{suffix}"][rows], ACTIONS, "arm actions")
    close(prediction["gripper"][rows], data[f"gripper_logits{suffix}"][rows], ACTIONS, "gripper logits")
    if case == "unequal":
        return  # RoboVLMs' losses mix in the batch-wide [LRN] of sample 0
    close(lstm_out, data["lstm_out"], ACTIONS, "LSTM outputs")
    actions, mask = targets(data, vla, policy.action_space)
    assert torch.equal(mask, torch.from_numpy(data["action_mask"])), "action mask"
    close(actions[mask], data["action_targets"][data["action_mask"]], 1e-6, "normalized targets")
    with torch.no_grad():
        loss, metrics = vla.head.loss(prediction, actions, mask)
    for ours, theirs in (("arm_loss", "loss_arm"), ("gripper_loss", "loss_gripper"), ("gripper_acc", "gripper_acc")):
        close(metrics[ours], data[theirs], LOSS, theirs)
    close(loss, data["loss_total"], LOSS, "weighted total loss")


@pytest.mark.parametrize("family", FIXTURES)
def test_gradients_of_the_weighted_loss(converted, family):
    folder = fixture_dir(family)
    data, reference = np.load(folder / "equal.npz"), load_file(folder / "grads.safetensors")
    policy = robovla.Policy.from_run(converted(family, "equal"))
    vla = policy.vla
    actions, mask = targets(data, vla, policy.action_space)
    loss, _ = vla.head.loss(vla.head(vla.features(images(data, "equal"), list(data["instructions"]))), actions, mask)
    loss.backward()
    rules = next(f for f in FAMILIES if f.backbone == family).rules + tuple(HEAD_RULES)
    params = dict(vla.named_parameters())
    for name, ref in reference.items():
        ours = params["lrn" if name == "action_token" else rename(name, rules)].grad.reshape(ref.shape).double()
        relative = float((ours - ref.double()).norm() / ref.double().norm())
        assert relative <= GRADIENT, f"gradient of {name}: relative error {relative:.3g} > {GRADIENT:g}"


def assert_steps_like_robovlms(run_dir: Path) -> None:
    """step.npz's six online steps through Policy.from_run(run_dir): [LRN] states, chunks, commands."""
    data = np.load(fixture_dir("kosmos") / "step.npz")
    policy, commands = robovla.Policy.from_run(run_dir), robovla.Policy.from_run(run_dir)
    instructions = list(data["instructions"])
    for n in range(data["images_static"].shape[1]):  # steps 5 and 6: the window slides past T = 4
        obs = [Observation(images={"static": data["images_static"][b, n]}, robot_obs=np.zeros(15)) for b in range(2)]
        with torch.no_grad():
            state = policy.vla.features({"static": torch.from_numpy(data["images_static"][:, n:n + 1])}, instructions)
        close(state, data["lrn_hidden"][:, n:n + 1], HIDDEN, f"step {n + 1}: [LRN] state")
        chunks = policy.predict(obs, instructions, keys=[0, 1])  # [B, C, A]: arm, P(open)
        close(chunks[..., :6], data["arm"][:, n], ACTIONS, f"step {n + 1}: arm actions")
        p_open = 1 / (1 + np.exp(-data["gripper_logits"][:, n, :, 0].astype(np.float64)))
        close(chunks[..., 6], p_open, ACTIONS, f"step {n + 1}: gripper probability")
        # the command: RoboVLMs unnormalizes the first action (x 0.65) and opens when sigmoid > 0.5
        expected = np.concatenate([0.65 * data["arm"][:, n, 0], np.where(p_open[:, :1] > 0.5, 1.0, -1.0)], -1)
        close(commands.act_batch(obs, instructions, keys=[0, 1]), expected, ACTIONS, f"step {n + 1}: command")


def test_online_steps_through_the_policy(converted):
    assert_steps_like_robovlms(converted("kosmos", "step"))


def test_robo_run_convert_then_policy_steps_and_fine_tuning(tmp_path, capsys):
    """The command line as a RoboVLMs user types it; the window comes as a flag (no RoboVLMs
    config ships with the fixture, and the recipe's window is 8)."""
    folder = fixture_dir("kosmos")
    run_dir = tmp_path / "converted"
    assert main(["convert", "robovlms", str(folder / "weights.safetensors"), "--base", str(folder / "hf"),
                 "--out", str(run_dir), "--train.window", "4"]) == 0
    assert f"converted 126 tensors (1,730,901 values) of {folder / 'weights.safetensors'}" in capsys.readouterr().out
    assert_steps_like_robovlms(run_dir)
    training = synth_split(tmp_path / "data")
    tuned = train_tiny(tmp_path, "tuned", training, "--config", str(run_dir / "config.toml"),
                       "--train.init", str(run_dir), "--train.log_every", "1", steps=3)
    rows = [r.split(",") for r in (tuned / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(v) for step, split, key, v in rows if split == "train" and key == "loss"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    assert (tuned / "checkpoints" / "step-000003" / "model.safetensors").is_file()


def test_padded_sample_equals_itself_alone_a_deliberate_departure(converted):
    """RoboVLMs' batch-wide [LRN] index moves sample 0's [LRN] past its EOS and padding; robovla's
    does not, so its [LRN] state equals the sample run alone and differs from RoboVLMs' batch."""
    data = np.load(fixture_dir("kosmos") / "unequal.npz")
    vla = robovla.Policy.from_run(converted("kosmos", "unequal")).vla
    with torch.no_grad():
        features = vla.features(images(data, "unequal"), list(data["instructions"]))
        alone = vla.features({"static": torch.from_numpy(data["images_static"][:1])}, list(data["instructions"][:1]))
    close(features[0], data["lrn_hidden_alone"][0], HIDDEN, "padded sample vs itself alone (RoboVLMs)")
    close(features[:1], alone, 1e-6, "padded sample vs itself alone (robovla)")
    assert float(np.abs(features[0].numpy() - data["lrn_hidden"][0]).max()) > 0.1  # not RoboVLMs' batch value


def test_paligemma_tokenizes_instruction_and_separator_apart_as_together():
    """robovla tokenizes the instruction and the "\\n" that closes the sequence apart (it puts [LRN]
    between them); RoboVLMs tokenizes "<eos>{instruction}\\n" in one go. On a Gemma-style
    tokenizer the ids are the same."""
    from transformers import AutoTokenizer

    folder = fixture_dir("paligemma")
    tok = AutoTokenizer.from_pretrained(folder / "hf")
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    instructions = ["push the blue block", "pull the pink block", "move the slider right", "stack the blue block",
                    "open the drawer", "lift the red block from the table", "turn on the led"]
    for text in instructions:
        assert ids(text + "\n") == ids(text) + ids("\n"), text
        assert ids("<eos>" + text + "\n") == [tok.eos_token_id] + ids(text) + ids("\n"), text
    for case in CASES["paligemma"]:
        data = np.load(folder / f"{case}.npz")
        for b, text in enumerate(data["instructions"]):
            assert data["text_ids"][b][data["text_mask"][b]].tolist() == ids("<eos>" + str(text) + "\n")

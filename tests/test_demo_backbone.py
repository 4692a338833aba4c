"""The demo's backbone, ``cnn-pool``: tokenizer, sequence handling, readout, training switches,
and that it learns the synthetic reach task with the lstm head."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import robovla
from robovla import finetune
from robovla.config import LoraConfig, TrainConfig
from robovla.frame_cache import CachedDataset
from robovla.loader import Preprocess, make_loader
from robovla.backbone import ROLE_IMAGE, ROLE_LRN
from robovla.vla import VLA
from robovla.windows import WindowDataset

from helpers import clean_env

SMALL = {"image_size": 32, "channels": [8, 16], "hidden_size": 32, "heads": 2, "vocab_buckets": 64}
INSTRUCTIONS = ["move to the red block", "Grasp the BLUE block, please!"]


def make(lrn_tokens=1, **config):
    torch.manual_seed(0)
    backbone = robovla.create("backbone", "cnn-pool", {**SMALL, **config})
    return VLA(backbone, nn.Identity(), lrn_tokens).eval()


def frames(vla, b=2, t=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {cam: torch.randint(0, 256, (b, t, size, size, 3), generator=g, dtype=torch.uint8)
            for cam in vla.backbone.cameras}


def test_defaults_read_the_gripper_camera_with_the_documented_sizes():
    backbone = robovla.create("backbone", "cnn-pool")
    assert backbone.cameras == ("gripper",) and backbone.image_size == 80 and backbone.hidden_size == 128
    assert backbone.grid == 10 and backbone.bos_token_id == 1 and backbone.eos_token_id == 2
    count = sum(p.numel() for p in backbone.parameters())
    conv = 3 * 16 * 25 + 16 + 16 * 32 * 9 + 32 + 32 * 64 * 9 + 64 + 2 * (16 + 32 + 64)  # + GroupNorm
    vision = conv + 64 * 128 + 128 + 100 * 128  # projection, 10x10 positions
    readout = 5 * (128 * 128 + 128) + (8 * 128 + 128) + 3 * 2 * 128 + (128 * 256 + 256 + 256 * 128 + 128)
    assert count == vision + 4096 * 128 + readout == 720_384


def test_it_builds_without_hugging_face():
    code = ("import sys, robovla; robovla.create('backbone', 'cnn-pool'); "
            "print(*sorted(m for m in sys.modules if m.startswith(('transformers', 'robovla_plugins.backbones.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["robovla_plugins.backbones.cnn_pool"]


def test_words_hash_to_the_same_ids_in_any_case_and_punctuation():
    vla = make()
    bb = vla.backbone
    tokens = bb.tokenize(INSTRUCTIONS + [""])
    assert tokens.ids.shape == (3, 5) and tokens.mask.sum(1).tolist() == [5, 5, 0]
    ids = tokens.ids[tokens.mask]
    assert ((ids >= 3) & (ids < 64)).all()  # 0-2 are padding, BOS and EOS
    assert tokens.ids[0, 2] == tokens.ids[1, 1] == bb.word_id("the")  # "the", wherever it stands
    assert tokens.ids[1, 2] == bb.word_id("blue") and tokens.ids[0, 3] == bb.word_id("red")
    assert bb.word_id("red") == 3 + 0xFA615F8F % 61  # CRC-32: the same in every process
    again = robovla.create("backbone", "cnn-pool", {**SMALL, "prompt": "the robot should {instruction}"})
    assert again.tokenize(["go"]).mask.sum().item() == 4


def test_only_lrn_positions_change_and_they_read_their_own_frame():
    vla = make(lrn_tokens=2, cameras=["gripper", "static"])
    images = frames(vla)
    tokens = vla.tokenize(INSTRUCTIONS)
    embeds, mask, lrn_at, roles = vla.assemble(images, tokens)
    assert (roles == ROLE_IMAGE).sum(1).tolist() == [2 * 64] * 4  # two cameras, 8x8 grids
    with torch.no_grad():
        hidden = vla.backbone.forward_embeddings(embeds, mask, roles)
    lrn = roles == ROLE_LRN
    assert torch.equal(hidden[~lrn], embeds[~lrn]) and not torch.allclose(hidden[lrn], embeds[lrn])
    with torch.no_grad():  # frame 1 of sample 0 changes: only its own [LRN] states move
        changed = {cam: x.clone() for cam, x in images.items()}
        changed["static"][0, 1] = 255 - changed["static"][0, 1]
        gap = (vla.features(changed, INSTRUCTIONS) - vla.features(images, INSTRUCTIONS)).abs().amax((2, 3))
    assert gap[0, 1] > 1e-3 and gap.flatten().tolist().count(0.0) == 3


def test_readout_pools_where_the_instruction_points():
    """With one head whose query matches one image token's key, the pooled coordinates are
    that token's place on the grid (the soft-argmax), in raster order, per camera."""
    vla = make(cameras=["gripper", "static"], heads=1)
    bb = vla.backbone
    seen = {}
    bb.layers[0].register_forward_pre_hook(lambda module, args: seen.update(xy=args[3], image=args[2]))
    with torch.no_grad():
        vla.features(frames(vla, b=1, t=1), ["go"])
    xy, image = seen["xy"][0], seen["image"][0]
    u = (torch.arange(8) + 0.5) / 8 * 2 - 1
    grid = torch.stack([u.repeat(8), u.repeat_interleave(8)], -1)  # [64, 2], x right, y down
    assert torch.equal(xy[image], torch.cat([grid, grid]))
    pool = bb.layers[0]
    d = bb.hidden_size
    tokens = torch.zeros(1, 66, d)
    tokens[0, 1:65] = torch.randn(64, d)  # 64 distinct image tokens, then one that is not an image's
    tokens[0, 65] = tokens[0, 11]
    mask = torch.zeros(1, 66, dtype=torch.bool)
    mask[0, 1:65] = True
    xy = torch.zeros(1, 66, 2)
    xy[0, 1:65] = grid
    with torch.no_grad():
        for p in pool.parameters():
            p.zero_()
        for norm in (pool.query_norm, pool.image_norm):
            norm.weight.fill_(1.0)
        pool.q_proj.weight.copy_(torch.eye(d) * 20)
        pool.k_proj.weight.copy_(torch.eye(d))
        pool.xy_proj.weight[:2].copy_(torch.eye(2))
        where = pool(tokens[:, 11:12], tokens, mask, xy)  # the query is image token 10's: row 1, column 2
    assert torch.allclose(where[0, 0, :2], grid[10], atol=1e-3) and not where[0, 0, 2:].any() and grid[10].tolist() == [-0.375, -0.625]


def test_config_and_call_errors_say_how_to_fix_them():
    with pytest.raises(robovla.ConfigError, match="image_size 36 must be divisible by 2\\*\\*3"):
        robovla.create("backbone", "cnn-pool", {"image_size": 36, "channels": [8, 8, 8]})
    with pytest.raises(robovla.ConfigError, match="no \\{instruction\\} slot"):
        robovla.create("backbone", "cnn-pool", {"prompt": "go"})
    with pytest.raises(robovla.ConfigError, match="hidden_size 30 must be a multiple of heads 4"):
        robovla.create("backbone", "cnn-pool", {**SMALL, "hidden_size": 30, "heads": 4})
    vla = make()
    embeds, mask, _, _ = vla.assemble(frames(vla), vla.tokenize(INSTRUCTIONS))
    with pytest.raises(ValueError, match="reads the sequence through its roles"):
        vla.backbone.forward_embeddings(embeds, mask)
    with pytest.raises(KeyError, match="reads cameras \\['gripper'\\], not 'static'"):
        vla.backbone.encode_images(torch.zeros(1, 3, 32, 32), "static")


def test_freeze_groups_lora_and_checkpointing():
    vla = make()
    groups = vla.backbone.freeze_groups()
    owned = [id(p) for ms in groups.values() for m in ms for p in m.parameters()]
    assert len(owned) == len(set(owned)) == len(list(vla.backbone.parameters()))
    finetune.setup(vla, TrainConfig(train_vision=False, freeze_decoder_layers=1), LoraConfig())
    trainable = {n.split(".")[1] for n, p in vla.named_parameters() if p.requires_grad and n.startswith("backbone.")}
    assert trainable == {"embedding"}

    lora = make(layers=2)
    finetune.setup(lora, TrainConfig(), LoraConfig(enabled=True, r=2))
    adapted = sorted({n.split(".lora_A")[0].removeprefix("backbone.") for n, _ in lora.named_parameters() if "lora_A" in n})
    assert adapted == [f"layers.{i}.{m}" for i in (0, 1) for m in ("fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj")]

    plain, saved = make(), make()
    plain.train(), saved.train()
    saved.backbone.gradient_checkpointing(True)
    images = frames(plain)
    grads = []
    for vla in (plain, saved):
        out = vla.features(images, INSTRUCTIONS)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vla.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_cnn_pool_and_lstm_learn_the_reach_task(tmp_path):
    """400 steps on a small synthetic split: the training loss falls by a large factor."""
    cls = robovla.get_component("dataset", "calvin").load()
    cls.synthesize(tmp_path, 24, seed=3)
    source = robovla.create("dataset", "calvin", {"path": tmp_path / "training", "cameras": ["gripper"],
                                                  "action_keys": ["rel_actions"]})
    data = CachedDataset(source, tmp_path / "cache")
    space = robovla.create("action_space", "rel-world", {"clip_bound": 1.0})
    windows = WindowDataset(data, space, window=1, chunk=2)
    loader = make_loader(windows, 32, preprocess=Preprocess(image_size=64, shift={}), num_workers=0, seed=0)
    torch.manual_seed(0)
    backbone = robovla.create("backbone", "cnn-pool", {"image_size": 64, "hidden_size": 64})
    head = robovla.create("head", "lstm", {"hidden_size": 64, "num_layers": 1, "mlp_widths": [64],
                                           "arm_gripper_loss_ratio": 0.1}, dims=robovla.Dims(D=64, T=1, C=2))
    vla = VLA(backbone, head).train()
    optimizer = torch.optim.AdamW(vla.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for epoch in range(100):
        loader.set_epoch(epoch)
        for batch in loader:
            loss, _ = vla.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
        if len(losses) >= 400:
            break
    first, last = np.mean(losses[:50]), np.mean(losses[350:400])
    assert first > 0.1 and last < first / 5, (first, last)  # measured: 0.132 -> 0.013

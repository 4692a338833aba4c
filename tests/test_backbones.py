"""The built-in backbones at tiny size: loading, the sequence layout, training setups and LoRA."""

import re

import pytest
import torch
from torch import nn

import robovla
from robovla import finetune, registry_file
from robovla.config import LoraConfig, TrainConfig
from robovla.vla import VLA
from robovla_plugins.backbones.hf import BackboneLoadError

NAMES = ["kosmos", "paligemma"]
INSTRUCTIONS = ["open the drawer", "push the red block to the left"]


def make(name, lrn_tokens=1, **config):
    torch.manual_seed(0)
    return VLA(robovla.create("backbone", name, {"size": "tiny", **config}), nn.Linear(64, 3), lrn_tokens).eval()


def frames(vla, b=2, t=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {cam: torch.randint(0, 256, (b, t, 48, 48, 3), generator=g, dtype=torch.uint8)
            for cam in vla.backbone.cameras}


@pytest.mark.parametrize("name", NAMES)
def test_saved_folder_loads_through_path_with_the_same_lrn_states(name, tmp_path):
    vla = make(name)
    vla.backbone.save_pretrained(tmp_path / name)
    again = VLA(robovla.create("backbone", name, {"path": str(tmp_path / name)}), nn.Linear(64, 3)).eval()
    again.load_state_dict(vla.state_dict(), strict=False)  # [LRN] and head: not part of the backbone folder
    images = frames(vla)
    with torch.no_grad():
        gap = (vla.features(images, INSTRUCTIONS) - again.features(images, INSTRUCTIONS)).abs().max().item()
    assert gap == 0.0
    assert again.backbone.tokenize(INSTRUCTIONS).ids.tolist() == vla.backbone.tokenize(INSTRUCTIONS).ids.tolist()
    assert torch.equal(again.backbone.mean, vla.backbone.mean) and again.backbone.image_size == 32


@pytest.mark.parametrize("name", NAMES)
def test_a_known_checkpoint_must_read_images_as_the_registry_says(name, tmp_path, monkeypatch):
    """registry.toml's image_size and image_tokens of a checkpoint are checked when it loads;
    its mean and std normalize the images."""
    vla = make(name)
    n = vla.backbone.image_tokens()
    img = vla.backbone.encode_images(vla.backbone.preprocess_images(frames(vla)["static"].flatten(0, 1), "static"),
                                     "static")
    assert img.shape[1] == n  # N as encode_images gives it
    folder = str(tmp_path / name)
    vla.backbone.save_pretrained(folder)
    table = {folder: {"image_size": 32, "image_tokens": n, "mean": [0.25] * 3, "std": [0.5] * 3}}
    monkeypatch.setattr(registry_file, "checkpoints", lambda family: table if family == name else {})
    loaded = robovla.create("backbone", name, {"path": folder})
    assert loaded.mean.flatten().tolist() == [0.25] * 3 and loaded.std.flatten().tolist() == [0.5] * 3
    table[folder].update(image_size=224, image_tokens=n + 1)
    with pytest.raises(BackboneLoadError) as info:
        robovla.create("backbone", name, {"path": folder})
    message = str(info.value)
    assert f'[checkpoints.{name}."{folder}"] in' in message and "registry.toml" in message
    assert f"(image_size 224 there, 32 in the model; image_tokens {n + 1} there, {n} in the model)" in message
    assert "hf download" in message
    hub = robovla.get_component("backbone", name).load().Config().path  # the published architecture, random
    table[hub] = {"image_size": 448}
    with torch.device("meta"), pytest.raises(BackboneLoadError, match="image_size 448 there, 224 in the model.*"
                                                                      "transformers' default"):
        robovla.create("backbone", name, {"weights": "random"})
    # at tiny size the table does not apply: the path is only where the full weights would come from
    assert robovla.create("backbone", name, {"path": folder, "size": "tiny"}).image_size == 32


@pytest.mark.parametrize("name", NAMES)
def test_offline_without_a_copy_fails_at_once_naming_both_ways_out(name, monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dialled = []  # at once: no connection attempted, so no half a minute of retries
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: dialled.append(address))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: dialled.append(address))
    with pytest.raises(BackboneLoadError) as info:
        robovla.create("backbone", name, {})
    message = str(info.value)
    assert dialled == []
    assert "--backbone.path" in message and "--backbone.size tiny" in message and "hf download" in message
    with pytest.raises(BackboneLoadError, match="not a folder"):
        robovla.create("backbone", name, {"path": "./no/such/folder"})


def test_kosmos_sequence_is_bos_gripper_static_prompt_lrn_eos():
    vla = make("kosmos", lrn_tokens=2)
    bb = vla.backbone
    tokens = vla.tokenize(INSTRUCTIONS)
    embeds, mask, lrn_at, roles = vla.assemble(frames(vla), tokens)
    n = bb.model.config.latent_query_num  # image tokens per camera, 64 at full size
    lengths = tokens.mask.sum(1)
    assert bb.tokenizer.decode(tokens.ids[0, :lengths[0]]) == "<grounding>An image of a robot open the drawer"
    assert embeds.shape[:2] == mask.shape == (6, 1 + 2 * n + int(lengths.max()) + 2 + 1)
    first = 1 + 2 * n + lengths  # [B]: where [LRN] starts, per sample
    assert lrn_at.tolist() == [[int(first[b]), int(first[b]) + 1] for b in (0, 0, 0, 1, 1, 1)]
    eos = bb.embed_tokens(torch.tensor([bb.eos_token_id]))[0]
    for m, b in [(0, 0), (3, 1)]:
        assert torch.equal(embeds[m, int(first[b]) + 2], eos)  # EOS right after the K [LRN]
        assert torch.equal(embeds[m, 0], bb.embed_tokens(torch.tensor([bb.bos_token_id]))[0])
        assert int(mask[m].sum()) == int(first[b]) + 3 and not mask[m, int(first[b]) + 3:].any()
    assert torch.equal(embeds[0, int(first[0])], vla.lrn[0]) and torch.equal(embeds[0, int(first[0]) + 1], vla.lrn[1])
    img = bb.encode_images(bb.preprocess_images(frames(vla)["gripper"].flatten(0, 1), "gripper"), "gripper")
    assert img.shape[1] == n  # the gripper camera comes first (both cameras go through one batched vision pass)
    torch.testing.assert_close(embeds[:, 1: 1 + n], img, atol=1e-6, rtol=1e-5)
    for m, b in [(0, 0), (3, 1)]:  # BOS, 2N image tokens, the text, K [LRN], EOS, padding
        row = [0] + [1] * (2 * n) + [2] * int(lengths[b]) + [3, 3] + [0] * (1 + int(lengths.max() - lengths[b]))
        assert roles[m].tolist() == row


def test_paligemma_follows_the_recipe_layout_and_attends_causally():
    vla = make("paligemma")
    bb = vla.backbone
    newline = bb.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert bb.bos_token_id == bb.tokenizer.eos_token_id and [bb.eos_token_id] == newline
    assert bb.tokenizer.decode(bb.tokenize(["open the drawer"]).ids[0]) == "open the drawer"
    embeds, mask, lrn_at, _ = vla.assemble(frames(vla, b=1, t=1), vla.tokenize(["open the drawer"]))
    # [<eos>][images][instruction][LRN]["\n"]: [LRN] sits before the separator, as the recipe puts it
    assert lrn_at.item() == embeds.shape[1] - 2
    assert torch.equal(embeds[0, -1], bb.embed_tokens(torch.tensor(newline))[0])
    # [LRN] enters scaled like the text (Gemma's embedding layer multiplies by sqrt(D))
    assert bb.learned_token_scale == pytest.approx(8.0)
    with torch.no_grad():
        hidden = bb.forward_embeddings(embeds, mask)
        changed = embeds.clone()
        changed[:, -1] += 1.0
        later = bb.forward_embeddings(changed, mask)
    assert torch.equal(hidden[:, :-1], later[:, :-1])  # no position sees a later one, padded or not


def test_training_setups_count_trainable_parameters_per_group():
    vla = make("kosmos")
    groups = vla.backbone.freeze_groups()
    size = {g: sum(p.numel() for m in ms for p in m.parameters()) for g, ms in groups.items()}
    total = sum(p.numel() for p in vla.parameters())
    head = sum(p.numel() for p in vla.head.parameters())

    finetune.setup(vla, TrainConfig(), LoraConfig())
    assert sum(p.numel() for p in vla.parameters() if p.requires_grad) == total  # full fine-tuning
    lines = finetune.summary(vla)
    assert lines[-1].split() == ["total", f"{total:,}", "trainable", "of", f"{total:,}", "(100.00%)"]

    first_layer = sum(p.numel() for p in groups["decoder"][0].parameters())
    finetune.setup(vla, TrainConfig(train_vision=False, train_text_embedding=False, freeze_decoder_layers=1),
                   LoraConfig())
    trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
    assert trainable == total - size["vision"] - size["text_embedding"] - first_layer
    row = {line.split("  ")[0].strip(): line for line in finetune.summary(vla)}
    assert row["vision"].split()[1] == "0" and row["decoder"].split()[1] == f"{size['decoder'] - first_layer:,}"
    with pytest.raises(ValueError, match="decoder has 2 layers"):
        finetune.setup(vla, TrainConfig(freeze_decoder_layers=3), LoraConfig())

    lora = make("kosmos")
    finetune.setup(lora, TrainConfig(), LoraConfig(enabled=True, r=4))
    pattern = lora.backbone.lora_targets
    targeted = [m for n, m in make("kosmos").backbone.named_modules()
                if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    expected = sum(4 * (m.in_features + m.out_features) for m in targeted)
    assert len(targeted) == 2 * 6  # q, k, v, out, fc1, fc2 in each of the 2 decoder layers
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected + 64 + head
    assert finetune.summary(lora)[0].split()[:2] == ["lora", f"{expected:,}"]


def test_all_linear_lora_reaches_the_vision_tower():
    vla = make("paligemma")
    finetune.setup(vla, TrainConfig(), LoraConfig(enabled=True, r=2, targets="all-linear"))
    adapted = {n.split(".lora_A")[0] for n, _ in vla.backbone.named_parameters() if ".lora_A" in n}
    assert any("vision_tower" in n for n in adapted) and any("language_model" in n for n in adapted)
    assert any("multi_modal_projector" in n for n in adapted) and not any("lm_head" in n for n in adapted)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_save_load_and_merge_give_the_same_outputs(name, tmp_path):
    vla = make(name)
    finetune.setup(vla, TrainConfig(), LoraConfig(enabled=True, r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in vla.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.normal_(std=0.2)  # as after training: adapters that matter
    images = frames(vla)
    with torch.no_grad():
        expected = vla.head(vla.features(images, INSTRUCTIONS))
    path = finetune.save_trainable(vla, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(path)
    assert "lrn" in saved and any("lora_B" in k for k in saved) and not any("base_layer" in k for k in saved)
    again = make(name)  # the same base weights (same seed), no adapter yet
    finetune.load_trainable(again, tmp_path)
    with torch.no_grad():
        assert (again.head(again.features(images, INSTRUCTIONS)) - expected).abs().max() == 0
        assert finetune.merge_lora(again) == len({k.split(".lora_B")[0] for k in saved if "lora_B" in k})
        assert not any("lora_" in n for n, _ in again.named_parameters())
        assert (again.head(again.features(images, INSTRUCTIONS)) - expected).abs().max() < 1e-5
    again.backbone.save_pretrained(tmp_path / "merged")  # the export: a plain model folder
    merged = robovla.create("backbone", name, {"path": str(tmp_path / "merged")})
    assert not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(name):
    grads = []
    for on in (False, True):
        vla = make(name).train()
        finetune.setup(vla, TrainConfig(gradient_checkpointing=on), LoraConfig())
        torch.manual_seed(5)
        vla.features(frames(vla), INSTRUCTIONS).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in vla.backbone.parameters() if p.grad is not None]))
        flag = getattr(vla.backbone.model, "is_activation_checkpointing", None)
        assert (flag if flag is not None else vla.backbone.model.is_gradient_checkpointing) == on
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_composite_joins_any_timm_encoder_and_causal_lm(family):
    vla = make("composite", language_model_type=family)
    bb = vla.backbone
    assert type(bb.model).__name__.lower().startswith(family) and bb.vision.num_features == 32
    names = [n for n, _ in bb.named_modules()]
    assert bb.lora_targets and all(n.startswith("model.layers.") for n in bb.lora_targets)
    assert set(bb.lora_targets) == {n for n, m in bb.named_modules() if isinstance(m, nn.Linear)
                                    and n.startswith("model.layers.")} and "projector" in names
    # Gemma scales text in its embedding layer, so [LRN] is scaled alike; Llama does not scale
    assert bb.learned_token_scale == pytest.approx(8.0 if family == "gemma" else 1.0)
    img = bb.encode_images(bb.preprocess_images(frames(vla)["static"].flatten(0, 1), "static"), "static")
    assert img.shape == (6, 1 + (32 // 8) ** 2, 64)  # a ViT's class token and 16 patches, projected to D


def test_composite_config_errors_are_clear():
    with pytest.raises(Exception, match="has no {instruction} slot"):
        robovla.create("backbone", "composite", {"size": "tiny", "prompt": "go"})
    with pytest.raises(ValueError, match="shrinks ViT-style timm encoders; resnet18 does not take ViT sizes"):
        robovla.create("backbone", "composite", {"size": "tiny", "vision": "resnet18"})


@pytest.mark.parametrize("name, total, per_layer, layers, n_image", [
    # Kosmos-2: q, k, v, out 2048x2048; fc1 2048->8192, fc2 back; 24 layers; 64 latent queries
    ("kosmos", 1_664_487_424, 4 * 64 * (2048 + 2048) + 2 * 64 * (2048 + 8192), 24, 64),
    # Gemma 2B: q 2048->2048, k and v 2048->256 (one KV head), o back; gate, up 2048->16384, down back;
    # SigLIP: (224 / 14)^2 patches
    ("paligemma", 2_910_392_576, 2 * 64 * 4096 + 2 * 64 * (2048 + 256) + 3 * 64 * (2048 + 16384), 18, 256)])
def test_full_size_architectures_and_their_lora_counts(name, total, per_layer, layers, n_image):
    for lora in (False, True):
        with torch.device("meta"):  # the published architecture, no memory
            vla = VLA(robovla.create("backbone", name, {"weights": "random"}), nn.Identity())
            finetune.setup(vla, TrainConfig(), LoraConfig(enabled=lora, r=64))
        trainable = sum(p.numel() for p in vla.parameters() if p.requires_grad)
        assert trainable == (per_layer * layers + 2048 if lora else total)  # 2048: [LRN]
        bb = vla.backbone  # the published architecture reads images as registry.toml says
        known = registry_file.checkpoints(name)[bb.config.path]
        assert (bb.image_size, bb.image_tokens()) == (known["image_size"], known["image_tokens"]) == (224, n_image)
        assert finetune.summary(vla)[-1].split()[1] == f"{trainable:,}"

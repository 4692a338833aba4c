"""Grounding pre-training of a small Kosmos-2 on the synthetic task's scenes, the way Kosmos-2
itself was trained: transformers' own language-model loss on grounded captions.

Each sample is one camera image of a random block layout (1 to 3 blocks; the gripper or the
static view, or a close-up, rendered by the synthetic task's own renderer with its camera
noise) and a caption in Kosmos-2's format, where a phrase is followed by its box as two patch-index
tokens (top-left and bottom-right patch on the vision encoder's patch grid)::

    <grounding> <phrase> the red block </phrase> <object> <patch_index_0012> <patch_index_0013> </object> , ...
    <grounding> an image of a robot move to <phrase> the red block </phrase> <object> ... </object>
    an image of a red block , a blue block and a green block .

The second kind words the phrase as the VLA's prompt does ("<grounding>An image of a robot
{instruction}"), so that what grounding teaches sits where [LRN] later reads it. The
sequence is laid out as the VLA lays out a frame: ``<s>``, the image tokens, the caption,
``</s>`` (no ``<image>`` tags).

Three choices made it learn, each measured (README, "What pre-training buys"): the image
path starts as a spatial pass-through (:func:`spatial_init`), a curriculum starts with one
block per scene and mostly close-ups, and the language model has three layers.

Scenes come fresh every step from seeds (3, seed, step, i); the grounding accuracy is
measured on scenes from other seeds (4, ...), which neither pre-training nor the synthetic
dataset ever draws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

COLOURS = ("red", "green", "blue", "yellow")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<grounding>", "<phrase>", "</phrase>", "<object>", "</object>",
            "<delimiter_of_multi_objects/>"]
WORDS = sorted({"an", "image", "of", "a", "robot", "the", "block", "and", ",", ".", "move", "go", "to", "reach",
                "bring", "gripper", "grasp", *COLOURS})
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PretrainOptions(BaseModel):
    """What ``robo-run pretrain`` makes: the model's sizes, the data and the schedule."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(7000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="scenes per step")
    lr: float = Field(3e-4, gt=0, description="peak learning rate (AdamW, linear warm-up, cosine to 10%)")
    warmup: int = Field(200, ge=0, description="warm-up steps")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    seed: int = Field(0, ge=0, description="seed of the initial weights and of the scenes")
    image_size: int = Field(64, ge=16, description="image side in pixels")
    patch_size: int = Field(8, ge=2, description="ViT patch side; the patch-index grid is image_size / patch_size")
    text_width: int = Field(128, ge=16, description="language model width D")
    text_layers: int = Field(3, ge=1, description="language model layers (with 2, the model found a block but "
                                                  "ignored the colour word)")
    heads: int = Field(4, ge=1, description="attention heads (language model and vision)")
    vision_width: int = Field(64, ge=16, description="vision encoder width")
    vision_layers: int = Field(2, ge=1, description="vision encoder layers")
    latent_queries: int = Field(64, ge=1, description="image tokens: the projection's latent queries")
    init_std: float = Field(0.088, gt=0, description="std of the language model's initial weights (Kosmos-2's "
                                                     "init_std; transformers' default 0.02 barely reads the image)")
    position_std: float = Field(0.3, ge=0, description="std of the vision encoder's initial position embeddings "
                                                       "(transformers' 0.02 leaves the patch features almost "
                                                       "without position; 0 keeps transformers' init)")
    resampler_logit: float = Field(8.0, ge=0, description="initial resampler: latent query i attends to patch i with "
                                                          "this attention logit, a spatial pass-through (0 keeps "
                                                          "transformers' random latent queries, which average the "
                                                          "patches and lose where things are)")
    single_block_steps: int = Field(1000, ge=0, description="curriculum: steps at the start with one block per "
                                                            "scene (localization before binding)")
    zoom_start: float = Field(0.8, ge=0, le=1, description="curriculum: the share of close-up views (larger blocks) "
                                                           "at the start")
    zoom_end: float = Field(0.3, ge=0, le=1, description="the share of close-up views at the end (linear in between)")
    eval_every: int = Field(500, ge=1, description="steps between grounding-accuracy measurements")
    eval_scenes: int = Field(200, ge=1, description="unseen three-block scenes the accuracy is measured on")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")

    @property
    def grid(self) -> int:
        """Side of the vision encoder's patch grid, which the patch-index tokens number."""
        return self.image_size // self.patch_size

    @model_validator(mode="after")
    def _grid(self) -> "PretrainOptions":
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}: "
                             "the patch-index grid must tile the image")
        if self.text_width % self.heads or self.vision_width % self.heads:
            raise ValueError(f"--text-width {self.text_width} and --vision-width {self.vision_width} must both be "
                             f"multiples of --heads {self.heads}")
        return self


# ------------------------------------------------------------------------------ tokenizer


def patch_tokens(grid: int) -> list[str]:
    return [f"<patch_index_{i:04d}>" for i in range(grid * grid)]


def make_tokenizer(grid: int) -> Any:
    """A word-level tokenizer (lower-cased) for the synthetic task's words, Kosmos-2's tags and
    ``grid`` x ``grid`` patch-index tokens; ids 0-3 are <s>, <pad>, </s>, <unk> as in Kosmos-2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS + patch_tokens(grid)
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation; whitespace dropped
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens=specials[4:])
    tokenizer.padding_side = "right"
    return tokenizer


def model_config(options: PretrainOptions, vocab_size: int) -> Any:
    from transformers import Kosmos2Config

    o = options
    return Kosmos2Config(
        text_config=dict(vocab_size=vocab_size, embed_dim=o.text_width, layers=o.text_layers, ffn_dim=4 * o.text_width,
                         attention_heads=o.heads, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                         init_std=o.init_std, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        vision_config=dict(hidden_size=o.vision_width, intermediate_size=4 * o.vision_width,
                           num_hidden_layers=o.vision_layers, num_attention_heads=o.heads, image_size=o.image_size,
                           patch_size=o.patch_size),
        latent_query_num=o.latent_queries)


# --------------------------------------------------------------------------------- scenes


def scene_image(key: tuple[int, ...], blocks: int, size: int,
                zoom: float = 0.0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """One camera image uint8 [size, size, 3] of a random layout of ``blocks`` blocks, their
    colours, and their boxes [blocks, 4] (x1, y1, x2, y2 in [0, 1], y down), from seed ``key``.

    With probability ``zoom`` the view is a close-up (half-width 0.12 to 0.3 m, anywhere on the
    table, the blocks inside it), where a block is up to 4 times as wide as in the task's
    cameras; otherwise it is the gripper or the static camera as the synthetic task renders them.
    """
    from robovla.loader import resize
    from robovla_plugins.datasets.calvin import synthetic as syn

    rng = np.random.default_rng(list(key))
    colours = [str(c) for c in rng.choice(list(syn.COLOURS), blocks, replace=False)]
    tcp = rng.uniform(-syn.TABLE, syn.TABLE, 2)
    if rng.random() < zoom:
        half = rng.uniform(0.12, 0.3)
        centre, pixels, area, gap = rng.uniform(-syn.TABLE, syn.TABLE, 2), size, half - syn.BLOCK, 1.4 * syn.BLOCK
        low, high = centre - area, centre + area
    elif rng.random() < 0.5:
        centre, half, pixels, gap = tcp, 2 * syn.TABLE, 84, 0.11  # the TCP-centred gripper camera
        low, high = np.full(2, -syn.TABLE + syn.BLOCK), np.full(2, syn.TABLE - syn.BLOCK)
    else:
        centre, half, pixels, gap = np.zeros(2), syn.TABLE * 1.1, 200, 0.11  # the static camera
        low, high = np.full(2, -syn.TABLE + syn.BLOCK), np.full(2, syn.TABLE - syn.BLOCK)
    while True:
        centres = rng.uniform(low, high, (blocks, 2))
        if all(np.linalg.norm(centres[i] - centres[j]) >= gap for i in range(blocks) for j in range(i)):
            break
    scene = syn.Scene(colours, centres, 0, tcp, 0)
    img = syn.render(scene, tcp, bool(rng.random() < 0.3), centre, half, pixels).astype(np.int16)
    img = np.clip(img + rng.integers(-syn.NOISE, syn.NOISE + 1, img.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    img = resize(img[None], size, "bicubic")[0]
    lo, hi = centres - syn.BLOCK / 2, centres + syn.BLOCK / 2
    boxes = np.stack([(lo[:, 0] - centre[0]) / (2 * half) + 0.5, (centre[1] - hi[:, 1]) / (2 * half) + 0.5,
                      (hi[:, 0] - centre[0]) / (2 * half) + 0.5, (centre[1] - lo[:, 1]) / (2 * half) + 0.5], axis=1)
    return img, colours, np.clip(boxes, 0.0, 1.0)


def box_patches(box: np.ndarray, grid: int) -> tuple[int, int]:
    """Kosmos-2's box to patch indices: the top-left and bottom-right patch on a ``grid`` grid."""
    x1, y1, x2, y2 = box
    ul = (min(int(math.floor(y1 * grid)), grid - 1), min(int(math.floor(x1 * grid)), grid - 1))
    lr = (max(int(math.ceil(y2 * grid - 1)), 0), max(int(math.ceil(x2 * grid - 1)), 0))
    return ul[0] * grid + ul[1], lr[0] * grid + lr[1]


def grounded(colour: str, box: np.ndarray, grid: int) -> str:
    a, b = box_patches(box, grid)
    return f"<phrase> the {colour} block </phrase> <object> <patch_index_{a:04d}> <patch_index_{b:04d}> </object>"


def caption(rng: np.random.Generator, colours: list[str], boxes: np.ndarray, grid: int) -> str:
    """One of the three caption kinds (module docstring), drawn at random."""
    from robovla_plugins.datasets.calvin.synthetic import TEMPLATES

    order = rng.permutation(len(colours))
    kind = rng.random()
    if kind < 0.45:  # every block, grounded
        return "<grounding> " + " , ".join(grounded(colours[i], boxes[i], grid) for i in order)
    if kind < 0.9:  # the VLA's prompt, its block grounded
        i = int(order[0])
        words = TEMPLATES[int(rng.integers(len(TEMPLATES)))].split(" the {}")[0]  # "move to", "bring the gripper to"
        return f"<grounding> an image of a robot {words} {grounded(colours[i], boxes[i], grid)}"
    names = [f"a {colours[i]} block" for i in order]
    listed = names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]
    return f"an image of {listed} ."


# --------------------------------------------------------------------------------- batches


class Batcher:
    """Model inputs for lists of images and captions: ``<s>``, N image tokens, caption, ``</s>``."""

    def __init__(self, tokenizer: Any, image_tokens: int):
        self.tokenizer, self.n = tokenizer, image_tokens
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std

    def __call__(self, images: list[np.ndarray], captions: list[str], close: bool = True) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        rows = [[tok.bos_token_id] + [tok.unk_token_id] * self.n + ids + ([tok.eos_token_id] if close else [])
                for ids in tok(captions, add_special_tokens=False)["input_ids"]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        image_mask = torch.zeros_like(mask)
        image_mask[:, 1:1 + self.n] = 1
        labels = ids.masked_fill((mask == 0) | (image_mask == 1), -100)
        return {"pixel_values": self.pixels(images), "input_ids": ids, "attention_mask": mask,
                "image_embeds_position_mask": image_mask, "labels": labels}


def training_batch(options: PretrainOptions, step: int, batcher: Batcher) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng([5, options.seed, step])
    images, captions = [], []
    zoom = options.zoom_start + (options.zoom_end - options.zoom_start) * step / max(1, options.steps - 1)
    for i in range(options.batch_size):
        blocks = 1 if step < options.single_block_steps else int(rng.integers(1, 4))
        img, colours, boxes = scene_image((3, options.seed, step, i), blocks, options.image_size, zoom)
        images.append(img)
        captions.append(caption(rng, colours, boxes, options.grid))
    return batcher(images, captions)


# ------------------------------------------------------------------------------- accuracy


class Grounding:
    """Grounding accuracy on ``scenes`` unseen three-block scenes: after
    ``<grounding> <phrase> the {colour} block </phrase> <object>``, is the most likely
    patch-index token the named block's top-left patch? Also the majority guess (always the
    most common true patch) and how often the three queries of a scene give three different
    patches (a model that finds a block but ignores the colour word gives one)."""

    def __init__(self, batcher: Batcher, grid: int, scenes: int, size: int):
        self.batcher = batcher
        self.images, self.prompts, self.targets = [], [], []
        for s in range(scenes):
            img, colours, boxes = scene_image((4, s), 3, size)
            for colour, box in zip(colours, boxes):
                self.images.append(img)
                self.prompts.append(f"<grounding> <phrase> the {colour} block </phrase> <object>")
                self.targets.append(box_patches(box, grid)[0])
        self.targets_t = torch.tensor(self.targets)
        self.majority = float(np.bincount(self.targets).max() / len(self.targets))
        tok = batcher.tokenizer
        self.patch_ids = torch.tensor(tok.convert_tokens_to_ids(patch_tokens(grid)))

    @torch.no_grad()
    def __call__(self, model: Any, chunk: int = 150) -> dict[str, float]:
        was = model.training
        model.eval()
        guesses = []
        for start in range(0, len(self.prompts), chunk):
            inputs = self.batcher(self.images[start:start + chunk], self.prompts[start:start + chunk], close=False)
            inputs.pop("labels")
            logits = model(**inputs).logits  # [B, S, V]; every prompt has the same length
            guesses.append(logits[:, -1, self.patch_ids].argmax(-1))
        model.train(was)
        guess = torch.cat(guesses)
        per_scene = guess.view(-1, 3)
        distinct = (per_scene[:, 0] != per_scene[:, 1]) & (per_scene[:, 1] != per_scene[:, 2]) & \
                   (per_scene[:, 0] != per_scene[:, 2])
        return {"accuracy": float((guess == self.targets_t).float().mean()), "majority": self.majority,
                "distinct": float(distinct.float().mean())}


# ------------------------------------------------------------------------------- training


def build(options: PretrainOptions) -> tuple[Any, Any]:
    """(model, tokenizer) at their initial weights, seeded by ``options.seed``."""
    from transformers import Kosmos2ForConditionalGeneration

    tokenizer = make_tokenizer(options.grid)
    torch.manual_seed(options.seed)
    model = Kosmos2ForConditionalGeneration._from_config(model_config(options, len(tokenizer)),
                                                         attn_implementation="sdpa")
    spatial_init(model, options)
    return model, tokenizer


@torch.no_grad()
def spatial_init(model: Any, options: PretrainOptions) -> None:
    """Start the image path as a spatial pass-through, so that which image token holds a
    block tells where it is.

    At transformers' init the latent queries attend almost evenly over the patches (and
    mostly to themselves), so every image token is close to the image's mean: colour words
    were learned from it, positions were not. Here the vision position embeddings get std
    ``position_std``, so that each patch feature carries its position; the patches' mean
    projected features are measured on scenes; and the resampler's attention is set so that
    latent query i looks for patch i: the heads of the first half of the width compare the
    latent's first half with the features' second half (latent queries, whose second half
    is zero, then do not match themselves), at logit ``resampler_logit`` for the right
    patch. The other heads attend evenly: image-wide context.
    """
    vision = model.vision_model.model
    if options.position_std:
        vision.embeddings.position_embedding.weight.normal_(std=options.position_std)
    proj = model.image_to_text_projection
    n, width = proj.latent_query.shape
    if not options.resampler_logit or n != options.grid ** 2:
        return
    half = width // 2
    images = [scene_image((6, options.seed, i), 1 + i % 3, options.image_size)[0] for i in range(64)]
    features = vision.post_layernorm(model.vision_model(pixel_values=Batcher(None, n)
                                                        .pixels(images)).last_hidden_state)
    codes = proj.dense(torch.nn.functional.normalize(features, dim=-1))[:, 1:].mean(0)  # [patches, width]
    codes = (codes - codes.mean(0))[:, half:]  # what tells the patches apart, in the second half
    attn = proj.x_attn
    unit = torch.nn.functional.normalize(codes, dim=-1)
    heads = max(attn.num_heads // 2, 1)
    dot = (unit.view(n, heads, -1) * codes.view(n, heads, -1)).sum(-1).mean()  # per head, at the right patch
    scale = options.resampler_logit * attn.head_dim ** 0.5 / max(float(dot), 1e-6)
    for layer, columns, gain in ((attn.q_proj, slice(0, half), scale), (attn.k_proj, slice(half, width), 1.0)):
        layer.weight.zero_()
        layer.weight[:half, columns] = gain * torch.eye(half)
        layer.bias.zero_()
    attn.v_proj.weight[:, :half] = 0.0  # values from the features' second half: latent queries add none
    proj.latent_query.copy_(torch.cat([unit, torch.zeros(n, width - half)], dim=1))


def save(model: Any, tokenizer: Any, out: Path, record: dict[str, Any]) -> None:
    """The folder ``--backbone.path`` loads: model, tokenizer, image processor, and how it was made."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = int(model.config.vision_config.image_size)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True}, indent=2) + "\n")
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")


def pretrain(options: PretrainOptions, out: Path, progress: bool = True) -> dict[str, Any]:
    """Train, measure grounding every ``eval_every`` steps, and save the folder to ``out``;
    returns the record written there as pretrain.json (options, curve, final accuracy)."""
    import transformers
    from tqdm import tqdm

    if options.threads:
        torch.set_num_threads(options.threads)
    model, tokenizer = build(options)
    model.train()
    batcher = Batcher(tokenizer, options.latent_queries)
    measure = Grounding(batcher, options.grid, options.eval_scenes, options.image_size)
    optim = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)

    def scale(step: int) -> float:
        if step < options.warmup:
            return (step + 1) / options.warmup
        done = (step - options.warmup) / max(1, options.steps - options.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, scale)
    curve: list[dict[str, float]] = []
    start, losses = time.perf_counter(), []
    bar = tqdm(range(options.steps), desc="pretrain", unit="step", dynamic_ncols=True, disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for step in bar:
        loss = model(**training_batch(options, step, batcher)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: the loss is {loss.item()} at step {step}; lower --lr")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps:
            point = {"step": step + 1, "seconds": round(time.perf_counter() - start, 1),
                     "loss": round(float(np.mean(losses)), 4), **measure(model)}
            losses = []
            curve.append(point)
            bar.write(f"step {point['step']}: loss {point['loss']:.4f}, grounding {point['accuracy']:.3f} "
                      f"(majority {point['majority']:.3f}), distinct {point['distinct']:.2f}, {point['seconds']:.0f} s",
                      file=sys.stderr)
            record = {"options": options.model_dump(), "curve": curve, "final": curve[-1],
                      "complete": step + 1 == options.steps, "parameters": sum(p.numel() for p in model.parameters()),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
            save(model, tokenizer, out, record)  # at every measurement: a stopped run leaves its last one
    return record

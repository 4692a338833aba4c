"""What the Hugging Face backbones share: where the weights come from (hub id or folder, and
a quick failure offline), random-init sizes with an offline character-level tokenizer, text
through a transformers tokenizer, activation checkpointing, and HFBackbone, the base of the
backbones built on one transformers model class (Kosmos-2, PaLI-Gemma).

``--backbone.path`` is a hub id or a local folder written by ``save_pretrained`` (model and
processor or tokenizer). ``--backbone.size tiny|small`` builds the real architecture at a
small size with random weights and a character-level tokenizer made offline (tests, demos).
When the weights are neither in a folder nor in the local hub cache and the hub cannot be
reached, loading stops at once with the two ways out, instead of retrying for half a minute.
"""

from __future__ import annotations

import abc
import json
import string
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import robovla
from robovla import registry_file
from robovla.prompt import PromptedBackbone
from robovla.sharing import hub_reachable


class BackboneLoadError(robovla.RobovlaError, OSError):
    """The backbone's weights cannot be found or read."""


class HFConfig(robovla.ComponentConfig):
    """Fields every Hugging Face backbone has."""

    path: str = Field(description="Hugging Face hub id, or a local folder written by save_pretrained "
                                  "(model and processor)")
    size: Literal["full", "small", "tiny"] = Field(
        "full", description="full: the weights at path; tiny or small: the same architecture at a small size "
                            "with random weights and an offline tokenizer (tests, demos)")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="pretrained: load them from path (size full); random: random weights of path's "
                                  "architecture when path is a folder (with its tokenizer), else of the published "
                                  "architecture with an offline tokenizer (for speed and memory tests)")
    cameras: list[Literal["gripper", "static"]] = Field(
        ["gripper", "static"], min_length=1, description="cameras read, in sequence order (the recipe: gripper first)")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="attention kernel")
    resize: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="how camera images are resized to the model's input size: bicubic (PIL's, as the "
                               "model's own image processor and RoboVLMs resize) or bilinear (antialiased)")


def resolve(path: str, option: str = "--backbone.path") -> str:
    """``path`` if it is a folder, in the hub cache, or the hub is reachable; else a clear error."""
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    if Path(path).expanduser().exists() or path.startswith(("/", ".", "~")):
        raise BackboneLoadError(f"{option} {path}: not a folder; give a folder written by save_pretrained "
                                "(model and processor) or a Hugging Face hub id")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str) or hub_reachable():
        return path
    raise BackboneLoadError(
        f"{option} {path}: not a local folder, not in the Hugging Face cache, and the hub cannot be reached "
        f"(offline). Either download it where there is a connection (`hf download {path} --local-dir DIR`) "
        f"and pass {option} DIR, or use --backbone.size tiny (the same architecture with random weights, for "
        "tests and demos)")


def char_tokenizer(specials: list[str], bos: str, eos: str, pad: str, unk: str) -> Any:
    """A character-level tokenizer made offline: ``specials`` first (ids 0..), then printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    model.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    model.decoder = decoders.Fuse()
    extra = [s for s in specials if s not in (bos, eos, pad, unk)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos, pad_token=pad,
                                        unk_token=unk, extra_special_tokens=extra or None)
    tokenizer.padding_side = "right"
    return tokenizer


def checkpointing(model: Any, enable: bool) -> None:
    """Turn activation checkpointing of a transformers model on or off (non-reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's ids under a transformers tokenizer, without the special tokens it would add."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class HFBackbone(PromptedBackbone):
    """Base of the Hugging Face backbones: subclasses say how to build, embed, encode and run."""

    Config: ClassVar[type[HFConfig]] = HFConfig
    test_config: ClassVar[dict[str, Any]] = {"size": "tiny"}
    shared_vision = True  # one vision tower for every camera: the VLA encodes them in one pass
    tokenizer: Any  # the transformers tokenizer (the offline character-level one at tiny and small sizes)
    family: ClassVar[str]  # the registered name, for registry.toml's checkpoints table
    model_class: ClassVar[str]  # transformers class name
    default_mean: ClassVar[tuple[float, float, float]]
    default_std: ClassVar[tuple[float, float, float]]
    bundled: ClassVar[dict[str, Path]] = {}  # checkpoints shipped in the plugin: --backbone.path bundled:NAME

    def __init__(self, config: HFConfig):
        super().__init__(config)
        import transformers

        cls = getattr(transformers, self.model_class)
        # what registry.toml knows of the checkpoint at path (its published architecture at size full)
        known = registry_file.checkpoints(self.family).get(config.path, {}) if config.size == "full" else {}
        self.cameras = tuple(config.cameras)
        self.resize_filter = config.resize
        folder = self.bundled_folder(config.path)
        if config.size == "full" and config.weights == "pretrained":
            source = folder or resolve(config.path)
            try:
                self.tokenizer, self.model = self._load(source, weights=True)
            except OSError as exc:
                raise BackboneLoadError(f"--backbone.path {config.path}: cannot load {self.model_class} and its "
                                        f"tokenizer ({exc})") from None
            mean, std = self._normalization(source, known)
        elif config.size == "full" and (folder or Path(config.path).expanduser().is_dir()):
            source = folder or str(Path(config.path).expanduser())  # that folder's architecture and tokenizer
            self.tokenizer, self.model = self._load(source, weights=False)
            mean, std = self._normalization(source, known)
        else:
            self.tokenizer = self.make_tokenizer()
            self.model = cls._from_config(self.random_config(config.size, len(self.tokenizer)),
                                          attn_implementation=config.attn_implementation)
            mean, std = self.default_mean, self.default_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_size = int(self.model.config.vision_config.image_size)
        self._check_known(known)

    def _load(self, source: str, weights: bool) -> tuple[Any, Any]:
        """(tokenizer, model) from a folder or hub id: the saved weights, or random ones of its architecture."""
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        cls = getattr(transformers, self.model_class)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if weights and torch.get_default_device().type != "meta":  # meta: a skeleton, names and shapes only
            return tokenizer, cls.from_pretrained(source, attn_implementation=self.config.attn_implementation)
        return tokenizer, cls._from_config(AutoConfig.from_pretrained(source),
                                           attn_implementation=self.config.attn_implementation)

    @classmethod
    def bundled_folder(cls, path: str) -> str | None:
        """The folder of a checkpoint shipped inside the plugin (``bundled:NAME``), else None."""
        if not path.startswith("bundled:"):
            return None
        name = path.removeprefix("bundled:")
        if name not in cls.bundled:
            from robovla.errors import unknown

            raise unknown(f"bundled {cls.family} checkpoint", name, cls.bundled)
        return str(cls.bundled[name])

    # ----------------------------------------------------------------- per family

    @abc.abstractmethod
    def make_tokenizer(self) -> Any:
        """The offline tokenizer for random-init sizes."""

    @abc.abstractmethod
    def random_config(self, size: str, vocab_size: int) -> Any:
        """The transformers config of the architecture at ``size``: tiny or small, with the
        offline tokenizer's ``vocab_size``, or full, the published architecture."""

    @abc.abstractmethod
    def image_tokens(self) -> int:
        """N: the image tokens :meth:`encode_images` gives per camera, from the model's config."""

    # --------------------------------------------------------------------- shared

    def _check_known(self, known: dict[str, Any]) -> None:
        """Refuse a model that does not read images the way registry.toml says its checkpoint
        does (image size and image tokens N decide the pixels and the sequence layout)."""
        found = {"image_size": self.image_size, "image_tokens": self.image_tokens()}
        wrong = [f"{key} {known[key]} there, {found[key]} in the model" for key in found
                 if key in known and known[key] != found[key]]
        if wrong:
            path = self.config.path
            if self.config.weights == "pretrained":
                why = (f"its files are not the checkpoint published under that id. Download it again (`hf download "
                       f"{path} --local-dir DIR`) and pass --backbone.path DIR, or give the folder of the weights "
                       "you mean")
            else:
                why = (f"the installed transformers' default {self.model_class} config is no longer the published "
                       "architecture (a transformers release that changed it?); with the checkpoint downloaded, "
                       "--backbone.weights pretrained builds from its own config")
            raise BackboneLoadError(
                f"--backbone.path {path}: the {self.model_class} built from it does not match "
                f"[checkpoints.{self.family}.\"{path}\"] in {registry_file.path()} ({'; '.join(wrong)}), so {why}")

    def _normalization(self, source: str, known: dict[str, Any]) -> tuple[Any, Any]:
        if "mean" in known and "std" in known:
            return known["mean"], known["std"]
        for name in ("preprocessor_config.json", "processor_config.json"):  # the latter: transformers 5's processor
            file = Path(source) / name
            data = json.loads(file.read_text()) if file.is_file() else {}
            data = data.get("image_processor", data)
            if "image_mean" in data and "image_std" in data:
                return data["image_mean"], data["image_std"]
        return self.default_mean, self.default_std

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, texts)

    def gradient_checkpointing(self, enable: bool = True) -> None:
        checkpointing(self.model, enable)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model, tokenizer and image normalization, loadable again with ``--backbone.path folder``."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_mean": self.mean.flatten().tolist(), "image_std": self.std.flatten().tolist(),
            "size": {"height": self.image_size, "width": self.image_size}}, indent=2))

"""A composite backbone: any timm vision encoder and any Hugging Face causal language model,
joined by a linear projector from the encoder's features to the language model's width.

Both are named by config (``--backbone.vision``, a timm model name; ``--backbone.language_model``,
a hub id or a folder written by save_pretrained). Image tokens are the encoder's final
feature map as tokens (a ViT's patch and prefix tokens; a CNN's spatial positions), so
nothing here knows which encoder or language model it holds. ``--backbone.size tiny|small``
shrinks a ViT-style encoder and builds a random-init language model of
``--backbone.language_model_type`` with an offline tokenizer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from robovla.prompt import PromptConfig, PromptedBackbone
from robovla_plugins.backbones.hf import BackboneLoadError, char_tokenizer, checkpointing, resolve, token_ids

SIZES = {  # (LM width, LM layers, encoder width, encoder layers, image px)
    "tiny": (64, 2, 32, 2, 32),
    "small": (256, 4, 192, 4, 64),
}


class CompositeConfig(PromptConfig):
    """A timm encoder, a projector, a causal language model."""

    vision: str = Field("vit_small_patch16_224.augreg_in21k", description="timm model name of the vision encoder")
    language_model: str = Field("HuggingFaceTB/SmolLM2-135M", description="causal language model: Hugging Face "
                                                                          "hub id or a local save_pretrained folder")
    size: Literal["full", "small", "tiny"] = Field(
        "full", description="full: pretrained encoder and language model; tiny or small: random weights at a small "
                            "size (a ViT-style encoder; the language model family from language_model_type)")
    language_model_type: str = Field("llama", description="transformers model_type of the random-init language "
                                                          "model at tiny/small size (llama, qwen2, gemma, ...)")
    prompt: str = Field("What action should the robot take to {instruction}?",
                        description="how an instruction is worded; must contain {instruction}")
    cameras: list[Literal["gripper", "static"]] = Field(["gripper", "static"], min_length=1,
                                                        description="cameras read, in sequence order")


class Composite(PromptedBackbone):
    """timm encoder -> linear projector -> causal LM; any pair, both named by config."""

    Config: ClassVar[type[CompositeConfig]] = CompositeConfig
    test_config: ClassVar[dict[str, Any]] = {"size": "tiny"}
    shared_vision = True  # one timm encoder for every camera: the VLA encodes them in one pass

    def __init__(self, config: CompositeConfig):
        super().__init__(config)
        import timm
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.cameras = tuple(config.cameras)
        self.prompt_template = config.prompt
        if config.size == "full":
            try:
                self.vision = timm.create_model(config.vision, pretrained=True, num_classes=0)
            except Exception as exc:  # unknown name, no weights offline, ...
                raise BackboneLoadError(f"--backbone.vision {config.vision}: cannot create it with pretrained "
                                        f"weights ({type(exc).__name__}: {exc}); offline, use --backbone.size tiny") from None
            source = resolve(config.language_model, "--backbone.language_model")
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source)  # the decoder without its LM head, unused here
            data = timm.data.resolve_data_config({}, model=self.vision)
            self.image_size, mean, std = int(data["input_size"][-1]), data["mean"], data["std"]
        else:
            width, layers, vision, vision_layers, image = SIZES[config.size]
            try:
                self.vision = timm.create_model(config.vision, pretrained=False, num_classes=0, img_size=image,
                                                patch_size=8, embed_dim=vision, depth=vision_layers, num_heads=4)
            except TypeError as exc:
                raise ValueError(f"--backbone.size {config.size} shrinks ViT-style timm encoders; "
                                 f"{config.vision} does not take ViT sizes ({exc})") from None
            self.tokenizer = char_tokenizer(["<pad>", "<s>", "</s>", "<unk>"], "<s>", "</s>", "<pad>", "<unk>")
            lm_config = AutoConfig.for_model(
                config.language_model_type, vocab_size=len(self.tokenizer), hidden_size=width,
                intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                head_dim=width // 4, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
            self.model = AutoModel.from_config(lm_config)
            self.image_size, mean, std = image, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.hidden_size = int(self.model.get_input_embeddings().embedding_dim)
        self.projector = nn.Linear(self.vision.num_features, self.hidden_size)
        self.bos_token_id = int(self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                                else self.tokenizer.eos_token_id)
        self.eos_token_id = self.tokenizer.eos_token_id
        # a language model that scales its embeddings in the embedding layer (Gemma) scales [LRN] too
        self.learned_token_scale = float(getattr(self.model.get_input_embeddings(), "embed_scale", 1.0))
        decoder = self._decoder_layers()
        self.lora_targets = [name for name, m in self.named_modules() if isinstance(m, nn.Linear)
                             and any(name.startswith(prefix) for prefix in decoder[1])]

    def _decoder_layers(self) -> tuple[nn.ModuleList, list[str]]:
        """The language model's block list and the module-name prefixes of its blocks."""
        base = self.model.base_model
        for name, child in base.named_children():
            if isinstance(child, nn.ModuleList):
                prefix = next(n for n, m in self.named_modules() if m is child)
                return child, [f"{prefix}.{i}." for i in range(len(child))]
        raise TypeError(f"--backbone.language_model {self.config.language_model}: no list of decoder blocks in "
                        f"{type(base).__name__}")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return token_ids(self.tokenizer, texts)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def encode_images(self, pixel_values: torch.Tensor, camera: str) -> torch.Tensor:
        features = self.vision.forward_features(pixel_values)
        if features.ndim == 4:  # a CNN's [M, C, h, w] map: one token per position
            features = features.flatten(2).transpose(1, 2)
        return self.projector(features)  # [M, N, D]

    def forward_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           roles: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.base_model(inputs_embeds=embeds, attention_mask=attention_mask.long(), use_cache=False)
        return out.last_hidden_state

    def freeze_groups(self) -> dict[str, list[nn.Module]]:
        base = self.model.base_model
        layers, _ = self._decoder_layers()
        embedding = self.model.get_input_embeddings()
        rest = [m for m in base.children() if m is not layers and m is not embedding]
        return {"vision": [self.vision], "projector": [self.projector], "text_embedding": [embedding],
                "decoder": list(layers), "decoder_norm": rest}

    def gradient_checkpointing(self, enable: bool = True) -> None:
        checkpointing(self.model, enable)
        self.vision.set_grad_checkpointing(enable)

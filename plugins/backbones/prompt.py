"""What backbones with a configurable prompt and normalized images share, whatever model they
hold: the ``prompt`` field, image resizing and normalization, and prompt tokenization over
the backbone's own :meth:`PromptedBackbone.token_ids` (a Hugging Face tokenizer, or
``cnn-pool``'s hashed words).

Shape letters: M frames (B*T), B instructions, L text tokens, S the backbone's image size.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

import robovla
from robovla.backbone import TextTokens, pad_tokens


class PromptConfig(robovla.ComponentConfig):
    """A configurable prompt; subclasses set its default."""

    prompt: str = Field("{instruction}", max_length=10_000,
                        description="how an instruction is worded; must contain {instruction}")

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError(f"the prompt {value!r} has no {{instruction}} slot")
        return value


class PromptedBackbone(robovla.Backbone):
    """Image normalization and prompt tokenization, for backbones with ``prompt_template``,
    ``image_size``, ``mean``/``std`` buffers [1, 3, 1, 1] and :meth:`token_ids`."""

    pad_token_id: ClassVar[int] = 0
    """The id :meth:`tokenize` pads with (masked, never read); 0 is an id of every vocabulary."""

    @abc.abstractmethod
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """B prompted instructions -> each one's token ids, without BOS or EOS."""

    def tokenize(self, instructions: list[str]) -> TextTokens:
        texts = [self.prompt_template.format(instruction=i.strip()) for i in instructions]
        return pad_tokens(self.token_ids(texts), self.pad_token_id)

    def preprocess_images(self, images: torch.Tensor, camera: str) -> torch.Tensor:
        """uint8 [M, H, W, 3] -> normalized pixel values [M, 3, S, S], resized with the
        backbone's ``resize_filter`` when they are not S x S already."""
        size = (self.image_size, self.image_size)
        if images.shape[1:3] != size and self.resize_filter == "bicubic":  # PIL's, on the CPU
            from robovla.loader import resize

            images = torch.from_numpy(resize(images.cpu().numpy(), self.image_size, "bicubic")).to(images.device)
        x = images.permute(0, 3, 1, 2).float().div_(255)  # [M, 3, H, W]
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

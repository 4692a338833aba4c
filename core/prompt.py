"""A base for backbones with a configurable prompt and normalized images: prompt tokenization
over the backbone's own :meth:`PromptedBackbone.token_ids`, and image resizing and
normalization. Every built-in backbone derives from it, and so can a plugin's.

Shape letters: M frames (B*T), B instructions, L text tokens, S the backbone's image size.

A subclass's config derives from :class:`PromptConfig` (which gives it the ``prompt``
field), and its ``__init__`` sets, besides the attributes every :class:`robovla.Backbone`
sets:

- ``prompt_template``: the prompt with ``{instruction}`` (usually ``config.prompt``);
- ``image_size``: S, the square side the vision encoder reads (an int, not None);
- ``mean`` and ``std``: float buffers [1, 3, 1, 1] of the pixel normalization, in [0, 1]
  units (``self.register_buffer("mean", ..., persistent=False)``, so that they follow the
  module's device and stay out of checkpoints);
- optionally ``pad_token_id`` (default 0) and ``resize_filter`` (default ``bilinear``);

and implements :meth:`PromptedBackbone.token_ids`, the tokenizer. In return it gets
:meth:`PromptedBackbone.tokenize` and :meth:`PromptedBackbone.preprocess_images`, two of the
six abstract methods of :class:`robovla.Backbone`; ``embed_tokens``, ``encode_images``,
``forward_embeddings`` and ``freeze_groups`` remain the subclass's.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from robovla.backbone import Backbone, TextTokens, pad_tokens
from robovla.config import ComponentConfig


class PromptConfig(ComponentConfig):
    """A backbone config with a ``prompt`` field; a subclass may redeclare it to change its default."""

    prompt: str = Field("{instruction}", max_length=10_000,
                        description="how an instruction is worded; must contain {instruction}")

    @field_validator("prompt")
    @classmethod
    def _has_slot(cls, value: str) -> str:
        if "{instruction}" not in value:
            raise ValueError(f"the prompt {value!r} has no {{instruction}} slot")
        return value


class PromptedBackbone(Backbone):
    """A :class:`robovla.Backbone` whose ``tokenize`` and ``preprocess_images`` are given.

    A subclass sets ``prompt_template``, ``image_size``, ``mean`` and ``std`` buffers
    [1, 3, 1, 1] (and, if it needs other values than the defaults, ``pad_token_id`` and
    ``resize_filter``) in ``__init__``, and implements :meth:`token_ids` (module docstring).
    """

    pad_token_id: ClassVar[int] = 0
    """The id :meth:`tokenize` pads with (masked, never read); 0 is an id of every vocabulary."""

    @abc.abstractmethod
    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """B prompted instructions -> each one's token ids, without BOS or EOS (the VLA adds
        those around the whole sequence)."""

    def tokenize(self, instructions: list[str]) -> TextTokens:
        """B instructions -> :class:`robovla.TextTokens` [B, L]: each instruction stripped of
        surrounding whitespace, put into ``prompt_template``, tokenized by :meth:`token_ids`,
        and right-padded with ``pad_token_id`` to the longest (mask False on padding)."""
        texts = [self.prompt_template.format(instruction=i.strip()) for i in instructions]
        return pad_tokens(self.token_ids(texts), self.pad_token_id)

    def preprocess_images(self, images: torch.Tensor, camera: str) -> torch.Tensor:
        """uint8 [M, H, W, 3] -> normalized pixel values float [M, 3, S, S]: ``(x / 255 - mean) /
        std``, resized first with ``resize_filter`` when they are not S x S already (the
        training loader and the Policy hand them over at S x S). ``camera`` is not read."""
        size = (self.image_size, self.image_size)
        if images.shape[1:3] != size and self.resize_filter == "bicubic":  # PIL's, on the CPU
            from robovla.loader import resize

            images = torch.from_numpy(resize(images.cpu().numpy(), self.image_size, "bicubic")).to(images.device)
        x = images.permute(0, 3, 1, 2).float().div_(255)  # [M, 3, H, W]
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

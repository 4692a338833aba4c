"""The Backbone interface: a vision-language model read through learnable [LRN] tokens.

Shape letters: B batch, T window, M = B*T single-frame sequences, N image tokens per
camera, L text tokens, S assembled sequence length, D hidden size. The core assembles,
per frame, [BOS][gripper image tokens][static image tokens][instruction tokens][LRN x K]
[EOS] from the pieces a backbone provides, so no backbone's name appears in core
(robovla.vla).

"Embedding space" below means what the language model takes as ``inputs_embeds``: text
embeddings from :meth:`Backbone.embed_tokens` and image tokens from
:meth:`Backbone.encode_images` go in as they are, and whatever scaling the model applies
inside (Kosmos-2 multiplies every input by sqrt(D)) applies to all of them alike.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from robovla.config import ComponentConfig


ROLE_SPECIAL, ROLE_IMAGE, ROLE_TEXT, ROLE_LRN = 0, 1, 2, 3
"""What a position of an assembled sequence holds (the ``roles`` of
:meth:`Backbone.forward_embeddings`): BOS, EOS and padding are special; the rest are image
tokens, instruction tokens and [LRN]."""


class TextTokens(NamedTuple):
    """Tokenized instructions (prompt applied, no BOS/EOS), right-padded."""

    ids: torch.Tensor  # long [B, L]
    mask: torch.Tensor  # bool [B, L]; False on padding


def pad_tokens(rows: list[list[int]], pad_id: int) -> TextTokens:
    """B rows of token ids -> :class:`TextTokens` [B, L], right-padded with ``pad_id`` to the
    longest row (L at least 1, so that an empty instruction still has a column)."""
    width = max([1, *map(len, rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = True
    return TextTokens(ids, mask)


class Backbone(nn.Module, abc.ABC):
    """A VLM as robovla uses it. Subclasses set the attributes below in ``__init__``.

    Attributes:
        hidden_size: D, the language model's hidden size.
        cameras: cameras read, in sequence order (e.g. ``("gripper", "static")``).
        image_size: the square side S in pixels that camera images are resized to before
            :meth:`preprocess_images` (by the training loader and the Policy alike); None (the
            default) for a backbone that takes them at any size and resizes them itself.
        prompt_template: how an instruction is worded, with ``{instruction}``.
        lora_targets: default PEFT ``target_modules`` (a list of names or a regex): by
            default the language model's attention and MLP projections.
        bos_token_id: the id that opens each sequence.
        eos_token_id: the id that closes it, after [LRN] (Kosmos-2: </s>; PaLI-Gemma: the "\\n"
            separator its prompt ends in); None when nothing follows [LRN].
        learned_token_scale: factor for a learned token ([LRN]) entering the embedding space,
            so that it is scaled as text tokens are (1 when the model scales its inputs itself;
            sqrt(D) for Gemma, whose embedding layer scales the text).
        resize_filter: how camera images are resized to ``image_size`` before
            :meth:`preprocess_images` (``bilinear`` or ``bicubic``, robovla.loader.resize): the
            training loader and the Policy both resize with it.
        shared_vision: True when :meth:`encode_images` ignores ``camera`` (one vision encoder for
            every camera): the VLA then encodes all cameras of a step in one batched pass.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    test_config: ClassVar[dict[str, Any]] = {}
    """Config values that build a small instance offline in seconds (robovla.testing uses them)."""
    hidden_size: int
    cameras: tuple[str, ...]
    image_size: int | None = None
    prompt_template: str
    lora_targets: list[str] | str
    bos_token_id: int
    eos_token_id: int | None
    learned_token_scale: float = 1.0
    resize_filter: str = "bilinear"
    shared_vision: ClassVar[bool] = False

    def __init__(self, config: ComponentConfig):
        super().__init__()
        self.config = config

    @abc.abstractmethod
    def preprocess_images(self, images: torch.Tensor, camera: str) -> torch.Tensor:
        """uint8 [M, S, S, 3] (any [M, H, W, 3] when ``image_size`` is None) -> pixel values float
        [M, 3, H', W'], the size the vision encoder reads."""

    @abc.abstractmethod
    def tokenize(self, instructions: list[str]) -> TextTokens:
        """B instructions -> :class:`TextTokens` [B, L] with the prompt template applied."""

    @abc.abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids long [*, L] -> embeddings [*, L, D] in the embedding space."""

    @abc.abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, camera: str) -> torch.Tensor:
        """Pixel values [M, 3, H, W] -> image tokens [M, N, D] in the text embedding space."""

    @abc.abstractmethod
    def forward_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           roles: torch.Tensor | None = None) -> torch.Tensor:
        """Run the language model on embeddings [M, S, D] with mask bool [M, S] -> final hidden
        states [M, S, D]. ``roles`` long [M, S] says what each position holds (``ROLE_*`` above:
        special token or padding, image, instruction, [LRN]); language models that read the
        sequence as it comes ignore it."""

    @abc.abstractmethod
    def freeze_groups(self) -> dict[str, list[nn.Module]]:
        """Named parameter groups: at least ``vision``, ``text_embedding`` and ``decoder`` (its
        layers in order, so that the first N can be frozen); others (e.g. ``projector``,
        ``decoder_norm``) may follow. No parameter belongs to two groups."""

    def gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of storing them."""
        raise NotImplementedError(f"backbone {type(self).__name__} does not support gradient checkpointing; "
                                  "run without --train.gradient_checkpointing")

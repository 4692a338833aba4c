"""Kosmos-2 (microsoft/kosmos-2-patch14-224) as a robovla backbone, through the stock
transformers Kosmos2ForConditionalGeneration.

Image tokens are what Kosmos-2 makes itself: the CLIP vision encoder's whole last hidden
state, its post-layernorm, L2 normalization, then the projection whose latent queries
cross-attend to it (64 tokens of D = 2048 at full size). The language model is called
on embeddings alone and scales all of them by sqrt(D), images included, as Kosmos-2 does.
Prompt, as the recipe words it: "<grounding>An image of a robot {instruction}"; 224 px,
CLIP normalization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from robovla_plugins.backbones.hf import HFBackbone, HFConfig, char_tokenizer
from robovla_plugins.backbones.kosmos.pretrain import PretrainOptions

SIZES = {  # random-init sizes: (text width, text layers, vision width, vision layers, image px, latent queries)
    "tiny": (64, 2, 32, 2, 32, 8),
    "small": (256, 4, 192, 4, 64, 32),
}


class Kosmos(HFBackbone):
    """Kosmos-2: CLIP ViT-L/14 image tokens through latent-query projection, a 24-layer decoder."""

    family = "kosmos"
    model_class = "Kosmos2ForConditionalGeneration"
    default_mean = (0.48145466, 0.4578275, 0.40821073)  # CLIP
    default_std = (0.26862954, 0.26130258, 0.27577711)
    prompt_template = "<grounding>An image of a robot {instruction}"
    bundled = {"kosmos-2-tiny": Path(__file__).parent / "kosmos-2-tiny"}  # made by `robo-run pretrain` (README)
    PretrainOptions = PretrainOptions

    class Config(HFConfig):
        path: str = Field("microsoft/kosmos-2-patch14-224", description=(
            "Hugging Face hub id, a local folder written by save_pretrained (model and processor), or "
            "bundled:kosmos-2-tiny (the small Kosmos-2 shipped with robovla, pre-trained on grounding)"))

    def __init__(self, config: Any):
        super().__init__(config)
        text = self.model.config.text_config
        self.hidden_size = int(text.embed_dim)
        self.bos_token_id = int(self.tokenizer.bos_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.lora_targets = r".*text_model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|ffn\.(fc1|fc2))"

    @classmethod
    def pretrain(cls, options: PretrainOptions, out: Path) -> dict[str, Any]:
        """Grounding pre-training on the synthetic task's scenes (robovla_plugins.backbones.kosmos.pretrain)."""
        from robovla_plugins.backbones.kosmos.pretrain import pretrain

        return pretrain(options, Path(out))

    def make_tokenizer(self) -> Any:
        # XLM-R's order for the first ids: <s> 0, <pad> 1, </s> 2, <unk> 3 (Kosmos-2 counts positions from pad).
        return char_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<grounding>"], "<s>", "</s>", "<pad>", "<unk>")

    def random_config(self, size: str, vocab_size: int) -> Any:
        from transformers import Kosmos2Config

        if size == "full":
            return Kosmos2Config()  # its defaults are kosmos-2-patch14-224's architecture (1.66B)
        width, layers, vision, vision_layers, image, queries = SIZES[size]
        return Kosmos2Config(
            text_config=dict(vocab_size=vocab_size, embed_dim=width, layers=layers, ffn_dim=4 * width,
                             attention_heads=4, max_position_embeddings=512, pad_token_id=1, bos_token_id=0,
                             eos_token_id=2),
            vision_config=dict(hidden_size=vision, intermediate_size=4 * vision, num_hidden_layers=vision_layers,
                               num_attention_heads=4, image_size=image, patch_size=8),
            latent_query_num=queries)

    def image_tokens(self) -> int:
        return int(self.model.config.latent_query_num)  # the projection's latent queries

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.model.embed_tokens(ids)

    def encode_images(self, pixel_values: torch.Tensor, camera: str) -> torch.Tensor:
        return self.model.get_image_features(pixel_values).pooler_output  # [M, latent queries, D]

    def forward_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           roles: torch.Tensor | None = None) -> torch.Tensor:
        # The text decoder alone: Kosmos2ForConditionalGeneration.forward insists on images.
        out = self.model.text_model.model(inputs_embeds=embeds, attention_mask=attention_mask.long(), use_cache=False)
        return out.last_hidden_state  # after the final layer norm

    def freeze_groups(self) -> dict[str, list[nn.Module]]:
        text = self.model.text_model.model
        decoder = list(text.layers)
        rest = [m for name, m in text.named_children() if name not in ("embed_tokens", "layers")]
        return {"vision": [self.model.vision_model], "projector": [self.model.image_to_text_projection],
                "text_embedding": [text.embed_tokens], "decoder": decoder, "decoder_norm": rest}

"""PaLI-Gemma (google/paligemma-3b-pt-224) as a robovla backbone, through the stock
transformers PaliGemmaForConditionalGeneration.

Image tokens are SigLIP's last hidden state through the multi-modal projector, as the
model makes them itself (256 tokens of D = 2048 at full size); text embeddings come from
Gemma's embedding layer, which scales them by sqrt(D), so [LRN] is scaled the same way.
The layout is the recipe's: RoboVLMs words the prompt "<eos>{instruction}\\n" and puts
[LRN] one position before the end, so each frame reads
``[<eos>][image tokens][instruction][LRN]["\\n"]``: <eos> opens the sequence (the slot the
images follow) and the "\\n" separator closes it, after [LRN]. The instruction and the
separator are tokenized apart, which gives the same ids as tokenizing them together (Gemma
keeps "\\n" a token of its own; the parity test checks it on a Gemma-style tokenizer).
token_type_ids are always passed (all suffix, i.e. causal attention as the recipe ran
it), because without them the attention pattern of a PaLI-Gemma model changes with
padding (bidirectional without, causal with).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field
from torch import nn

from robovla_plugins.backbones.hf import BackboneLoadError, HFBackbone, HFConfig, char_tokenizer

SIZES = {  # random-init sizes: (text width, text layers, vision width, vision layers, image px)
    "tiny": (64, 2, 32, 2, 32),
    "small": (256, 4, 192, 4, 64),
}


class PaliGemma(HFBackbone):
    """PaLI-Gemma: SigLIP So400m/14 image tokens through a linear projector, an 18-layer Gemma decoder."""

    family = "paligemma"
    model_class = "PaliGemmaForConditionalGeneration"
    default_mean = (0.5, 0.5, 0.5)  # SigLIP
    default_std = (0.5, 0.5, 0.5)
    prompt_template = "{instruction}"
    separator = "\n"  # closes every frame's sequence, after [LRN] (the recipe's prompt ends in it)

    class Config(HFConfig):
        path: str = Field("google/paligemma-3b-pt-224", description="Hugging Face hub id, or a local folder "
                                                                    "written by save_pretrained (model and processor)")

    def __init__(self, config: Any):
        super().__init__(config)
        text = self.model.config.text_config
        self.hidden_size = int(text.hidden_size)
        self.bos_token_id = int(self.tokenizer.eos_token_id)  # the recipe opens with <eos>
        self.eos_token_id = self._separator_id()
        self.learned_token_scale = math.sqrt(self.hidden_size)  # as the embedding layer scales text
        self.lora_targets = (r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|"
                             r"mlp\.(gate_proj|up_proj|down_proj))")

    def _separator_id(self) -> int:
        ids = self.tokenizer(self.separator, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise BackboneLoadError(f"--backbone.path {self.config.path}: its tokenizer splits the separator "
                                    f"{self.separator!r} into {len(ids)} tokens {ids}; PaLI-Gemma's tokenizer has "
                                    "it as one token. Fix: give the folder of a PaLI-Gemma (Gemma) tokenizer")
        return int(ids[0])

    def make_tokenizer(self) -> Any:
        return char_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], "<bos>", "<eos>", "<pad>", "<unk>")

    def random_config(self, size: str, vocab_size: int) -> Any:
        from transformers import PaliGemmaConfig

        if size == "full":
            return PaliGemmaConfig()  # its defaults are paligemma-3b-pt-224's architecture (2.91B)
        width, layers, vision, vision_layers, image = SIZES[size]
        # Every size field is given: sub-configs passed as dicts do not get PaLI-Gemma's own defaults.
        return PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=vision, intermediate_size=4 * vision,
                               num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image,
                               patch_size=8, vision_use_head=False),
            text_config=dict(model_type="gemma", hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=width // 4, vocab_size=vocab_size, pad_token_id=0, bos_token_id=2,
                             eos_token_id=1),
            image_token_index=4, vocab_size=vocab_size, projection_dim=width, hidden_size=width)

    def image_tokens(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2  # one per SigLIP patch

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_input_embeddings()(ids)  # scaled by sqrt(D) inside

    def encode_images(self, pixel_values: torch.Tensor, camera: str) -> torch.Tensor:
        return self.model.model.get_image_features(pixel_values).pooler_output  # [M, 256, D] at full size

    def forward_embeddings(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           roles: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.model(inputs_embeds=embeds, attention_mask=attention_mask.long(),
                               token_type_ids=torch.ones_like(attention_mask, dtype=torch.long), use_cache=False)
        return out.last_hidden_state  # after the final norm

    def freeze_groups(self) -> dict[str, list[nn.Module]]:
        lm = self.model.model.language_model
        rest = [m for name, m in lm.named_children() if name not in ("embed_tokens", "layers")]
        return {"vision": [self.model.model.vision_tower], "projector": [self.model.model.multi_modal_projector],
                "text_embedding": [lm.embed_tokens], "decoder": list(lm.layers), "decoder_norm": rest}

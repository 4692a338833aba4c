"""The VLA: a backbone read out through learned [LRN] tokens, and a policy head.

Shape letters: B batch, T window, M = B*T frames, N image tokens (all cameras), L text
tokens, K [LRN] tokens per frame, S sequence length, D hidden size.

Each frame of each sample becomes one sequence (the window flattened into the batch, the
recipe's "post" history)::

    [BOS][gripper image tokens][static image tokens][instruction tokens][LRN x K][EOS][padding]

[LRN] sits right after the sample's own last instruction token, so that its position and
what it attends to do not depend on how long the other instructions in the batch are (the
recipe put it at one padded index for the whole batch). The language model's final hidden
states at [LRN] are the features [B, T, K, D] the head reads. No backbone is named here:
what differs between backbones is what their methods return.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from robovla.backbone import ROLE_IMAGE, ROLE_LRN, ROLE_SPECIAL, ROLE_TEXT, Backbone, TextTokens, pad_tokens
from robovla.batch import Batch
from robovla.head import PolicyHead, Prediction

if TYPE_CHECKING:
    from robovla.config import RunConfig


class VLA(nn.Module):
    """backbone + [LRN] + head. ``lrn_tokens`` is K; the K vectors are distinct parameters.

    ``ablate`` hides one input everywhere (training and evaluation alike), to measure what a
    policy takes from it: "image" shows black frames, "instruction" an empty instruction.
    """

    def __init__(self, backbone: Backbone, head: PolicyHead, lrn_tokens: int = 1,
                 ablate: Literal["none", "image", "instruction"] = "none"):
        super().__init__()
        if lrn_tokens < 1:
            raise ValueError(f"lrn_tokens must be >= 1, got {lrn_tokens}")
        if ablate not in ("none", "image", "instruction"):
            raise ValueError(f"ablate must be none, image or instruction, got {ablate!r}")
        self.backbone, self.head, self.ablate = backbone, head, ablate
        # The recipe starts its single [LRN] at zero; several start apart so that they can differ.
        init = torch.zeros(lrn_tokens, backbone.hidden_size)
        if lrn_tokens > 1:
            init.normal_(std=0.02)
        self.lrn = nn.Parameter(init)
        self._tokens: dict[str, list[int]] = {}  # instruction -> ids: each is tokenized once

    # ------------------------------------------------------------------------- inputs

    def tokenize(self, instructions: list[str]) -> TextTokens:
        """B instructions -> right-padded ids and mask [B, L], each distinct instruction tokenized once."""
        new = sorted({i for i in instructions if i not in self._tokens})
        if new:
            tokens = self.backbone.tokenize(new)
            for text, ids, mask in zip(new, tokens.ids, tokens.mask):
                self._tokens[text] = ids[mask].tolist()
        # padding: the BOS id, a valid id of every backbone (masked, so never read)
        return pad_tokens([self._tokens[i] for i in instructions], self.backbone.bos_token_id)

    def assemble(self, images: dict[str, torch.Tensor], tokens: TextTokens) -> tuple[torch.Tensor, ...]:
        """uint8 images camera -> [B, T, H, W, 3] and tokens [B, L] -> embeddings [M, S, D],
        attention mask bool [M, S], the [LRN] positions long [M, K] and the roles long [M, S]
        (``ROLE_*`` of robovla.backbone)."""
        bb = self.backbone
        missing = [cam for cam in bb.cameras if cam not in images]
        if missing:
            raise KeyError(f"the backbone reads cameras {list(bb.cameras)}, the batch has no {missing}")
        b, t = images[bb.cameras[0]].shape[:2]
        device = self.lrn.device
        pixels = [bb.preprocess_images(images[cam].flatten(0, 1).to(device), cam) for cam in bb.cameras]
        if bb.shared_vision and len({p.shape for p in pixels}) == 1:  # every camera in one vision pass
            img = torch.cat(bb.encode_images(torch.cat(pixels), bb.cameras[0]).chunk(len(pixels)), dim=1)
        else:
            img = torch.cat([bb.encode_images(p, cam) for p, cam in zip(pixels, bb.cameras)], dim=1)  # [M, N, D]
        ids, mask = tokens.ids.to(device), tokens.mask.to(device)
        k, length, width = len(self.lrn), mask.sum(1), ids.shape[1]  # length [B]
        closing = [] if bb.eos_token_id is None else [bb.eos_token_id]
        e = len(closing)
        special = bb.embed_tokens(torch.tensor([bb.bos_token_id, *closing], device=device))  # [1 + E, D]
        # The tail after the images, per sample: text, [LRN] x K, EOS, then the text's padding.
        source = torch.cat([bb.embed_tokens(ids), (self.lrn * bb.learned_token_scale).to(special.dtype).expand(b, k, -1),
                            special[1:].expand(b, e, -1)], dim=1)  # [B, L + K + E, D], in source order
        p = torch.arange(width + k + e, device=device).expand(b, -1)
        n = length[:, None]
        index = torch.where(p < n, p, torch.where(p < n + k + e, p - n + width, p - k - e))
        tail = source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))
        tail_mask = p < n + k + e
        m = b * t
        embeds = torch.cat([special[:1].expand(m, 1, -1), img,
                            tail.repeat_interleave(t, dim=0)], dim=1)  # [M, S, D]
        attention = torch.cat([torch.ones(m, 1 + img.shape[1], dtype=torch.bool, device=device),
                               tail_mask.repeat_interleave(t, dim=0)], dim=1)
        lrn_at = (1 + img.shape[1] + n + torch.arange(k, device=device)).repeat_interleave(t, dim=0)  # [M, K]
        tail_roles = torch.where(p < n, ROLE_TEXT, torch.where(p < n + k, ROLE_LRN, ROLE_SPECIAL))
        roles = torch.cat([torch.tensor([ROLE_SPECIAL] + [ROLE_IMAGE] * img.shape[1], device=device).expand(b, -1),
                           tail_roles], dim=1).repeat_interleave(t, dim=0)  # [M, S]
        return embeds, attention, lrn_at, roles

    # ------------------------------------------------------------------------ outputs

    def features(self, images: dict[str, torch.Tensor], instructions: list[str] | TextTokens) -> torch.Tensor:
        """Images camera -> uint8 [B, T, H, W, 3] and B instructions -> [LRN] features [B, T, K, D]."""
        if self.ablate == "image":
            images = {cam: torch.zeros_like(x) for cam, x in images.items()}
        elif self.ablate == "instruction" and not isinstance(instructions, TextTokens):
            instructions = [""] * len(instructions)
        tokens = instructions if isinstance(instructions, TextTokens) else self.tokenize(instructions)
        embeds, attention, lrn_at, roles = self.assemble(images, tokens)
        hidden = self.backbone.forward_embeddings(embeds, attention, roles)  # [M, S, D]
        picked = hidden.gather(1, lrn_at[..., None].expand(-1, -1, hidden.shape[-1]))  # [M, K, D]
        b, t = images[self.backbone.cameras[0]].shape[:2]
        return picked.view(b, t, *picked.shape[1:])

    def forward(self, batch: Batch) -> Prediction:
        """The head's prediction for every step of every window of ``batch``."""
        return self.head(self.features(batch.images, batch.instruction))

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss, metrics) of ``batch`` under the head's loss, masked by its action_mask."""
        return self.head.loss(self(batch), batch.actions.to(self.lrn.device), batch.action_mask.to(self.lrn.device))


def build(run: RunConfig, init: bool = True) -> VLA:
    """The VLA a run configuration describes: its backbone, a head sized to it, K [LRN] tokens,
    the weights of ``--train.init`` when ``init`` (before any adapter goes in), and the
    fine-tuning setup (freezing, LoRA adapters). Seeded by ``--train.seed``, so that every
    process of a run builds the same initial weights."""
    import robovla
    from robovla import checkpoint, finetune
    from robovla.head import Dims
    from robovla.sharing import local_folder

    t = run.train
    torch.manual_seed(t.seed)
    backbone = robovla.create("backbone", run.backbone.name, run.backbone.config)
    space = robovla.create("action_space", run.action_space.name, run.action_space.config)  # its action size: A
    dims = Dims(D=backbone.hidden_size, K=t.lrn_tokens, T=t.window, C=t.chunk, A=space.action_dim)
    head = robovla.create("head", run.head.name, run.head.config, dims=dims)
    vla = VLA(backbone, head, lrn_tokens=t.lrn_tokens, ablate=t.ablate)
    if init and t.init is not None:
        checkpoint.init_weights(vla, local_folder(t.init, "--train.init"))  # a hub repo id: its files
    finetune.setup(vla, t, run.lora)
    return vla

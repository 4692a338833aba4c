"""What trains: full fine-tuning with freeze switches, or LoRA on the backbone through PEFT.

[LRN] and the head always train fully. Under LoRA only the adapters train inside the
backbone; the freeze switches apply to full fine-tuning. A LoRA model is saved as its
adapter plus every other trainable weight (:func:`save_trainable`), and the adapter can be
merged into the base weights for export (:func:`merge_lora`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from robovla.config import LoraConfig, TrainConfig
from robovla.errors import ConfigError
from robovla.vla import VLA

TRAINABLE = "trainable.safetensors"
ADAPTER = "adapter_config.json"


def setup(vla: VLA, train: TrainConfig, lora: LoraConfig) -> None:
    """Set ``requires_grad`` everywhere as ``train`` and ``lora`` ask; inject LoRA when enabled."""
    vla.requires_grad_(True)
    groups = vla.backbone.freeze_groups()
    if lora.enabled:
        add_lora(vla, lora)
    else:
        for module in groups["vision"] if not train.train_vision else []:
            module.requires_grad_(False)
        for module in groups["text_embedding"] if not train.train_text_embedding else []:
            module.requires_grad_(False)
        decoder = groups["decoder"]
        if train.freeze_decoder_layers > len(decoder):
            raise ConfigError([f"--train.freeze_decoder_layers {train.freeze_decoder_layers}: the backbone's decoder "
                               f"has {len(decoder)} layers; freeze at most that many"])
        for module in decoder[:train.freeze_decoder_layers]:
            module.requires_grad_(False)
    if train.gradient_checkpointing:
        vla.backbone.gradient_checkpointing(True)


def lora_targets(vla: VLA, lora: LoraConfig) -> list[str] | str:
    """PEFT target_modules: the backbone's default, the configured names, or every linear layer."""
    if lora.targets is None:
        return vla.backbone.lora_targets
    if lora.targets == "all-linear":  # vision tower and projector too; never an output head
        return [name for name, m in vla.backbone.named_modules()
                if isinstance(m, nn.Linear) and not name.endswith("lm_head")]
    return list(lora.targets)


def add_lora(vla: VLA, lora: LoraConfig) -> None:
    """Inject LoRA adapters into the backbone in place; freeze every other backbone weight."""
    import peft

    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                             target_modules=lora_targets(vla, lora))
    try:
        peft.inject_adapter_in_model(config, vla.backbone)
    except ValueError as exc:  # no module matched
        raise ConfigError([f"--lora.targets: {exc}"]) from None
    for name, p in vla.backbone.named_parameters():
        p.requires_grad_("lora_" in name or (lora.bias == "all" and name.endswith(".bias")))
    vla.lora_config = config  # plain attribute: saved beside the adapter


def merge_lora(vla: VLA) -> int:
    """Fold every adapter into its base layer and remove it; returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(vla.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(vla.backbone.get_submodule(parent) if parent else vla.backbone, child, module.get_base_layer())
            merged += 1
    vla.__dict__.pop("lora_config", None)
    return merged


def save_trainable(vla: VLA, folder: str | Path) -> Path:
    """Write every trainable weight (adapters, [LRN], head, ...) as safetensors, and the LoRA
    config when there is one. With LoRA this is the adapter plus the fully trained weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in vla.named_parameters() if p.requires_grad}
    save_file(tensors, folder / TRAINABLE)
    config = getattr(vla, "lora_config", None)
    if config is not None:
        (folder / ADAPTER).write_text(json.dumps(config.to_dict(), indent=2, default=sorted))
    return folder / TRAINABLE


def load_trainable(vla: VLA, folder: str | Path) -> None:
    """Inverse of :func:`save_trainable` on a model built like the saved one (LoRA injected
    here first when the folder has an adapter config)."""
    import peft
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / ADAPTER).is_file() and getattr(vla, "lora_config", None) is None:
        config = peft.LoraConfig(**{k: v for k, v in json.loads((folder / ADAPTER).read_text()).items()
                                    if k in peft.LoraConfig.__dataclass_fields__})
        peft.inject_adapter_in_model(config, vla.backbone)
        vla.lora_config = config
    state = load_file(folder / TRAINABLE)
    result = vla.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"{folder / TRAINABLE}: weights the model does not have: {result.unexpected_keys[:5]}")


def summary(vla: VLA) -> list[str]:
    """One line per parameter group: trainable and total parameters."""
    seen: set[int] = set()
    rows: list[tuple[str, int, int]] = []

    def count(label: str, params: Any) -> None:
        fresh = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        rows.append((label, sum(p.numel() for p in fresh if p.requires_grad), sum(p.numel() for p in fresh)))

    lora = [p for n, p in vla.backbone.named_parameters() if re.search(r"lora_", n)]
    count("lora", lora)
    for group, modules in vla.backbone.freeze_groups().items():
        count(group.replace("_", " "), [p for m in modules for p in m.parameters()])
    count("backbone other", vla.backbone.parameters())
    count("[LRN]", [vla.lrn])
    count("head", vla.head.parameters())
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{label:<{width}}  {trainable:>13,} trainable of {total:>13,}"
             for label, trainable, total in rows if total]
    trainable, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    lines.append(f"{'total':<{width}}  {trainable:>13,} trainable of {total:>13,} ({100 * trainable / total:.2f}%)")
    return lines

"""``robovlms``: RoboVLMs' "policy head, continuous" checkpoints as robovla runs.

    robo-run convert robovlms kosmos_ph_calvin_abcd.pt --base microsoft/kosmos-2-patch14-224 \\
        --out runs/kosmos-ph-abcd --config <exp>-project.json

A RoboVLMs policy of this kind is a Kosmos-2 or PaLI-Gemma backbone read through one
learned [LRN] token ("post" history) and an ``LSTMDecoder`` head: in robovla, the
``kosmos`` or ``paligemma`` backbone with the ``lstm`` head, starting from the recipe's
preset. Tensor names, after the ``model.`` prefix that RoboVLMs' Lightning trainer adds:

    RoboVLMs                                      robovla
    action_token [D]                              lrn [1, D]
    backbone.<rest>  (Kosmos-2)                   backbone.model.<rest>
    backbone.vision_tower.vision_model.<rest>     backbone.model.model.vision_tower.<rest>
    backbone.multi_modal_projector.<rest>         backbone.model.model.multi_modal_projector.<rest>
    backbone.language_model.model.<rest>          backbone.model.model.language_model.<rest>
    backbone.language_model.lm_head.weight        backbone.model.lm_head.weight
    act_head.rnn.<rest>                           head.lstm.<rest>
    act_head.actions.mlp.<rest>                   head.arm_mlp.<rest>
    act_head.gripper.mlp.<rest>                   head.gripper_mlp.<rest>

Settings come from RoboVLMs' JSON config of the run when it is given (the
``<time>-project.json`` its trainer writes, or the config it was launched with): window,
chunk, cameras (``use_hand_rgb``), action normalization and training values. Without it,
the LSTM's width and depth, the MLP widths and the chunk are read from the tensor shapes,
and the rest is the recipe's: window 8, the static camera only (as RoboVLMs' released
CALVIN configs read it), actions clipped to +-0.65. Images are resized with PIL's bicubic,
as RoboVLMs does. LoRA checkpoints (RoboVLMs' ``lora_enable``) have their adapters merged
into the base weights, W + (lora_alpha / r) B A, which needs the config's ``lora_alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import robovla
from robovla.convert import Conversion, ConvertError

HEAD_RULES = [("act_head.rnn.", "head.lstm."), ("act_head.actions.mlp.", "head.arm_mlp."),
              ("act_head.gripper.mlp.", "head.gripper_mlp.")]
PEFT_COPY = "model.base_model.model."  # RoboVLMs registers its PEFT model a second time under `model`
RECIPE_WINDOW, RECIPE_CLIP = 8, 0.65
UNREAD_DATASET = "CALVIN/task_ABCD_D/training"  # the run's dataset path when the config does not say


@dataclass(frozen=True)
class Family:
    """One RoboVLMs backbone class and the robovla backbone that reproduces it."""

    backbone: str  # robovla's backbone name
    preset: str  # registry.toml's recipe for it
    marker: str  # a name prefix only this family's checkpoints have
    rules: tuple[tuple[str, str], ...]  # (RoboVLMs prefix, robovla prefix)
    names: tuple[str, ...]  # how RoboVLMs' config names it (robovlm_name, model)


FAMILIES = (
    Family("kosmos", "calvin-kosmos-lstm", "backbone.text_model.", (("backbone.", "backbone.model."),),
           ("RoboKosMos", "kosmos")),
    Family("paligemma", "calvin-paligemma-lstm", "backbone.language_model.", (
        ("backbone.vision_tower.vision_model.", "backbone.model.model.vision_tower."),
        ("backbone.multi_modal_projector.", "backbone.model.model.multi_modal_projector."),
        ("backbone.language_model.model.", "backbone.model.model.language_model."),
        ("backbone.language_model.lm_head.", "backbone.model.lm_head.")), ("RoboPaligemma", "paligemma")),
)


class RoboVLMs(robovla.Converter):
    """RoboVLMs' Kosmos-2 or PaLI-Gemma policy with one [LRN] token and the LSTMDecoder head
    (the P.H. continuous recipe), full fine-tuning or LoRA."""

    def convert(self, weights: dict[str, Any], base: str, source_config: dict[str, Any] | None) -> Conversion:
        config = source_config or {}
        notes: list[str] = []
        if all(k.startswith("model.") for k in weights):  # the Lightning module holds the VLA as `model`
            weights = {k[len("model."):]: v for k, v in weights.items()}
        weights = merge_lora(weights, config, notes)
        family = detect(weights, config)
        mapped, unmapped = {}, []
        for name, tensor in weights.items():
            new = rename(name, family.rules + tuple(HEAD_RULES))
            if name == "action_token":
                new, tensor = "lrn", tensor.reshape(1, -1)
            if new is None:
                unmapped.append(name)
            else:
                mapped[new] = tensor
        if unmapped:
            raise ConvertError(f"RoboVLMs tensors without a robovla counterpart ({len(unmapped)}): "
                               f"{', '.join(sorted(unmapped)[:12])}{' ...' if len(unmapped) > 12 else ''}. The "
                               "converter maps the backbone, action_token and the LSTMDecoder head (act_head.rnn, "
                               "act_head.actions.mlp, act_head.gripper.mlp); vision resamplers and other heads are "
                               "not part of the recipe robovla reproduces")
        if "lrn" not in mapped:
            raise ConvertError("no action_token: not a RoboVLMs policy-head (continuous) checkpoint")
        head, chunk = head_config(mapped, config, notes)
        layer = {"backbone": backbone_config(family, base, config, notes), "head": head,
                 "action_space": action_space_config(config, notes),
                 "dataset": {"name": "calvin", "path": dataset_path(config, notes)},
                 "train": train_config(config, chunk, notes)}
        notes.insert(0, f"RoboVLMs {family.names[0]} -> robovla backbone {family.backbone!r}, head 'lstm' "
                        f"(preset {family.preset})")
        return Conversion(config=layer, weights=mapped, preset=family.preset, notes=notes)


def rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return None


def detect(weights: dict[str, Any], config: dict[str, Any]) -> Family:
    """The backbone family, from the tensor names, checked against the config when there is one."""
    found = [f for f in FAMILIES if any(k.startswith(f.marker) for k in weights)]
    if len(found) != 1:
        sample = ", ".join(sorted(k for k in weights if k.startswith("backbone."))[:5]) or "none"
        raise ConvertError("cannot tell the backbone from the tensor names: expected backbone.text_model.* "
                           f"(Kosmos-2) or backbone.language_model.* (PaLI-Gemma); backbone tensors: {sample}")
    named = {config.get("robovlm_name"), config.get("model")} - {None}
    if named and not named & set(found[0].names):
        raise ConvertError(f"the config names {sorted(named)}, but the tensors are {found[0].names[0]}'s: pass the "
                           "config of this checkpoint's run")
    return found[0]


def merge_lora(weights: dict[str, Any], config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Fold PEFT adapters into their base weights: W + (lora_alpha / r) B A."""
    adapters = sorted(k for k in weights if ".lora_A." in k and not k.startswith(PEFT_COPY))
    if not adapters:
        return weights
    alpha = (config.get("train_setup") or {}).get("lora_alpha")
    if alpha is None:
        raise ConvertError(f"a LoRA checkpoint ({len(adapters)} adapters, e.g. {adapters[0]}): merging them into the "
                           "base weights needs train_setup.lora_alpha; pass RoboVLMs' config of the run with --config")
    out = {k: v for k, v in weights.items() if not k.startswith(PEFT_COPY) and ".lora_" not in k}
    for a_name in adapters:
        layer, _, rest = a_name.partition(".lora_A.")
        adapter = rest.removesuffix(".weight")
        a, b = weights[a_name].double(), weights.get(f"{layer}.lora_B.{adapter}.weight")
        base = weights.get(f"{layer}.base_layer.weight")
        if b is None or base is None:
            raise ConvertError(f"LoRA adapter {a_name}: no matching {layer}.lora_B.{adapter}.weight or "
                               f"{layer}.base_layer.weight in the checkpoint")
        merged = base.double() + (alpha / a.shape[0]) * (b.double() @ a)
        out[f"{layer}.base_layer.weight"] = merged.to(base.dtype)
    out = {k.replace(".base_layer.", "."): v for k, v in out.items()}
    r = {int(weights[k].shape[0]) for k in adapters}
    notes.append(f"merged {len(adapters)} LoRA adapters (r {sorted(r)}, lora_alpha {alpha}) into their base weights")
    return out


def head_config(weights: dict[str, Any], config: dict[str, Any], notes: list[str]) -> tuple[dict[str, Any], int]:
    """The lstm head's config from the tensor shapes (and the config's loss weight); and C."""
    act = config.get("act_head") or {}
    for key, want in (("type", "LSTMDecoder"), ("action_space", "continuous"), ("history_type", "post"),
                      ("latent", 1), ("action_dim", 7)):
        if key in act and act[key] != want:
            raise ConvertError(f"act_head.{key} = {act[key]!r}: robovla converts RoboVLMs' policy-head recipe "
                               f"({want!r} there), which this run does not use")
    if "head.lstm.weight_ih_l0" not in weights:
        found = sorted(k for k in weights if k.startswith("head."))[:6]
        raise ConvertError(f"no act_head.rnn.weight_ih_l0: not an LSTMDecoder head (head tensors: {found})")
    layers = sum(1 for k in weights if k.startswith("head.lstm.weight_ih_l"))
    hidden = int(weights["head.lstm.weight_hh_l0"].shape[1])
    d = int(weights["lrn"].shape[-1])
    if int(weights["head.lstm.weight_ih_l0"].shape[1]) != d:
        raise ConvertError(f"the LSTM reads {weights['head.lstm.weight_ih_l0'].shape[1]} features per frame, the "
                           f"[LRN] state has {d}: the recipe feeds the [LRN] state as it is")
    arm, gripper = mlp_widths(weights, "head.arm_mlp."), mlp_widths(weights, "head.gripper_mlp.")
    if arm[:-1] != gripper[:-1] or arm[-1] != 6 * gripper[-1]:
        raise ConvertError(f"arm MLP widths {arm} and gripper MLP widths {gripper} do not form the recipe's pair "
                           "(same hidden widths; 6 arm values and 1 gripper logit per chunk step)")
    chunk = gripper[-1]
    if config.get("fwd_pred_next_n", chunk) != chunk:
        raise ConvertError(f"fwd_pred_next_n = {config['fwd_pred_next_n']} in the config, but the head predicts "
                           f"{chunk} steps: pass the config of this checkpoint's run")
    head = {"name": "lstm", "hidden_size": hidden, "num_layers": layers, "mlp_widths": arm[:-1],
            "arm_loss": "huber", "arm_gripper_loss_ratio": float(config.get("arm_gripper_loss_ratio", 0.01))}
    notes.append(f"head: LSTM {layers} x {hidden}, MLPs {arm[:-1]}, chunk {chunk} (from the tensor shapes)")
    return head, chunk


def mlp_widths(weights: dict[str, Any], prefix: str) -> list[int]:
    """Output widths of an nn.Sequential's Linear layers, in order."""
    index = sorted(int(k[len(prefix):].split(".")[0]) for k in weights
                   if k.startswith(prefix) and k.endswith(".weight"))
    if not index:
        raise ConvertError(f"no {prefix.replace('head.arm_mlp.', 'act_head.actions.mlp.')}* tensors")
    return [int(weights[f"{prefix}{i}.weight"].shape[0]) for i in index]


def backbone_config(family: Family, base: str, config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    if "use_hand_rgb" in config:
        cameras = ["gripper", "static"] if config["use_hand_rgb"] else ["static"]
    else:
        cameras = ["static"]
        notes.append("cameras: static (no --config; RoboVLMs' released CALVIN configs read the static camera only)")
    return {"name": family.backbone, "path": base, "size": "full", "weights": "pretrained", "cameras": cameras,
            "resize": "bicubic"}


def action_space_config(config: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    for key in ("regular_action", "use_mu_law", "tcp_rel"):
        if config.get(key):
            raise ConvertError(f"{key} = true: robovla reproduces RoboVLMs' clip-and-scale world-frame actions "
                               f"(norm_action); {key} has no robovla counterpart")
    if not config:
        notes.append(f"actions: clipped to +-{RECIPE_CLIP} and scaled (no --config; the recipe's norm_action)")
        bound = RECIPE_CLIP
    elif config.get("norm_action", False):
        low, high = float(config.get("norm_min", -RECIPE_CLIP)), float(config.get("norm_max", RECIPE_CLIP))
        if low != -high or high <= 0:
            raise ConvertError(f"norm_min {low}, norm_max {high}: robovla's clip normalization is symmetric "
                               "(-bound, bound)")
        bound = high
    else:
        bound = 1.0  # CALVIN's rel_actions already lie in [-1, 1]: clipping there changes nothing
    return {"name": "rel-world", "normalization": "clip", "clip_bound": bound}


def dataset_path(config: dict[str, Any], notes: list[str]) -> str:
    path = (config.get("train_dataset") or {}).get("data_dir")
    if not path:
        notes.append(f"dataset.path: {UNREAD_DATASET} (not in a config); set --dataset.path to evaluate offline "
                     "or fine-tune")
        return UNREAD_DATASET
    return str(path)


def train_config(config: dict[str, Any], chunk: int, notes: list[str]) -> dict[str, Any]:
    window = config.get("window_size")
    if window is None:
        window = RECIPE_WINDOW
        notes.append(f"window: {RECIPE_WINDOW} (no --config; the recipe's)")
    train: dict[str, Any] = {"window": int(window), "chunk": chunk, "lrn_tokens": 1}
    for theirs, ours in (("learning_rate", "lr"), ("weight_decay", "weight_decay"), ("batch_size", "batch_size"),
                         ("seed", "seed"), ("warmup_epochs", "warmup_epochs"), ("warmup_steps", "warmup_steps")):
        if config.get(theirs) is not None:
            train[ours] = config[theirs]
    return train

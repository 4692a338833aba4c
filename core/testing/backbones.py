"""Conformance checks for backbones, run on every registered backbone.

Each backbone is built from its ``test_config`` (a small offline instance) inside a
:class:`robovla.vla.VLA` with K = 2 [LRN] tokens, and read out on a window of random frames
at the size it asks for (:data:`ANY_SIZE` pixels for one that takes any size). Shape letters:
B batch, T window, M = B*T frames, K [LRN] tokens, D hidden size.

A check fails with one message that says what went wrong where: an exception from the
backbone's own code names the check, the backbone method it came from with its inputs'
shapes (``encode_images(pixel_values float32 [4, 3, 8, 8], camera 'static')``), the line
that raised it and, for errors with a known cause, what to change; a method that returns
the wrong shape is named the same way. The first check that meets an error reports it;
later checks of that backbone that meet the same error (a backbone that cannot be built
fails them all) are skipped, naming the check that reported it.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from torch import nn

import robovla
from robovla.backbone import TextTokens
from robovla.registry import Component
from robovla.testing import check, name

B, T, K = 2, 2, 2
ANY_SIZE = 48  # frame side for a backbone whose image_size is None
SHORT, LONG = "lift the red block", "push the sliding door all the way to the left side"
INTERFACE = ("preprocess_images", "tokenize", "embed_tokens", "encode_images", "forward_embeddings", "freeze_groups")
REQUIRED_GROUPS = ("vision", "text_embedding", "decoder")
HINTS = [  # (what an error message says, what to change)
    (r"Expected more than 1 value per channel when training",
     "a BatchNorm layer saw one value per channel: the feature map is 1x1 at test_config's image size (or one "
     "frame went through it in training mode); use a larger image_size in test_config, or a norm that does not "
     "need batch statistics, e.g. GroupNorm"),
    (r"Kernel size can't be greater than actual input size|Output size is too small",
     "the feature map shrank below a kernel's size at test_config's image size; use a larger image_size in "
     "test_config, or fewer stride-2 layers"),
    (r"mat1 and mat2 shapes cannot be multiplied",
     "a linear layer got inputs of another width than it was built for: check the sizes in test_config against "
     "each other (e.g. the encoder's output width against the projection's input)"),
    (r"object has no attribute '(mean|std)'",
     "a robovla.PromptedBackbone registers float buffers mean and std [1, 3, 1, 1] in __init__"),
    (r"object has no attribute 'token_ids'",
     "a robovla.PromptedBackbone implements token_ids(texts) -> one list of ids per text"),
]

_BUILT: dict[type, nn.Module] = {}  # backbone class -> its VLA, shared by the checks that do not change it
_REPORTED: dict[type, dict[tuple[str, str], str]] = {}  # class -> {(where, error type): check that reported it}


def describe(value: Any) -> str:
    """A short description of an argument or a result: dtypes and shapes, not values."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, TextTokens):
        return f"TextTokens(ids {describe(value.ids)}, mask {describe(value.mask)})"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, str) for v in value):
            return f"{len(value)} strings"
        return f"[{', '.join(describe(v) for v in value[:4])}{', ...' if len(value) > 4 else ''}]"
    return type(value).__name__ if value is not None and not isinstance(value, (int, float, bool)) else repr(value)


def place(exc: BaseException) -> str:
    """Where ``exc`` was raised: the innermost frame outside torch and robovla's own code."""
    skip = tuple(str(Path(package.__file__).parent) + os.sep for package in (torch, robovla))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(skip)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""


def hint(text: str) -> str:
    """What to change, for the error messages :data:`HINTS` knows ("" for others)."""
    return "".join(f"\n  hint: {fix}" for pattern, fix in HINTS if re.search(pattern, text))


class Broken(AssertionError):
    """A backbone method returned something off the contract; the message says what and where."""


def contract(method: str, backbone: Any, args: dict[str, Any], out: Any) -> str | None:
    """What is wrong with ``out``, the result of ``method(**args)``, by the Backbone interface; None if nothing."""
    d = getattr(backbone, "hidden_size", None)
    shape = list(out.shape) if isinstance(out, torch.Tensor) else None
    if method == "preprocess_images":
        m = len(args["images"])
        if shape is None or not out.is_floating_point() or len(shape) != 4 or shape[:2] != [m, 3]:
            return f"pixel values must be float [M={m}, 3, H, W]"
    elif method == "tokenize":
        ids, mask = getattr(out, "ids", None), getattr(out, "mask", None)
        b = len(args["instructions"])
        if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor) and ids.dtype == torch.long
                and mask.dtype == torch.bool and ids.dim() == 2 and ids.shape == mask.shape and len(ids) == b):
            return f"tokens must be robovla.TextTokens(ids long [B={b}, L], mask bool [B={b}, L])"
    elif method == "embed_tokens":
        if shape != [*args["ids"].shape, d]:
            return f"embeddings must be [*ids.shape, D] = {[*args['ids'].shape, d]} (D is hidden_size)"
    elif method == "encode_images":
        m = len(args["pixel_values"])
        if shape is None or len(shape) != 3 or shape[0] != m or shape[2] != d:
            return f"image tokens must be [M={m}, N, D={d}] (D is hidden_size)"
    elif method == "forward_embeddings":
        if shape != list(args["embeds"].shape):
            return f"hidden states must be [M, S, D] = {list(args['embeds'].shape)}, the shape of embeds"
    return None


class Traced:
    """While active, the backbone's interface methods are wrapped on the instance: each call is
    logged with its inputs and result, a result off the contract raises :class:`Broken`, and an
    exception from the plugin's code is remembered with the call it escaped first."""

    def __init__(self, backbone: nn.Module):
        self.backbone, self.log, self.origin = backbone, [], {}

    def __enter__(self) -> Traced:
        self.wrapped = [m for m in INTERFACE if m not in vars(self.backbone)]
        for method in self.wrapped:
            object.__setattr__(self.backbone, method, self.wrap(method, getattr(self.backbone, method)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for method in self.wrapped:
            vars(self.backbone).pop(method, None)

    def wrap(self, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn)

        def traced(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:
                bound = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
            call = f"{method}({', '.join(f'{k} {describe(v)}' for k, v in bound.items())})"
            try:
                out = fn(*args, **kwargs)
            except Exception as exc:
                self.origin.setdefault(id(exc), (call, exc))  # the innermost call it escaped
                raise
            self.log.append(f"{call} -> {describe(out)}")
            wrong = contract(method, self.backbone, bound, out)
            if wrong:
                broken = Broken(f"{call} returned {describe(out)}; {wrong}")
                self.origin[id(broken)] = (call, broken)
                raise broken
            return out

        return traced


class Run:
    """One check on one backbone: builds it and makes the calls, so that what goes wrong in the
    backbone's code fails the check with one message (module docstring)."""

    def __init__(self, component: Component, check_name: str):
        self.component, self.check = component, check_name
        self.doing = self.where = "reading the built backbone"
        self.traced: Traced | None = None

    def model(self, fresh: bool = False) -> nn.Module:
        """The component's VLA (identity head, K [LRN]) in eval mode, shared unless ``fresh``."""
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        if self.component.error is not None:
            pytest.skip(f"{name(self.component)} does not load; the check 'usable' says why")
        cls = self.component.load()
        self.skip_if_reported(cls, "building it")
        if fresh or cls not in _BUILT:
            vla = self.call("building it", f"building it from test_config {cls.test_config!r}", build, cls)
            if fresh:
                return vla
            _BUILT[cls] = vla
        return _BUILT[cls]

    def call(self, where: str, doing: str, fn: Callable[..., Any], *args: Any, vla: Any = None) -> Any:
        """``fn(*args)``, failing the check with one message if it raises (``where``: a short
        name of the step, ``doing``: the step with its inputs); ``vla``'s backbone is traced."""
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        self.where, self.doing = where, doing
        self.traced = Traced(vla.backbone) if vla is not None else None
        try:
            if self.traced is None:
                return fn(*args)
            with self.traced:
                return fn(*args)
        except Broken as exc:
            self.fail(exc, str(exc))
        except Exception as exc:
            self.fail(exc)
        finally:
            self.traced = None
            self.doing = self.where = "reading the built backbone"

    def features(self, vla: nn.Module, images: dict[str, torch.Tensor], instructions: list[str]) -> torch.Tensor:
        """``vla.features(images, instructions)``: [LRN] states [B, T, K, D]."""
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        doing = f"VLA.features(images {describe(images)}, instructions {describe(instructions)})"
        return self.call("VLA.features", doing, vla.features, images, instructions, vla=vla)

    def skip_if_reported(self, cls: type, where: str, error: str | None = None) -> None:
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        for (at, kind), first in _REPORTED.get(cls, {}).items():
            if at == where and error in (None, kind) and first != self.check:
                what = ("failed" if where == "building it" else "returned a result off the contract"
                        if kind == Broken.__name__ else f"raised {kind}")
                pytest.skip(f"{name(self.component)}: not run, because {where} {what} (reported by the check {first})")

    def fail(self, exc: BaseException, message: str | None = None) -> NoReturn:
        """Fail the check with one message about ``exc`` (skip it when another check reported the same)."""
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        call, origin = (self.traced.origin.get(id(exc)) if self.traced else None) or (None, exc)
        where = self.where if call is None else call.split("(")[0]
        cls = self.component.load()
        self.skip_if_reported(cls, where, type(exc).__name__)
        _REPORTED.setdefault(cls, {})[(where, type(exc).__name__)] = self.check
        text = (message if call else f"{self.doing}: {message}") if message else \
            f"{call or self.doing} raised {type(exc).__name__}: {exc}"
        lines = [f"{name(self.component)}, check {self.check}: {text}{'' if message else place(origin)}"]
        if call is not None:
            lines.append(f"  while: {self.doing}")
        elif self.traced is not None and self.traced.log and message is None:
            lines.append("  the backbone's calls before it: " + "; ".join(self.traced.log[-4:]))
        raise AssertionError("\n".join(lines) + hint(str(exc))) from None


def backbone_check(fn: Callable[[Run], None]) -> Callable[[Component], None]:
    """Register ``fn(run)`` as a backbone check ``check(component)``."""

    @functools.wraps(fn)
    def checked(component: Component) -> None:
        __tracebackhide__ = True  # pytest shows the message, not the kit's frames
        run = Run(component, fn.__name__)
        try:
            fn(run)
        except (AssertionError, pytest.skip.Exception):
            raise
        except Exception as exc:  # outside run.call: an attribute the check reads, a helper of its own
            run.fail(exc)

    return check("backbone")(checked)


def build(cls: type) -> nn.Module:
    """A VLA of backbone class ``cls`` at its ``test_config`` (identity head, K [LRN]) in eval mode."""
    from robovla.vla import VLA

    torch.manual_seed(0)
    backbone = cls(cls.Config.model_validate(cls.test_config))
    missing = attribute_problems(backbone)
    if missing:
        raise Broken(f"{cls.__qualname__}.__init__ must set {'; '.join(missing)}")
    return VLA(backbone, nn.Identity(), lrn_tokens=K).eval()


def attribute_problems(backbone: Any) -> list[str]:
    """What is missing or of the wrong kind among the attributes every backbone sets."""
    wants = {"hidden_size": (lambda v: isinstance(v, int) and v > 0, "D, a positive int"),
             "cameras": (lambda v: isinstance(v, tuple) and v and all(isinstance(c, str) for c in v),
                         "a non-empty tuple of camera names"),
             "image_size": (lambda v: v is None or (isinstance(v, int) and v > 0), "a positive int or None"),
             "prompt_template": (lambda v: isinstance(v, str) and "{instruction}" in v, "a str with {instruction}"),
             "lora_targets": (lambda v: isinstance(v, (str, list)), "a list of module names or a regex"),
             "bos_token_id": (lambda v: isinstance(v, int), "an int"),
             "eos_token_id": (lambda v: v is None or isinstance(v, int), "an int or None")}
    return [f"{attr} ({what}; {'got ' + describe(getattr(backbone, attr)) if hasattr(backbone, attr) else 'not set'})"
            for attr, (ok, what) in wants.items() if not ok(getattr(backbone, attr, None))]


def frames(vla: nn.Module, b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = vla.backbone.image_size or ANY_SIZE
    return {cam: torch.randint(0, 256, (b, T, size, size, 3), generator=g, dtype=torch.uint8)
            for cam in vla.backbone.cameras}


# ------------------------------------------------------------------------------ checks


@backbone_check
def lrn_states_have_the_shape_and_no_nan(run: Run) -> None:
    """features are [B, T, K, D], finite, and the K [LRN] states differ."""
    vla = run.model()
    with torch.no_grad():
        out = run.features(vla, frames(vla), [SHORT, LONG])
    d, who = vla.backbone.hidden_size, name(run.component)
    assert tuple(out.shape) == (B, T, K, d), f"{who}: features {tuple(out.shape)}, expected {(B, T, K, d)}"
    finite, equal = bool(torch.isfinite(out).all()), bool(torch.allclose(out[:, :, 0], out[:, :, 1]))
    assert finite, f"{who}: non-finite [LRN] states"
    assert not equal, f"{who}: the {K} [LRN] states are equal"


@backbone_check
def lrn_state_reads_image_and_instruction(run: Run) -> None:
    """Changing the image, or the instruction, changes the [LRN] state."""
    vla = run.model()
    images = frames(vla, b=1)
    with torch.no_grad():
        base = run.features(vla, images, [SHORT])
        for cam in vla.backbone.cameras:
            other = dict(images, **{cam: 255 - images[cam]})
            change = (run.features(vla, other, [SHORT]) - base).abs().max().item()
            assert change > 1e-4, f"{name(run.component)}: the [LRN] state ignores the {cam} camera"
        change = (run.features(vla, images, [LONG]) - base).abs().max().item()
        assert change > 1e-4, f"{name(run.component)}: the [LRN] state ignores the instruction"


@backbone_check
def lrn_state_is_the_same_alone_and_in_a_padded_batch(run: Run) -> None:
    """A sample alone and beside a longer instruction (so padded) give the same state within 1e-5."""
    vla = run.model()
    images = frames(vla)
    with torch.no_grad():
        batched = run.features(vla, images, [SHORT, LONG])
        alone = run.features(vla, {cam: x[:1] for cam, x in images.items()}, [SHORT])
    gap = (batched[:1] - alone).abs().max().item()
    assert gap <= 1e-5, f"{name(run.component)}: padding changes the [LRN] state by {gap:.2e} (> 1e-5)"


@backbone_check
def gradients_reach_lrn_and_every_trainable_weight(run: Run) -> None:
    """One backward pass from the [LRN] states, in training mode as the training loop runs it,
    reaches [LRN] and every trainable weight, finite."""
    vla = run.model()
    vla.zero_grad(set_to_none=True)
    vla.train()
    try:
        out = run.features(vla, frames(vla), [SHORT, LONG])
        run.call("backward", "backward from the [LRN] states", out.square().mean().backward)
    finally:
        vla.eval()
    missing = [n for n, p in vla.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in vla.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    vla.zero_grad(set_to_none=True)
    who = name(run.component)
    assert not missing, f"{who}: no gradient reaches {missing[:8]}{' ...' if len(missing) > 8 else ''}"
    assert not bad, f"{who}: non-finite gradients in {bad[:8]}"


@backbone_check
def freeze_groups_hold_the_backbones_modules(run: Run) -> None:
    """freeze_groups() names at least vision, text_embedding and decoder (its layers, in order),
    each a list of the backbone's own modules, and no parameter is in two groups."""
    vla = run.model()
    groups = run.call("freeze_groups", "freeze_groups()", vla.backbone.freeze_groups, vla=vla)
    who = name(run.component)
    assert isinstance(groups, dict), f"{who}: freeze_groups() must return a dict name -> list of modules"
    missing = [g for g in REQUIRED_GROUPS if g not in groups]
    assert not missing, f"{who}: freeze_groups() lacks {missing} (it has {list(groups)}); --train.train_vision, " \
                        f"--train.train_text_embedding and --train.freeze_decoder_layers need them"
    own = {id(m) for m in vla.backbone.modules()}
    owner: dict[int, str] = {}
    for group, modules in groups.items():
        assert isinstance(modules, list) and all(isinstance(m, nn.Module) and id(m) in own for m in modules), (
            f"{who}: freeze_groups()[{group!r}] must be a list of the backbone's own modules, got {describe(modules)}")
        for p in (p for m in modules for p in m.parameters()):
            assert owner.setdefault(id(p), group) == group, (
                f"{who}: a parameter of shape {list(p.shape)} is in freeze groups {owner[id(p)]!r} and {group!r}")
    assert groups["decoder"], f"{who}: freeze_groups()['decoder'] is empty; list the decoder's layers in order"


@backbone_check
def lora_adapters_on_the_default_targets_learn(run: Run) -> None:
    """LoRA on the backbone's default targets: adapters exist, only they train in the backbone,
    and their B matrices get non-zero gradients ([LRN] too)."""
    from robovla.config import LoraConfig, TrainConfig
    from robovla.finetune import setup

    vla = run.model(fresh=True)
    run.call("finetune.setup", f"adding LoRA (r=2) on lora_targets {vla.backbone.lora_targets!r}", setup, vla,
             TrainConfig(), LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0), vla=vla)
    who = name(run.component)
    trainable = [n for n, p in vla.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), (
        f"{who}: under LoRA the backbone trains {trainable[:5]} (expected adapters only, and some)")
    out = run.features(vla, frames(vla), [SHORT, LONG])
    run.call("backward", "backward from the [LRN] states", out.square().mean().backward)
    dead = [n for n, p in vla.backbone.named_parameters() if "lora_B" in n and (p.grad is None or not p.grad.any())]
    assert not dead, f"{who}: no gradient on LoRA B matrices {dead[:5]}"
    learns = vla.lrn.grad is not None and bool(vla.lrn.grad.any())
    assert learns, f"{who}: no gradient on [LRN]"

"""docs/writing-plugins.md stays true: its backbone plugin, rebuilt from the page byte for byte,
installs with pip, passes robovla's conformance kit, has the shapes the page gives and trains;
and the kit's failures read as the page shows them (one message, the other checks skipped)."""

import importlib
import math
import re
import sys

import pytest
import torch
from pydantic import Field
from torch import nn

import robovla
from robovla import testing
from robovla.backbone import ROLE_IMAGE, ROLE_LRN, ROLE_SPECIAL, ROLE_TEXT
from robovla.head import Dims
from robovla.testing import backbones as kit
from robovla.vla import VLA

from helpers import ROBO_RUN, ROOT, TINY_TRAINING, pip_installed, run, synth_split

GUIDE = (ROOT / "docs" / "writing-plugins.md").read_text()
PACKAGE = {"pyproject.toml", "robovla_minivlm/__init__.py", "robovla_minivlm/backbone.py", "tests/conftest.py",
           "tests/test_conformance.py"}
CHECKS = [fn for fn in testing.CHECKS["backbone"] if fn.__module__ == kit.__name__]


def shown() -> list[tuple[str, str]]:
    """The page's files: each code block after a bold **`path`** line, as (path, text)."""
    return re.findall(r"\*\*`([\w/.]+)`\*\*\n\n```\w+\n(.*?)```", GUIDE, re.S)


def write_package(folder):
    for path, text in shown():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A copy of the page's package on sys.path, for one test (its modules forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(write_package(tmp_path / "robovla-minivlm")))
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "robovla_minivlm"]:
        del sys.modules[name]


@pytest.fixture
def minivlm(source, robovla_plugin):
    """The page's hook module registered for one test; the backbone class."""
    module = importlib.import_module("robovla_minivlm")
    robovla_plugin(module, name="minivlm", distribution="robovla-minivlm", version="0.1.0")
    return robovla.get_component("backbone", "mini-vlm").load()


def test_the_page_holds_one_complete_package():
    paths = [path for path, _ in shown()]
    assert sorted(paths) == sorted(PACKAGE) and len(paths) == len(set(paths))
    assert '[project.entry-points.robovla]\nminivlm = "robovla_minivlm"\n' in dict(shown())["pyproject.toml"]
    n = len(testing.CHECKS["backbone"])  # what the page says the kit runs on a backbone
    assert f"--robovla-distribution robovla-minivlm    # {n} passed" in GUIDE
    assert len(CHECKS) == 6 and "three checks every component gets" in GUIDE and "and six of its own" in GUIDE


@pytest.mark.slow
def test_the_pages_plugin_installs_with_pip_and_passes_the_kit(tmp_path):
    source = write_package(tmp_path / "source")  # pip writes build/ and egg-info beside what it installs
    with pip_installed(source, "robovla-minivlm") as rows:
        assert [(r["kind"], r["name"], r["version"], r["status"], r["entry_point"]) for r in rows] == [
            ("backbone", "mini-vlm", "0.1.0", "ok", "minivlm = robovla_minivlm")]
        checkout = write_package(tmp_path / "robovla-minivlm")  # the page's `cd robovla-minivlm && pytest tests ...`
        checked = run([str(ROBO_RUN.with_name("pytest")), "tests", "-p", "no:cacheprovider",
                       "--robovla-distribution", "robovla-minivlm"], cwd=checkout)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f" {len(testing.CHECKS['backbone'])} passed" in checked.stdout, checked.stdout


def test_the_pages_backbone_has_the_shapes_the_page_gives(minivlm):
    small = robovla.create("backbone", "mini-vlm", minivlm.test_config)
    assert sum(p.numel() for p in small.parameters()) == 68_512
    tokens = small.tokenize(["lift the red block", " go "])
    assert tokens.ids.tolist() == [[3 + b for b in b"lift the red block"], [3 + ord("g"), 3 + ord("o")] + [0] * 16]
    assert tokens.mask.sum(1).tolist() == [18, 2]
    white = small.preprocess_images(torch.full((4, 32, 32, 3), 255, dtype=torch.uint8), "static")
    assert white.shape == (4, 3, 32, 32) and torch.allclose(white[0, :, 0, 0], ((1 - small.mean) / small.std).flatten())
    assert small.encode_images(white, "static").shape == (4, 64, 32)  # 32 px, two halvings: an 8x8 grid
    assert list(small.freeze_groups()) == ["vision", "text_embedding", "decoder", "positions", "decoder_norm"]

    vla = VLA(robovla.create("backbone", "mini-vlm"), nn.Identity())  # default sizes: 64 px, D = 256
    images = {cam: torch.zeros(1, 1, 64, 64, 3, dtype=torch.uint8) for cam in ("gripper", "static")}
    embeds, attention, lrn_at, roles = vla.assemble(images, vla.tokenize(["lift the red block"]))
    assert embeds.shape == (1, 149, 256) and attention.all() and lrn_at.tolist() == [[147]]
    assert roles[0].tolist() == [ROLE_SPECIAL] + [ROLE_IMAGE] * 128 + [ROLE_TEXT] * 18 + [ROLE_LRN, ROLE_SPECIAL]


def test_the_pages_test_without_installing_passes(source, robovla_plugin):
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", GUIDE, re.S) if "robovla_plugin(" in block)
    namespace = {}
    exec(compile(snippet, "docs/writing-plugins.md", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0](robovla_plugin)


def test_the_pages_backbone_learns_inside_a_vla(minivlm):
    torch.manual_seed(0)
    backbone = robovla.create("backbone", "mini-vlm", minivlm.test_config)
    dims = Dims(D=backbone.hidden_size, T=2, C=3)
    vla = VLA(backbone, robovla.create("head", "mlp", {"hidden_size": 32, "mlp_widths": [32]}, dims=dims)).train()
    g = torch.Generator().manual_seed(0)
    images = {cam: torch.randint(0, 256, (2, 2, 32, 32, 3), generator=g, dtype=torch.uint8) for cam in backbone.cameras}
    actions = torch.cat([torch.rand(2, 2, 3, 6, generator=g) * 1.8 - 0.9,
                         (torch.rand(2, 2, 3, 1, generator=g) > 0.5).float()], -1)
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    optimizer = torch.optim.AdamW(vla.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        features = vla.features(images, ["lift the red block", "open the drawer"])
        loss, _ = vla.head.loss(vla.head(features), actions, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.6 * losses[0], losses


def test_the_pages_backbone_trains_through_robo_run_and_its_cameras_are_checked(minivlm, tmp_path, capsys):
    from robovla.cli import main

    training = synth_split(tmp_path / "data")
    argv = ["--backbone", "mini-vlm", "--backbone.image_size", "32", "--backbone.channels", "8,16",
            "--backbone.hidden_size", "32", "--backbone.layers", "2", "--backbone.heads", "2",
            "--head", "mlp", "--head.hidden_size", "32", "--head.mlp_widths", "32",
            "--dataset.path", str(training), "--train.output_dir", str(tmp_path / "runs"), *TINY_TRAINING]
    assert main([*argv, "--train.run_name", "mini", "--train.max_steps", "3", "--train.log_every", "1"]) == 0
    rows = [r.split(",") for r in (tmp_path / "runs" / "mini" / "metrics.csv").read_text().splitlines()[1:]]
    losses = [float(v) for _, split, key, v in rows if (split, key) == ("train", "loss")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    capsys.readouterr()
    assert main([*argv, "--train.run_name", "static-only", "--dataset.cameras", "static"]) != 0
    assert ("--backbone.cameras: backbone 'mini-vlm' reads ['gripper', 'static'], but dataset 'calvin' provides "
            "only ['static'] (no ['gripper'])") in capsys.readouterr().err


# ---------------------------------------------------- the kit's messages on broken backbones


class ProbeConfig(robovla.PromptConfig):
    """An image size and CNN widths."""

    image_size: int = Field(8, gt=0, description="square side in pixels")
    channels: list[int] = Field([8, 16, 16], description="output channels of the stride-2 convolutions")


class BatchNormProbe(robovla.PromptedBackbone):
    """A BatchNorm CNN that counts its image tokens on one blank frame, in training mode: at 8
    pixels its last map is 1x1, one value per channel."""

    Config = ProbeConfig
    test_config = {"image_size": 8}

    def __init__(self, config):
        super().__init__(config)
        self.hidden_size, self.cameras, self.image_size = 16, ("static",), config.image_size
        self.prompt_template, self.lora_targets, self.bos_token_id, self.eos_token_id = "{instruction}", ["mix"], 1, 2
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        layers, n_in = [], 3
        for n_out in config.channels:
            layers += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), self.norm(n_out), nn.ReLU()]
            n_in = n_out
        self.cnn = nn.Sequential(*layers)
        self.tokens = self.cnn(torch.zeros(1, 3, self.image_size, self.image_size)).flatten(2).shape[-1]
        self.embedding, self.mix = nn.Embedding(64, 16), nn.Linear(16, 16)

    def norm(self, channels):
        return nn.BatchNorm2d(channels)

    def token_ids(self, texts):
        return [[3 + len(word) for word in text.split()] for text in texts]

    def embed_tokens(self, ids):
        return self.embedding(ids)

    def encode_images(self, pixel_values, camera):
        return self.cnn(pixel_values).flatten(2).transpose(1, 2)

    def forward_embeddings(self, embeds, attention_mask, roles=None):
        return self.mix(embeds).cumsum(1)

    def freeze_groups(self):
        return {"vision": [self.cnn], "text_embedding": [self.embedding], "decoder": [self.mix]}


class OversizedKernel(BatchNormProbe):
    """GroupNorm, no probe, and a last 5x5 convolution without padding on the 2x2 map."""

    def __init__(self, config):
        super().__init__(config.model_copy(update={"channels": [8, 16]}))
        self.cnn.append(nn.Conv2d(16, 16, 5))

    def norm(self, channels):
        return nn.GroupNorm(1, channels)


class NarrowTokens(OversizedKernel):
    """Image tokens 8 wide where D is 16."""

    def encode_images(self, pixel_values, camera):
        return torch.zeros(len(pixel_values), 4, 8)


class NoCameras(NarrowTokens):
    """Sets no cameras."""

    def __init__(self, config):
        super().__init__(config)
        del self.cameras


class Broken:
    @robovla.hookimpl
    def register_backbones(self, register):
        for name, cls in [("bn-probe", BatchNormProbe), ("oversized-kernel", OversizedKernel),
                          ("narrow-tokens", NarrowTokens), ("no-cameras", NoCameras)]:
            register(name, cls)


def outcomes(name):
    """Every backbone check on backbone ``name``, in order: (check, 'passed' / 'failed' / 'skipped', message)."""
    found = []
    for fn in CHECKS:
        try:
            fn(robovla.get_component("backbone", name))
            found.append((fn.__name__, "passed", ""))
        except AssertionError as exc:
            found.append((fn.__name__, "failed", str(exc)))
        except pytest.skip.Exception as exc:
            found.append((fn.__name__, "skipped", exc.msg))
    return found


def test_a_batchnorm_on_a_1x1_map_fails_one_check_with_a_hint_and_skips_the_others(robovla_plugin):
    robovla_plugin(Broken(), name="broken", distribution="broken-dist")
    (first, status, message), *rest = outcomes("bn-probe")
    assert (first, status) == ("lrn_states_have_the_shape_and_no_nan", "failed")
    probe = "        self.tokens = self.cnn(torch.zeros(1, 3, self.image_size, self.image_size)).flatten(2).shape[-1]"
    line = 1 + open(__file__).read().splitlines().index(probe)
    assert message == (
        "backbone 'bn-probe', check lrn_states_have_the_shape_and_no_nan: building it from test_config "
        "{'image_size': 8} raised ValueError: Expected more than 1 value per channel when training, got input size "
        f"torch.Size([1, 16, 1, 1]) (at {__file__}:{line}, in __init__)\n"
        "  hint: a BatchNorm layer saw one value per channel: the feature map is 1x1 at test_config's image size (or "
        "one frame went through it in training mode); use a larger image_size in test_config, or a norm that does "
        "not need batch statistics, e.g. GroupNorm")
    assert [(check, status) for check, status, _ in rest] == [(fn.__name__, "skipped") for fn in CHECKS[1:]]
    assert {m for _, _, m in rest} == {"backbone 'bn-probe': not run, because building it failed (reported by the "
                                       "check lrn_states_have_the_shape_and_no_nan)"}
    on_the_page = re.search(r"fails like this:\n\n((?:    .*\n)+)", GUIDE).group(1)
    assert " ".join(on_the_page.split()) == " ".join(re.sub(r"\(at .*?, in ", "(at ..., in ", message).split())


def test_an_error_in_a_backbone_call_names_the_call_its_inputs_and_the_line(robovla_plugin):
    robovla_plugin(Broken(), name="broken", distribution="broken-dist")
    found = outcomes("oversized-kernel")
    (first, status, message) = found[0]
    assert (first, status) == ("lrn_states_have_the_shape_and_no_nan", "failed")
    assert message.startswith(
        "backbone 'oversized-kernel', check lrn_states_have_the_shape_and_no_nan: encode_images(pixel_values "
        "float32 [4, 3, 8, 8], camera 'static') raised RuntimeError: Calculated padded input size per channel: "
        "(2 x 2). Kernel size: (5 x 5). Kernel size can't be greater than actual input size (at ")
    assert message.endswith(
        ", in encode_images)\n  while: VLA.features(images {'static': uint8 [2, 2, 8, 8, 3]}, instructions 2 strings)"
        "\n  hint: the feature map shrank below a kernel's size at test_config's image size; use a larger image_size "
        "in test_config, or fewer stride-2 layers")
    skipped = "backbone 'oversized-kernel': not run, because encode_images raised RuntimeError (reported by the " \
              "check lrn_states_have_the_shape_and_no_nan)"
    assert [(c, s, m) for c, s, m in found[1:]] == [
        ("lrn_state_reads_image_and_instruction", "skipped", skipped),
        ("lrn_state_is_the_same_alone_and_in_a_padded_batch", "skipped", skipped),
        ("gradients_reach_lrn_and_every_trainable_weight", "skipped", skipped),
        ("freeze_groups_hold_the_backbones_modules", "passed", ""),  # it calls no image code
        ("lora_adapters_on_the_default_targets_learn", "skipped", skipped)]


def test_a_result_off_the_contract_and_missing_attributes_are_named(robovla_plugin):
    robovla_plugin(Broken(), name="broken", distribution="broken-dist")
    _, status, message = outcomes("narrow-tokens")[0]
    assert status == "failed" and message == (
        "backbone 'narrow-tokens', check lrn_states_have_the_shape_and_no_nan: encode_images(pixel_values float32 "
        "[4, 3, 8, 8], camera 'static') returned float32 [4, 4, 8]; image tokens must be [M=4, N, D=16] (D is "
        "hidden_size)\n  while: VLA.features(images {'static': uint8 [2, 2, 8, 8, 3]}, instructions 2 strings)")
    found = outcomes("no-cameras")
    assert found[0] == ("lrn_states_have_the_shape_and_no_nan", "failed", (
        "backbone 'no-cameras', check lrn_states_have_the_shape_and_no_nan: building it from test_config "
        "{'image_size': 8}: NoCameras.__init__ must set cameras (a non-empty tuple of camera names; not set)"))
    assert {s for _, s, _ in found[1:]} == {"skipped"}


def test_a_parameter_in_two_freeze_groups_is_named(robovla_plugin):
    class TwoGroups(OversizedKernel):
        """Its mixing layer in two freeze groups."""

        def encode_images(self, pixel_values, camera):
            return self.mix(torch.zeros(len(pixel_values), 4, 16))

        def freeze_groups(self):
            return {"vision": [self.cnn, self.mix], "text_embedding": [self.embedding], "decoder": [self.mix]}

    class Hooks:
        @robovla.hookimpl
        def register_backbones(self, register):
            register("two-groups", TwoGroups)

    robovla_plugin(Hooks(), name="two-groups", distribution="broken-dist")
    with pytest.raises(AssertionError, match=re.escape(
            "backbone 'two-groups': a parameter of shape [16, 16] is in freeze groups 'vision' and 'decoder'")):
        kit.freeze_groups_hold_the_backbones_modules(robovla.get_component("backbone", "two-groups"))

"""Policy heads: the recipe's sizes, online stepping, the shared loss, each head's own
mechanics (binning, flow sampling, token pooling), config errors, and `--head NAME`."""

import json
import math
import sys
import tomllib

import pytest
import torch

import robovla
from robovla import losses, registry_file
from robovla.cli import main
from robovla.errors import ConfigError
from robovla.testing import heads as checks

from helpers import EXAMPLE, clean_env, fake_distribution, run
from toy import PRESETS, Toy

HEADS = ["lstm", "mlp", "gpt", "discrete", "flow"]
FULL = robovla.Dims(D=2048, K=1, T=8, C=10, A=7)


def linear(n_in, n_out):
    return n_in * n_out + n_out


def recipe_mlp(n_out, n_in=1024):  # RoboVLMs MLPTanhHead / MLPSigmoidHead: 1024, 512, 256
    return linear(n_in, 1024) + linear(1024, 512) + linear(512, 256) + linear(256, n_out)


@pytest.fixture(scope="module")
def full_lstm():
    torch.manual_seed(0)
    return robovla.create("head", "lstm", dims=FULL).eval()


def count(head):
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


def tiny(name, dims=checks.DIMS, **overrides):
    torch.manual_seed(0)
    cls = robovla.get_component("head", name).load()
    return robovla.create("head", name, {**cls.test_config, **overrides}, dims=dims)


# ------------------------------------------------------------------------ sizes and stepping


def test_lstm_has_the_recipes_size_at_full_size(full_lstm):
    lstm = 4 * (linear(2048, 1024) + linear(1024, 1024)) + 3 * 4 * (2 * linear(1024, 1024))
    assert count(full_lstm.lstm) == lstm == 37_781_504
    assert count(full_lstm) == lstm + recipe_mlp(10 * 6) + recipe_mlp(10) == 41_210_950
    assert abs(count(full_lstm) / 41.2e6 - 1) < 0.01


def test_mlp_head_has_the_recipes_fc_decoder_size():
    with torch.device("meta"):
        head = robovla.create("head", "mlp", dims=FULL)
    assert count(head) == linear(2048, 1024) + linear(1024, 1024) + recipe_mlp(60) + recipe_mlp(10) == 6_577_222


def test_lstm_online_steps_reproduce_the_batched_forward_over_20_steps(full_lstm):
    """T=8, full size: steps 1..8 advance the state, steps 9..20 re-run the last 8 frames."""
    torch.manual_seed(1)
    features = torch.randn(2, 20, 1, 2048)
    worst = 0.0
    with torch.no_grad():
        full_lstm.reset()
        for n in range(1, 21):
            got = full_lstm.step(features[:, n - 1:n])
            window = features[:, max(0, n - 8):n]
            want = full_lstm(window)
            for key in ("arm", "gripper"):
                assert got[key].shape == (2, 1, 10, 6 if key == "arm" else 1)
                worst = max(worst, (got[key] - want[key][:, -1:]).abs().max().item())
        # the window limit is real: with all 20 frames the last prediction would differ
        unlimited = full_lstm.outputs(full_lstm.lstm(features.flatten(2))[0][:, -1:])
    assert worst < 1e-5
    assert (unlimited["arm"] - got["arm"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["lstm", "gpt"])
def test_window_heads_are_causal_and_refuse_longer_windows(name):
    head = tiny(name)
    features = torch.randn(2, 4, 2, 16)
    later = features.clone()
    later[:, 2:] += 1.0
    with torch.no_grad():
        a, b = head(features), head(later)
    torch.testing.assert_close(a["arm"][:, :2], b["arm"][:, :2])
    assert not torch.allclose(a["arm"][:, 2:], b["arm"][:, 2:])
    with pytest.raises(ValueError, match="a window of 5 frames is longer than T=4"):
        head(torch.randn(2, 5, 2, 16))


@pytest.mark.parametrize("name", HEADS)
def test_step_checks_its_input(name):
    head = tiny(name)
    for shape in ([2, 2, 2, 16], [2, 1, 1, 16], [2, 1, 2]):
        with pytest.raises(ValueError, match=rf"step takes one frame \[B, 1, K=2, D=16\], got \{shape}"):
            head.step(torch.randn(*shape))
    with pytest.raises(ValueError, match=r"features must be \[B, T, K=2, D=16\], got \[2, 4, 1, 16\]"):
        head(torch.randn(2, 4, 1, 16))
    if head.window:
        head.step(torch.randn(2, 1, 2, 16))
        with pytest.raises(ValueError, match="batch size changed from 2 to 3 within an episode; call reset"):
            head.step(torch.randn(3, 1, 2, 16))
        head.reset()
        assert head.step(torch.randn(3, 1, 2, 16))["gripper"].shape == (3, 1, 3, 1)


@pytest.mark.parametrize("tokens", ["flatten", "mean", "max"])
def test_k_lrn_tokens_are_flattened_or_pooled(tokens):
    head = tiny("mlp", tokens=tokens)
    features = torch.randn(2, 4, 2, 16)
    want = {"flatten": features.flatten(2), "mean": features.mean(2), "max": features.amax(2)}[tokens]
    torch.testing.assert_close(head.frame_features(features), want)
    assert head.trunk[0].in_features == (32 if tokens == "flatten" else 16)


# ------------------------------------------------------------------------------- the loss


def test_chunk_loss_matches_a_hand_computation():
    arm = torch.tensor([0.5, -2.0, 0.0]).view(1, 1, 1, 3).expand(1, 1, 2, 3).clone()
    actions = torch.zeros(1, 1, 2, 4)
    actions[..., 3] = torch.tensor([1.0, 0.0])
    logits = torch.tensor([2.0, 1.0]).view(1, 1, 2, 1)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    huber = (0.5 * 0.25 + (2.0 - 0.5) + 0) / 3  # quadratic below delta 1, linear above
    bce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    loss, metrics = losses.chunk_loss(arm, logits, actions, mask)
    assert loss.item() == pytest.approx(huber + 0.01 * bce, rel=1e-6)
    assert metrics["arm_loss"].item() == pytest.approx(huber, rel=1e-6)
    assert metrics["gripper_loss"].item() == pytest.approx(bce, rel=1e-6)
    assert metrics["arm_l1"].item() == pytest.approx(2.5 / 3, rel=1e-6)
    assert metrics["gripper_acc"].item() == 0.5  # logit 1 says open, the label says closed
    mse, _ = losses.chunk_loss(arm, logits, actions, mask, arm_loss="mse", gripper_weight=1.0)
    assert mse.item() == pytest.approx((0.25 + 4.0) / 3 + bce, rel=1e-6)
    half, m = losses.chunk_loss(arm, logits, actions, torch.tensor([[[True, False]]]))
    assert half.item() == pytest.approx(huber + 0.01 * math.log1p(math.exp(-2.0)), rel=1e-6)
    assert m["gripper_acc"].item() == 1.0


def test_masked_targets_may_hold_anything_even_nan():
    arm = torch.zeros(1, 1, 2, 6, requires_grad=True)
    logits = torch.zeros(1, 1, 2, 1, requires_grad=True)
    actions = torch.zeros(1, 1, 2, 7)
    actions[0, 0, 1] = float("nan")
    mask = torch.tensor([[[True, False]]])
    loss, metrics = losses.chunk_loss(arm, logits, actions, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(arm.grad).all() and (arm.grad[0, 0, 1] == 0).all()
    assert losses.masked_mean(torch.ones(1, 1, 2), torch.zeros(1, 1, 2, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("name", HEADS + ["example-linear"])
def test_every_head_reports_the_same_metrics(name):
    cls = robovla.get_component("head", name).load()
    torch.manual_seed(0)
    head = robovla.create("head", name, dict(cls.test_config), dims=checks.DIMS)
    features, actions, mask = checks.batch()
    actions[~mask] = float("nan")  # the built-in heads and the shared loss ignore whatever is masked
    loss, metrics = head.loss(head(features), actions, mask)
    assert tuple(metrics) == losses.METRIC_KEYS and torch.isfinite(loss)


@pytest.mark.parametrize("name", ["lstm", "mlp", "gpt"])
def test_arm_loss_is_huber_or_mse_and_weights_the_gripper(name):
    head = tiny(name)
    features, actions, mask = checks.batch()
    prediction = head(features)
    loss, metrics = head.loss(prediction, actions, mask)
    want = losses.chunk_loss(prediction["arm"], prediction["gripper"], actions, mask)[0]
    torch.testing.assert_close(loss, want)
    head.config = head.Config(**{**head.config.model_dump(), "arm_loss": "mse", "arm_gripper_loss_ratio": 0.5})
    loss, metrics = head.loss(prediction, actions, mask)
    arm = ((prediction["arm"] - actions[..., :-1]).pow(2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, arm + 0.5 * metrics["gripper_loss"])


# ----------------------------------------------------------------------- the discrete head


def test_discrete_bins_and_bin_centres():
    head = tiny("discrete", bins=4)
    values = torch.tensor([-5.0, -1.0, -0.5, 0.49, 0.5, 1.0, 5.0, float("nan")])
    assert head.bin_of(values).tolist() == [0, 0, 1, 2, 3, 3, 3, 0]
    torch.testing.assert_close(head.centres, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    logits = torch.nn.functional.one_hot(torch.tensor([3, 0, 1]), 4).float().view(1, 1, 1, 3, 4)
    assert head.decode(logits).flatten().tolist() == [0.75, -0.75, -0.25]


def test_discrete_round_trip_error_is_half_a_bin_and_the_loss_counts_it():
    head = robovla.create("head", "discrete", {"hidden_size": 8, "mlp_widths": [8]}, dims=robovla.Dims(D=4, T=2, C=3))
    assert head.config.bins == 256
    actions = torch.rand(2, 2, 3, 7) * 2 - 1
    actions[..., -1] = (actions[..., -1] > 0).float()
    bins = head.bin_of(actions[..., :-1])
    decoded = head.centres[bins]
    assert (decoded - actions[..., :-1]).abs().max() <= 1 / 256 + 1e-6
    prediction = {"arm_logits": torch.nn.functional.one_hot(bins, 256).float() * 50,
                  "gripper": (actions[..., -1:] * 2 - 1) * 50}
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    loss, metrics = head.loss(prediction, actions, mask)
    assert loss.item() < 1e-6 and metrics["gripper_acc"] == 1
    assert metrics["arm_l1"].item() == pytest.approx((decoded - actions[..., :-1]).abs().mean().item(), rel=1e-5)
    out = head.actions(prediction)
    torch.testing.assert_close(out[..., :-1], decoded)
    torch.testing.assert_close(out[..., -1], actions[..., -1])


# --------------------------------------------------------------------------- the flow head


def test_flow_samples_from_the_generator_and_learns_the_chunk():
    head = tiny("flow").train()
    features, actions, mask = checks.batch()
    with torch.no_grad():
        prediction = head(features)
        a = head.actions(prediction, generator=torch.Generator().manual_seed(5))
        b = head.actions(prediction, generator=torch.Generator().manual_seed(5))
        c = head.actions(prediction, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a[..., :-1], c[..., :-1])

    def sample_error(prediction):  # masked mean |sampled arm - target arm|
        sampled = head.actions(prediction, generator=torch.Generator().manual_seed(0))
        return losses.masked_mean((sampled[..., :-1] - actions[..., :-1]).abs().mean(-1), mask).item()

    before = sample_error(prediction)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(300):
        loss, metrics = head.loss(head(features), actions, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        prediction = head(features)
        after = sample_error(prediction)  # noise -> the chunk, in sample_steps Euler steps
        head.config = head.Config(**{**head.config.model_dump(), "sample_steps": 1})
        one_step = sample_error(prediction)
    assert before > 0.6 and after < 0.2 and after < one_step
    assert metrics["arm_l1"] < 0.2 and metrics["gripper_acc"] == 1


def test_flow_time_schedule_follows_pi0():
    """s = 0.999 (1 - u), u ~ Beta(1.5, 1): P(s > x) = (1 - x / 0.999)^1.5, never above 0.999."""
    from robovla_plugins.heads.flow import training_times

    torch.manual_seed(0)
    s = training_times((200_000,))
    assert 0 < s.min() and s.max() <= 0.999
    for x in (0.1, 0.5, 0.9):
        assert (s > x).float().mean().item() == pytest.approx((1 - x / 0.999) ** 1.5, abs=0.005)


# ------------------------------------------------------------------ conventions and errors


def test_gripper_channel_is_the_probability_of_open_and_the_example_decodes_it():
    head = tiny("lstm")
    prediction = {"arm": torch.zeros(1, 1, 3, 6), "gripper": torch.tensor([-1.0, 0.0, 2.0]).view(1, 1, 3, 1)}
    probs = head.actions(prediction)[..., -1].flatten()
    torch.testing.assert_close(probs, torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0])))
    space = robovla.create("action_space", "example-clip")
    raw = torch.zeros(3, 7).numpy()
    raw[:, 6] = [-1, 1, -1]
    raw[:, 0] = [1.0, -0.13, 0.0]
    encoded = space.encode(raw, None)
    assert encoded[:, 6].tolist() == [0, 1, 0] and encoded[:, 0].tolist() == pytest.approx([1, -0.2, 0])
    assert space.decode(encoded, None)[:, 6].tolist() == [-1, 1, -1]
    out = raw.copy()
    out[:, 6] = probs.numpy()
    assert space.decode(out, None)[:, 6].tolist() == [-1, 1, 1]  # 0.27 -> close, 0.5 and 0.88 -> open


def test_bad_config_values_are_clear_errors():
    dims = robovla.Dims(D=8)
    cases = [
        ("discrete", {"bins": 1, "low": 1, "high": 0}, [
            "--head.bins: Input should be greater than or equal to 2, got 1",
            "--head.high: Value error, high must be greater than low (1.0), got 0"]),
        ("gpt", {"hidden_size": 30, "num_heads": 4}, ["--head.num_heads: Value error, num_heads must divide "
                                                      "hidden_size (30), got 4"]),
        ("lstm", {"num_layers": 0, "mlp_widths": [0], "tokens": "avg"}, [
            "--head.tokens: Input should be 'flatten', 'mean' or 'max', got 'avg'",
            "--head.mlp_widths.0: Input should be greater than 0, got 0",
            "--head.num_layers: Input should be greater than 0, got 0"]),
        ("flow", {"sample_steps": 0, "arm_gripper_loss_ratio": -1}, [
            "--head.arm_gripper_loss_ratio: Input should be greater than or equal to 0, got -1",
            "--head.sample_steps: Input should be greater than 0, got 0"]),
        ("mlp", {"arm_loss": "l1", "huber_delta": 0}, [
            "--head.arm_loss: Input should be 'huber' or 'mse', got 'l1'",
            "--head.huber_delta: Input should be greater than 0, got 0"]),
    ]
    for name, values, problems in cases:
        with pytest.raises(ConfigError) as err:
            robovla.create("head", name, values, dims=dims)
        assert err.value.problems == problems
    with pytest.raises(ValueError, match="needs A >= 2"):
        robovla.create("head", "mlp", dims=robovla.Dims(D=8, A=1))


# ------------------------------------------------------------------------- --head NAME


@pytest.fixture
def toy(robovla_plugin, monkeypatch):
    robovla_plugin(Toy(), name="toy", distribution="toy-dist", version="9.9")
    monkeypatch.setattr(registry_file, "load", lambda: PRESETS)


@pytest.mark.parametrize("extra", [[], ["--head.dropout", "0.1"]])
def test_head_flag_swaps_heads_and_nothing_else(toy, capsys, extra):
    base = ["config", "--preset", "none", "--backbone", "toy", "--dataset", "toy-data", "--dataset.path", "/d",
            "--action-space", "example-clip"]
    configs = {}
    for name in HEADS + ["example-linear"]:
        flags = extra if name in ("lstm", "gpt") else []
        assert main(base + ["--head", name, *flags]) == 0, capsys.readouterr().err
        configs[name] = tomllib.loads(capsys.readouterr().out)
    for name, config in configs.items():
        cls = robovla.get_component("head", name).load()
        head = config.pop("head")
        overrides = {"dropout": 0.1} if extra and name in ("lstm", "gpt") else {}
        assert head.pop("name") == name and head == cls.Config(**overrides).model_dump(mode="json")
        assert config.pop("meta")["head"] == f"{'robovla-example' if name == 'example-linear' else 'robovla'} 0.1.0 " \
            f"({cls.__module__})"
        assert config == configs["lstm"]  # every other section unchanged
    if extra:
        assert main(base + ["--head", "mlp", *extra]) == 2
        assert "--head.dropout: unknown field 'dropout'" in capsys.readouterr().err


def test_heads_reach_robo_run_through_the_entry_point(tmp_path):
    """In a fresh process: the built-ins through robovla's entry point `heads`, beside an
    installed third-party head; `robo-run config --head NAME` resolves each."""
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "robovla-example", "0.1.0", {}, {"example": "robovla_example"})
    parts = """
        from pydantic import Field
        import robovla

        class Backbone(robovla.Backbone):
            '''config only'''
            class Config(robovla.ComponentConfig):
                path: str = Field("tiny", description="size")

        class Data(robovla.Dataset):
            '''config only'''
            class Config(robovla.ComponentConfig):
                path: str = Field("/d", description="split")

        @robovla.hookimpl
        def register_backbones(register):
            register("toy", Backbone)

        @robovla.hookimpl
        def register_datasets(register):
            register("toy-data", Data)
    """
    fake_distribution(site, "toy-parts", "1.0", {"toy_parts": parts}, {"toy": "toy_parts"})
    code = ("import sys, tomllib, io, contextlib; from robovla.cli import main\n"
            f"for name in {HEADS + ['example-linear']!r}:\n"
            "    out = io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        rc = main(['config', '--preset', 'none', '--backbone', 'toy', '--dataset', 'toy-data',\n"
            "                   '--action-space', 'example-clip', '--head', name])\n"
            "    assert rc == 0, name\n"
            "    print(name, tomllib.loads(out.getvalue())['meta']['head'])\n")
    env = clean_env(PYTHONPATH=f"{site}:{EXAMPLE}")
    result = run([sys.executable, "-c", code], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name} robovla 0.1.0 (robovla_plugins.heads.{name})" for name in HEADS] + [
        "example-linear robovla-example 0.1.0 (robovla_example.head)"]
    listing = run([sys.executable, "-c", "import sys; from robovla.cli import main; main(['plugins', '--json']); "
                   "assert 'torch' not in sys.modules, 'torch was imported'"], env=clean_env())
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout) if r["kind"] == "head"}
    assert {n: (rows[n]["entry_point"], rows[n]["status"]) for n in HEADS} == \
        {n: ("heads = robovla_plugins.heads", "ok") for n in HEADS}

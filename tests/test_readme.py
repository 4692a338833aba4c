"""The README stays true: the quick start is two commands, CI runs exactly those, the
example plugin shown is the one tested, and the grammar it shows parses."""

import re

from helpers import EXAMPLE, ROOT

README = (ROOT / "README.md").read_text()


def quickstart() -> list[str]:
    block = re.search(r"<!-- quickstart.*?-->\n```bash\n(.*?)```", README, re.S)
    assert block, "README.md lost its quick-start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_is_two_commands_that_ci_runs():
    install, test = quickstart()
    assert "pip install" in install and "robo-run" in install
    assert "HF_HUB_OFFLINE=1" in test and "pytest" in test
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd ", "rm ", "export "))]
    assert ci == [install, test]


def test_readme_shows_the_example_plugin_as_it_is():
    shown = re.findall(r"\*\*`([\w/.]+)`\*\*\n\n```\w+\n(.*?)```", README, re.S)
    assert {path for path, _ in shown} == {"pyproject.toml", "robovla_example/__init__.py",
                                          "robovla_example/action_space.py"}
    for path, text in shown:
        assert text == (EXAMPLE / path).read_text(), f"README's copy of {path} differs from tests/plugin_example"


def test_readme_error_example_is_what_robo_run_says(capsys):
    from robovla.cli import main

    main(["--train.lr", "fast", "--train.widow", "9"])
    err = capsys.readouterr().err
    assert "--train.lr: Input should be a valid number, unable to parse string as a number, got 'fast' " \
           "(from command line)" in err and "--train.lr" in README
    assert "--train.widow: unknown field 'widow'; did you mean 'window'? Valid: ablate, augment, batch_size," in err

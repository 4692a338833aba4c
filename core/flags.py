"""The command-line grammar of every ``--SECTION.FIELD`` flag, shared by ``robo-run`` and its
subcommands: ``--key value``, ``--key=value``, a bare ``--key`` (true for a yes/no field),
lists written ``a,b`` or as TOML ``["a", "b"]``, and ``none`` for an optional field.
:func:`robovla.config.cli_layer` turns the flags into a config layer."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

NONE = "none"  # how files and flags spell None; accepted by every optional field


def read_flag(argv: list[str], i: int) -> tuple[str, str | None, int]:
    """The flag at ``argv[i]`` (a token starting with ``--``) as (key, value, index of the next
    token): ``--key value``, ``--key=value``, or a bare ``--key`` when the next token is another
    flag or there is none (value None, which means true for a yes/no field)."""
    key, eq, value = argv[i][2:].partition("=")
    if eq:
        return key, value, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return key, argv[i + 1], i + 2
    return key, None, i + 1


def section_flags(argv: list[str], section: str) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Take the ``--SECTION.FIELD`` flags out of ``argv`` (grammar: :func:`read_flag`):
    (the other tokens, [("SECTION.FIELD", value)]) for :func:`cli_layer`."""
    rest, flags, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith(f"--{section}."):
            key, value, i = read_flag(argv, i)
            flags.append((key, value))
        else:
            rest.append(argv[i])
            i += 1
    return rest, flags


def coerce_cli(annotation: Any, text: str) -> Any:
    """Turn a command-line string into what the field's type expects where pydantic won't:
    lists, written ``a,b`` or as TOML ``["a", "b"]``. (``none`` is handled for every source
    in :func:`validate_section`.)"""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        if text in literals or (text.lower() == NONE and type(None) in args):
            return text
        sequence = next((a for a in args if (typing.get_origin(a) or a) in (list, tuple, set)), None)
        return text if sequence is None else coerce_cli(sequence, text)
    if (origin or annotation) in (list, tuple, set):
        if text.startswith("["):
            from robovla.registry_file import toml_value

            return toml_value(text)
        return [t.strip() for t in text.split(",") if t.strip()]
    return text


def is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                  and bool in typing.get_args(annotation))


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for messages (a 5,000-character flag stays readable)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def add_option_flags(parser: Any, model: Any) -> None:
    """Add one ``--field-name`` flag per field of the pydantic ``model`` to an argparse parser:
    a bare switch for a yes/no field, a value otherwise (its description and default as help)."""
    for field, info in model.model_fields.items():
        flag = "--" + field.replace("_", "-")
        text = (info.description or "").replace("%", "%%")  # argparse formats help with %
        if info.annotation is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            shown = "" if info.default is None else f" (default: {info.default})"
            parser.add_argument(flag, default=info.default, help=f"{text}{shown}")


def read_options(args: Any, model: Any) -> Any:
    """The ``model`` instance that the flags :func:`add_option_flags` added hold, or a ConfigError
    naming each wrong flag and its value."""
    import pydantic

    from robovla.errors import ConfigError

    values = {f: getattr(args, f) for f in model.model_fields if getattr(args, f) is not None}
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise ConfigError([f"--{str(e['loc'][0]).replace('_', '-')} {values.get(e['loc'][0])}: {e['msg']}"
                           if e["loc"] else e["msg"].removeprefix("Value error, ") for e in exc.errors()],
                          header="cannot parse the command line") from None


def new_folder(label: str, folder: Any, why: str) -> None:
    """Refuse, as a usage error, an output ``folder`` (a Path) that exists and is not empty (or
    is not a folder), before anything is written; ``label`` names the argument, ``why`` what
    the command would write there."""
    from robovla.errors import ConfigError

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        what = "a folder that is not empty" if folder.is_dir() else "not a folder"
        raise ConfigError([f"{label}: {what}; {why}: pass a new or empty folder"],
                          header="cannot parse the command line")


def capable_plugin(parser: Any, argv: list[str], flag: str, kind: str, method: str,
                   options: str) -> tuple[str, Any, Any]:
    """For a command that hands its work to a plugin capability (``robo-run pretrain --backbone
    NAME``, ``robo-run data export --to NAME``): the plugin name that ``flag`` holds in ``argv``,
    its class, and the class's options model (attribute ``options``), whose fields are added
    to ``parser`` as flags. A class without the classmethod ``method`` or the options model
    is refused, naming the registered ones that have both."""
    import argparse

    from robovla.errors import RobovlaError
    from robovla.registry import get_component, list_components

    def capable(cls: Any) -> bool:
        return callable(getattr(cls, method, None)) and getattr(cls, options, None) is not None

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag)
    name = getattr(pre.parse_known_args(argv)[0], flag.lstrip("-").replace("-", "_"))
    if name is None:
        parser.parse_args(argv)  # --help, or the error that the flag is required
    cls = get_component(kind, name).load()
    if not capable(cls):
        able = []
        for other in list_components(kind):
            try:
                able += [other] if capable(get_component(kind, other).load()) else []
            except Exception:  # noqa: BLE001 - a plugin that fails to load is listed by robo-run plugins
                continue
        raise RobovlaError(f"{kind} {name!r} cannot {method} (its class defines no `{method}` and `{options}`); "
                           f"choose one that can: {', '.join(f'{flag} {a}' for a in able) or 'none is installed'}")
    model = getattr(cls, options)
    add_option_flags(parser, model)
    return name, cls, model

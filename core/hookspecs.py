"""The hooks a robovla plugin implements.

A plugin is a module named by an entry point in group ``robovla``; it holds functions
decorated with ``@robovla.hookimpl`` whose names are the hooks below. Every hook receives
a ``register(name, component)`` callback. ``component`` is the class, or a string
``"package.module:ClassName"`` that robovla imports on first use, which keeps
``robo-run --help`` and ``robo-run plugins`` from importing torch.
robovla stamps each registration with the providing distribution and version.
"""

import pluggy

hookspec = pluggy.HookspecMarker("robovla")
hookimpl = pluggy.HookimplMarker("robovla")


# ---------------------------------------------------------------- registration hooks


@hookspec
def register_backbones(register):
    """Register vision-language backbones.

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.Backbone` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per backbone.

    Use in plugins: the names become ``--backbone NAME``. A name must be unique among
    all installed plugins: a built-in name (distribution robovla) stays the built-in's and
    the clash is reported; between two other plugins, a second provider makes the name
    unusable until one is disabled. The same holds for every hook below.
    """


@hookspec
def register_heads(register):
    """Register policy heads.

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.PolicyHead` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per head.

    Use in plugins: the names become ``--head NAME``; a head swaps in with no other
    change when it honours the PolicyHead shapes [B, T, K, D] -> [B, T, C, A].
    """


@hookspec
def register_action_spaces(register):
    """Register action spaces (how raw robot actions become training targets and back).

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.ActionSpace` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per action space.

    Use in plugins: the names become ``--action-space NAME``.
    """


@hookspec
def register_datasets(register):
    """Register dataset readers.

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.Dataset` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per dataset format.

    Use in plugins: the names become ``--dataset NAME``; windows, chunks, padding and
    masks are made by the core from the episodes the dataset lists.
    """


@hookspec
def register_envs(register):
    """Register environments for closed-loop evaluation.

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.Env` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per environment.

    Use in plugins: the names become ``robo-run eval --env NAME``.
    """


@hookspec
def register_converters(register):
    """Register converters of other frameworks' checkpoints (``robo-run convert NAME ...``).

    :param register: ``register(name, component)``; ``component`` is a subclass of
        :class:`robovla.Converter` or its ``"module:Class"`` reference.
    :return: nothing; call ``register`` once per source framework.

    Use in plugins: keep a converter beside the backbones whose weights it maps; the core
    reads the checkpoint file, checks every tensor against the model and writes the run.
    """

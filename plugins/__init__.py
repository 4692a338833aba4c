"""robovla's built-in components: ordinary plugins, registered only through the
entry-point group ``robovla`` in pyproject.toml, exactly as a third-party package does."""

"""A plugin module whose dependency is not installed (for tests of the install advice)."""

import robovla_missing_dependency_xyz  # noqa: F401

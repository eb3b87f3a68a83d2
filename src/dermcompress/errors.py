"""The error every part raises for a config value it cannot use: the one module all parts may import besides the
package itself, so that a data stage or a model loader can name a bad config key without importing config.py
(which imports the experiment grids, and would tie every stage's code fingerprint to them)."""


class ConfigError(ValueError):
    """A config value that is well-typed but unusable; the message starts with the key's dotted path."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config key '{key}': {problem}")
        self.key = key

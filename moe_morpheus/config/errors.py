"""The one error type of configuration checks and the check helper every schema uses."""


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)

"""The errors a model's config.json raises: the message names the file and where it breaks."""


class ConfigError(ValueError):
    """A config.json that cannot be read; the message names the file and where it breaks."""


class UnsupportedModelError(ConfigError):
    """The config describes a model raytp cannot run."""

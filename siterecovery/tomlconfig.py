"""Moved to ``common.tomlconfig`` (the agent bundle loads its config without the CLI);
this name stays for the CLI's modules and the tests that import it from here."""

from common.tomlconfig import ConfigError, from_mapping, load

__all__ = ["ConfigError", "from_mapping", "load"]

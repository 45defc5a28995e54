"""siterecovery: the ``siterecovery`` command, a thin composition root over the packages."""

__version__ = "0.1.0"

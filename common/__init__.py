"""Shared leaf of siterecovery: imports no package of the project.

Durable file writes (``fs``), pacing (``pacing``), retry back-off (``backoff``),
digests and fingerprints (``digest``), names and patterns (``names``), consistency
labels (``labels``) and time formatting (``timefmt``). Used by the agent, the
servers and the vault alike.
"""

"""The process server: the data plane between Mobility agents and the vault."""

"""The Mobility agent: runs on each protected machine and replicates its disks."""

AGENT_VERSION = "0.1.0"  # sent in HELLO on port 9443 and in heartbeats to the site listener

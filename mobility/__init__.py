"""The Mobility agent: runs on each protected machine and replicates its disks."""

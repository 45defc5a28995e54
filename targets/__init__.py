"""Failover targets: where a recovered machine runs.

One small driver per target behind the ``Target`` protocol of ``targets.base``:
``libvirt`` (a KVM/QEMU host), ``azure`` (page-blob VHDs and an ARM template),
``folder`` (images and a VM description in a directory). ``verify`` checks the
recovered disks (partition tables, read-only fsck) before a recovery is called
successful. Imports ``vault`` and ``common`` only: a site that lost its
configuration server can still recover a machine with the vault and its key.
"""

"""The vault: siterecovery's on-storage format and everything that reads or writes it.

This package imports nothing from ``configserver``, ``procserver`` or ``mobility``:
a site that lost its configuration server restores from the blob store and the
vault key alone.
"""

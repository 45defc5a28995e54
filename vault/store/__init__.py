"""Blob stores: the ``BlobStore`` protocol, its backends and the wrappers around them.

- ``protocol``: ``BlobStore``, ``BlobInfo`` and ``check_name`` (the contracts);
- backends, one per file: ``local`` (a folder), ``azure`` (Azure Blob), ``memory`` (tests);
- wrappers, each a ``StoreWrapper`` (``wrapper``) overriding only what it changes:
  ``retry``, ``limit`` (concurrency), ``instrument`` (Prometheus), ``throttle``
  (upload pacing), ``faults`` (injected faults, tests and drills);
- ``open``: ``open_store(url)``, the one place the wrappers are stacked.

Import from the module that defines a name; this package re-exports nothing, so that
opening a local vault never imports the Azure SDK.
"""

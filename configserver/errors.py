"""Domain errors of the configuration server.

Domain code (jobs, registration, items, certificates) raises these; it knows nothing
of HTTP. Each carries what an operator reads: a stable ``code``, a ``message`` saying
what failed and why, and a ``hint`` saying what to do. The REST layer
(``configserver/rest.py``) alone maps the classes to HTTP status codes; a subclass
answers with its base class's status.
"""

from __future__ import annotations


class DomainError(Exception):
    """Something the caller asked for cannot be done; ``code``/``message``/``hint``
    are shown to the operator as they are."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


class NotFound(DomainError):
    """The thing named does not exist."""


class Conflict(DomainError):
    """The request is valid but the current state forbids it (try again later, or
    change the state first)."""


class InvalidRequest(DomainError):
    """The request is well formed but its content cannot be accepted."""


class Unauthenticated(DomainError):
    """The caller did not prove who it is (a wrong passphrase)."""


class TooManyAttempts(DomainError):
    """Too many failed attempts from one caller: it must wait before trying again."""


class Refused(DomainError):
    """The request proves no right to what it asks (a forged or foreign key)."""


class Unavailable(DomainError):
    """A service this one depends on cannot be reached now; retrying may succeed."""


class ItemStateError(Conflict):
    """A job or replicated item is not in a state that allows the action."""


class RegistrationExpired(InvalidRequest):
    """The registration key's validity window has passed."""


class ClockSkew(Conflict):
    """This machine's clock differs too much from the reference clock."""

"""The declarative base every catalog table is declared on (``models.py``, and the
modules of tables of their own, such as ``planmodels.py``)."""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass

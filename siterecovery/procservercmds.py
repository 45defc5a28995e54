"""CLI verbs: process servers: list, show, refresh."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""


def register_under(psub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``list``, ``show``, ``refresh`` under the existing ``procserver`` command."""

"""``argparse`` types shared by verb modules (which do not import each other)."""

from __future__ import annotations

import argparse


def mbps(text: str) -> float:
    """A rate in Mbit/s: 0 (unlimited) or positive, at most 100000."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in Mbit/s (0: unlimited, "
                                         "e.g. 10 or 2.5)")
    return value


def seconds(text: str) -> int:
    """A whole number of seconds, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds from 1")
    return n


def wait_seconds(text: str) -> float:
    """How long to follow a job (``--timeout``): a number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0 "
                                         "(leave --timeout out to wait for the end)")
    return value

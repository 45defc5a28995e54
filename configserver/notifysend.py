"""Sending one notice: a signed JSON webhook or an email over SMTP with STARTTLS.

Both raise ``SendError`` (a message fit for the operator, never holding a secret) when
the notice was not accepted; the caller retries (configserver/notifydeliver.py).

Webhook: ``POST`` of the notice as JSON (UTF-8) with the headers

    X-Siterecovery-Event: alert_raised | alert_cleared | test
    X-Siterecovery-Delivery: the outbox row id (the same on every retry: deduplicate on it)
    X-Siterecovery-Timestamp: UNIX seconds when this attempt was signed
    X-Siterecovery-Signature: sha256=HEX(HMAC-SHA256(secret, timestamp + "." + body))

(the last one only if the channel has a secret). Any 2xx answer is delivery.

Email: plain-text mail from ``from`` to every address in ``to``; STARTTLS is required
unless the channel says ``starttls: false`` (then no login is allowed either); the
server's certificate is verified against the system's CAs or the channel's ``ca_file``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

import aiohttp
from yarl import URL

TIMEOUT_SECONDS = 15.0
USER_AGENT = "siterecovery-notify/1"


class SendError(Exception):
    """The notice was not accepted; ``str(e)`` says why (no secret in it)."""


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Siterecovery-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


async def send_webhook(settings: dict[str, Any], secret: bytes | None, delivery: str,
                       notice: dict[str, Any], now: float,
                       timeout: float = TIMEOUT_SECONDS) -> None:
    body = json.dumps(notice, sort_keys=True).encode()
    ts = str(int(now))
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "X-Siterecovery-Event": str(notice["event"]),
               "X-Siterecovery-Delivery": delivery, "X-Siterecovery-Timestamp": ts}
    if secret is not None:
        headers["X-Siterecovery-Signature"] = signature(secret, ts, body)
    url = settings["url"]
    where = _origin(url)  # errors are logged: a path may hold a token (Slack-style URLs)
    try:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.post(url, data=body, headers=headers, allow_redirects=False) as r:
            if not 200 <= r.status < 300:
                raise SendError(f"webhook {where} answered HTTP {r.status}")
    except (aiohttp.ClientError, ValueError) as e:
        detail = str(e).replace(url, where)
        raise SendError(f"webhook {where} unreachable: {type(e).__name__}: {detail}") from None
    except TimeoutError:
        raise SendError(f"webhook {where} did not answer within {timeout:g} s") from None


def _origin(url: str) -> str:
    """scheme://host:port of ``url``, nothing of its path, query or user info."""
    try:
        u = URL(url)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (ValueError, TypeError):
        return "(invalid URL)"


def subject(notice: dict[str, Any]) -> str:
    what = {"alert_raised": "RAISED", "alert_cleared": "cleared", "test": "test"}.get(
        str(notice["event"]), str(notice["event"]))
    return f"[siterecovery {notice['severity']}] {what}: {notice['code']} {notice['target']}"


def _mail(settings: dict[str, Any], notice: dict[str, Any]) -> EmailMessage:
    m = EmailMessage()
    m["From"] = settings["from"]
    m["To"] = ", ".join(settings["to"])
    m["Subject"] = subject(notice)
    m.set_content("\n".join([
        str(notice["message"]), "",
        f"event:    {notice['event']}", f"code:     {notice['code']}",
        f"target:   {notice['target']}", f"severity: {notice['severity']}",
        f"time:     {notice['time']}"]) + "\n")
    return m


def _send_mail_blocking(settings: dict[str, Any], password: bytes | None,
                        notice: dict[str, Any], timeout: float) -> None:
    host, port = settings["host"], int(settings["port"])
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo()
            if settings.get("starttls", True):
                ctx = ssl.create_default_context(cafile=settings.get("ca_file"))
                smtp.starttls(context=ctx)
                smtp.ehlo()
            if settings.get("username"):
                smtp.login(settings["username"], (password or b"").decode())
            smtp.send_message(_mail(settings, notice))
    except smtplib.SMTPAuthenticationError as e:
        raise SendError(f"SMTP {host}:{port} refused the login of "
                        f"{settings.get('username')!r} ({e.smtp_code})") from None
    except smtplib.SMTPNotSupportedError:
        raise SendError(f"SMTP {host}:{port} does not offer STARTTLS") from None
    except ssl.SSLError as e:
        raise SendError(f"SMTP {host}:{port}: TLS failed: {e.reason or e}") from None
    except (smtplib.SMTPException, OSError) as e:
        raise SendError(f"SMTP {host}:{port}: {type(e).__name__}: {e}") from None


async def send_email(settings: dict[str, Any], password: bytes | None,
                     notice: dict[str, Any], timeout: float = TIMEOUT_SECONDS) -> None:
    # smtplib blocks; a thread keeps the event loop (and the API) responsive.
    await asyncio.to_thread(_send_mail_blocking, settings, password, notice, timeout)

"""``serve --listen``: the replication listener's certificate holds the address agents
use, also when it changes after the first start (#12 item 13)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from cryptography import x509

from tests.helpers import Daemon


def _serve(data: Path, listen: str) -> Daemon:
    return Daemon(["serve", "--data-dir", str(data), "--admin-port", "0", "--site-port", "0",
                   "--listen", listen, "--metrics-port", "0"], "procserver_started")


async def _served_certificate(host: str, port: int) -> x509.Certificate:
    """The certificate the listener presents (the handshake needs no client certificate
    to get that far: TLS 1.3 sends the server's first)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    _reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der)


def _names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} | \
        set(san.get_values_for_type(x509.DNSName))


async def _start_and_read(data: Path, host: str) -> tuple[x509.Certificate, Daemon]:
    d = _serve(data, f"{host}:0")
    ready = await d.start()
    try:
        return await _served_certificate(host, int(str(ready["port"]))), d
    finally:
        await d.stop()


async def test_a_new_listen_address_gets_a_certificate_that_names_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, d1 = await _start_and_read(data, "127.0.0.1")
    assert _names(first) == {"127.0.0.1", "localhost"}
    assert d1.events("server_certificate_issued")[0]["reason"] == "missing"

    second, d2 = await _start_and_read(data, "127.0.0.2")  # the listen address changed
    assert _names(second) == {"127.0.0.1", "127.0.0.2", "localhost"}
    assert second.serial_number != first.serial_number
    assert d2.events("server_certificate_issued")[0]["reason"] == "names changed"

    third, d3 = await _start_and_read(data, "127.0.0.2")  # unchanged: the same certificate
    assert third.serial_number == second.serial_number
    assert not d3.events("server_certificate_issued")


async def test_a_certificate_that_does_not_match_its_key_is_issued_again(
        tmp_path: Path) -> None:
    """A crash between writing the certificate and its key leaves a pair that would fail
    every handshake: the next start issues a new one."""
    data = tmp_path / "data"
    first, _ = await _start_and_read(data, "127.0.0.1")
    tls = data / "procserver" / "tls"
    other = tmp_path / "other"
    await _start_and_read(other, "127.0.0.1")  # another installation's key
    (tls / "server.key").write_bytes((other / "procserver" / "tls" / "server.key").read_bytes())
    again, d = await _start_and_read(data, "127.0.0.1")
    assert again.serial_number != first.serial_number
    assert d.events("server_certificate_issued")[0]["reason"] == "key mismatch"

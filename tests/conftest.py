"""Fixtures: real PKI, real vaults on disk, real servers on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from procserver.server import ProcServer
from tests.helpers import Pki, make_pki, make_vault, proc_config, running_procserver


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def vault_at(tmp_path: Path) -> tuple[str, Path]:
    return await make_vault(tmp_path)


@pytest.fixture
async def procserver(tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]
                     ) -> AsyncIterator[ProcServer]:
    url, key = vault_at
    async with running_procserver(proc_config(tmp_path, pki, url, key)) as ps:
        yield ps


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: real backends must really run there."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) were skipped; in CI every test must "
                                "run (start the missing backend in tests/run.sh)", red=True)


@pytest.fixture(scope="session")
def azurite_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.backends import azurite

    with azurite(tmp_path_factory.mktemp("azurite")) as conn:
        yield conn

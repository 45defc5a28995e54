"""Fixtures: real PKI, real vaults on disk, real servers on loopback."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog

from configserver.config import ConfigServerConfig
from configserver.server import ConfigServer
from procserver.server import ProcServer
from siterecovery.apiclient import ApiClient
from tests.helpers import Pki, make_pki, make_vault, proc_config, running_procserver


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    """A test that runs the CLI in-process (``siterecovery.cli.main``) configures structlog
    onto its captured stdout; the tests after it must not log into that closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(autouse=True)
def _leak_hunt() -> Iterator[None]:
    """With SITERECOVERY_LEAK_HUNT=1 every test ends with a garbage collection, so an
    unclosed socket or transport is reported by the test that left it (run with
    PYTHONTRACEMALLOC=10 to see where it was made), not by whichever test the collector
    happens to run in."""
    yield
    if os.environ.get("SITERECOVERY_LEAK_HUNT"):
        gc.collect()


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


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server for the session (its base URL, without a database)."""
    from tests.backends import postgres

    with postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The configuration server's catalog: SQLite in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}"
    from tests.backends import fresh_database

    base: str = request.getfixturevalue("postgres_url")
    return await fresh_database(base)


@pytest.fixture
async def cs(tmp_path: Path, catalog_url: str) -> AsyncIterator[ConfigServer]:
    """A running configuration server (admin + site listeners on free ports), on SQLite and on
    PostgreSQL."""
    server = ConfigServer(ConfigServerConfig(data_dir=str(tmp_path / "cs"), listen_port=0,
                                             site_port=0, database_url=catalog_url))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api(cs: ConfigServer) -> AsyncIterator[ApiClient]:
    """The admin API client the CLI uses, against ``cs`` over real HTTP."""
    async with ApiClient(cs.url, cs.admin_token) as client:
        yield client


# Tests run on two workers (pytest-xdist; tests/run.sh), a module at a time: a module's
# tests share its module-scoped fixtures (a site, a booted VM) and some build on the one
# before. The modules that use what the machine has only one of run as one unit, on one
# worker, one test at a time: the libvirt daemon with its networks and domains, the
# emulated VMs, and the namespaced sshd (its veth holds the fixed 10.219.0.0/30 on the
# host). Found from what the test module uses, directly or through the tests' own helper
# modules. (A scheduler of our own: pytest 9 ignores the node ids xdist's loadgroup
# rewrites.)
HOST_HELPERS = frozenset({"tests.libvirtd", "tests.sshd", "tests.vmtarget", "tests.bootdisk"})


def _helpers_of(module: ModuleType) -> set[str]:
    names = set()
    for value in vars(module).values():
        name = (value.__name__ if isinstance(value, ModuleType)
                else getattr(value, "__module__", None))
        if isinstance(name, str) and name.startswith("tests.") and name != module.__name__:
            names.add(name)
    return names


@functools.cache
def uses_host(module_name: str) -> bool:
    """Whether test module ``module_name`` (imported here if it is not yet) uses one of
    ``HOST_HELPERS``."""
    if module_name in HOST_HELPERS:
        return True
    todo, seen = [module_name], {module_name}
    while todo:
        name = todo.pop()
        module = sys.modules.get(name) or importlib.import_module(name)
        for helper in _helpers_of(module) - seen:
            if helper in HOST_HELPERS:
                return True
            seen.add(helper)
            todo.append(helper)
    return False


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class ModuleScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """A module per work unit; every module on the machine's single resources in one."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            module = path.removesuffix(".py").replace("/", ".")
            return "host resources" if uses_host(module) else path

    return ModuleScheduling(config, log)

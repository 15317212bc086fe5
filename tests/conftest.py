from __future__ import annotations

from hypothesis import settings

# The first call of the fused kernel compiles it; timing belongs in benchmarks, not tests.
settings.register_profile("evoopt", deadline=None)
settings.load_profile("evoopt")

import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.models import save_family, smol_tiny, tiny_bert_config, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Converted models, splits and experts go to a per-session cache, not the user's."""
    previous = os.environ.get("EVOOPT_CACHE")
    os.environ["EVOOPT_CACHE"] = str(tmp_path_factory.getbasetemp() / "evoopt-cache")
    yield
    if previous is None:
        del os.environ["EVOOPT_CACHE"]
    else:
        os.environ["EVOOPT_CACHE"] = previous


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_family(tmp_path_factory.mktemp("llama"), tiny_llama_config(), experts=3, seed=0)


@pytest.fixture(scope="session")
def smol_tiny_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A tiny Llama family (2 layers) with SmolLM2's real tokenizer: [base, expert_0, expert_1]."""
    return smol_tiny(tmp_path_factory.mktemp("dfs-family"))


@pytest.fixture(scope="session")
def tied_llama_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_family(tmp_path_factory.mktemp("tied"), tiny_llama_config(tie_word_embeddings=True),
                       experts=2, seed=1)


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_family(tmp_path_factory.mktemp("bert"), tiny_bert_config(), experts=2, seed=2,
                       model_class="BertForSequenceClassification")


@pytest.fixture(scope="session")
def small_experts(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Real MiniLM experts on two VADER domains (400 training examples each): (ExpertSet, cache root).

    Tweets are mostly positive, NYT editorials mostly negative: each expert is worse on the other domain.
    """
    from evoopt.data.experts import build_setting
    from tests.helpers.small import SMALL

    # EVOOPT_TEST_EXPERTS: a folder to keep them in between runs (content-addressed, so always current)
    root = Path(os.environ.get("EVOOPT_TEST_EXPERTS") or tmp_path_factory.mktemp("experts"))
    return build_setting(SMALL, root=root, limit_train=400, multitask=False), root


@pytest.fixture(scope="module")
def reference(llama_family: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[torch.Tensor]]:
    """The tiny Evolver study (tests.helpers.evolver) run by one uninterrupted process: (history, population)."""
    from tests.helpers.evolver import GENERATIONS, population_after, tiny_study

    storage = f"sqlite:///{tmp_path_factory.mktemp('one')}/study.db"
    tiny_study(storage, [str(p) for p in llama_family], trials=15)
    return population_after(storage, [str(p) for p in llama_family], GENERATIONS)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster: initdb in a temporary folder, a free loopback port, stopped afterwards.

    Runs as the ``postgres`` system user when the tests run as root (the server refuses root).
    Yields ``postgresql://postgres@127.0.0.1:PORT`` (the URL form the README documents); see
    ``postgres_url`` for a database.
    """
    import glob
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)
    if found is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are needed: apt-get install postgresql")
    bindir = Path(found).parent
    root = Path(tempfile.mkdtemp(prefix="evoopt-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    run = lambda *args: subprocess.run([*prefix, *map(str, args)], check=True, capture_output=True)  # noqa: E731
    run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def postgres_url(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh database on the throwaway server, named after the test."""
    import re

    import sqlalchemy

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    engine = sqlalchemy.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server}/{name}"

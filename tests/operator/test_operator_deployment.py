"""docker/: Docker does not run here, so the compose file and the Dockerfile are checked as data."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import cli
from gateway.config import ENV_PREFIX, Settings

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
NSWGW = ("gateway", "worker")
ENV_DEFAULT = re.compile(r"\$\{(\w+):[?-][^}]*\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # also resolves the <<: merge keys
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def test_the_services(services: dict[str, Any]) -> None:
    assert {"rabbitmq", "postgres", "gateway", "worker"} <= set(services)
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["gateway"]["ports"] == ["8080:8080"]


def test_the_backing_services_have_real_health_checks(services: dict[str, Any]) -> None:
    assert services["rabbitmq"]["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for name in ("rabbitmq", "postgres", *NSWGW):
        check = services[name]["healthcheck"]
        assert check["retries"] >= 3
        assert check["interval"]


@pytest.mark.parametrize("name", NSWGW)
def test_gateway_and_workers_wait_for_healthy_backing_services(services: dict[str, Any], name: str) -> None:
    depends = services[name]["depends_on"]
    assert depends["rabbitmq"] == {"condition": "service_healthy"}
    assert depends["postgres"] == {"condition": "service_healthy"}
    assert depends["certs"] == {"condition": "service_completed_successfully"}


@pytest.mark.parametrize("name", NSWGW)
def test_the_environment_wires_them_to_rabbitmq_and_postgres(services: dict[str, Any], name: str) -> None:
    env = services[name]["environment"]
    amqp = urlsplit(ENV_DEFAULT.sub("secret", env["NSW_AMQP_URL"]))
    assert (amqp.scheme, amqp.hostname, amqp.port) == ("amqp", "rabbitmq", 5672)
    assert amqp.username == services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    database = urlsplit(ENV_DEFAULT.sub("secret", env["NSW_DATABASE_URL"]))
    assert (database.scheme, database.hostname, database.port) == ("postgresql", "postgres", 5432)
    pg = services["postgres"]["environment"]
    assert (database.username, database.path) == (pg["POSTGRES_USER"], "/" + pg["POSTGRES_DB"])
    # the same password variable on both sides, and no secret written into the file
    assert "${RABBITMQ_PASSWORD:?" in env["NSW_AMQP_URL"]
    assert "${RABBITMQ_PASSWORD:?" in services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"]
    assert "${POSTGRES_PASSWORD:?" in env["NSW_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in pg["POSTGRES_PASSWORD"]
    assert env["NSW_OPERATOR_TOKEN"].startswith("${NSW_OPERATOR_TOKEN:?")
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    assert set(env) <= known, f"not a setting: {set(env) - known}"


def test_the_commands_are_nswgw_subcommands(services: dict[str, Any]) -> None:
    parser = cli.build_parser()
    serve = parser.parse_args(services["gateway"]["command"])
    assert serve.func is cli.cmd_serve
    worker = parser.parse_args(services["worker"]["command"])
    assert worker.func is cli.cmd_worker
    assert worker.metrics_port == 9100
    assert "9100/livez" in json.dumps(services["worker"]["healthcheck"]["test"])
    assert "8080/readyz" in json.dumps(services["gateway"]["healthcheck"]["test"])
    certs = services["certs"]
    assert certs["entrypoint"] == ["sh", "-c"]
    init = shlex.split(certs["command"][0].split("||")[1])
    assert init[0] == "nswgw"
    assert parser.parse_args(init[1:]).func is cli.cmd_certs_init


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_the_image_is_slim_python_non_root_with_nswgw_as_entry_point() -> None:
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    stages = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    final = steps[stages[-1] :]
    assert all(rest.split()[0] == "python:3.11-slim" for keyword, rest in steps if keyword == "FROM")
    assert any(k == "RUN" and re.search(r"pip install .*\"\.\[postgres\]\"", rest) for k, rest in steps)

    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}
    last_user = max(i for i, (keyword, _) in enumerate(final) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in final[last_user:]), "nothing may run as root after USER"

    entrypoint = [json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoint == [["nswgw"]]
    scripts = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["nswgw"] == "gateway.cli:main"


def test_the_build_context_keeps_keys_out() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "**"  # an allow-list: everything is excluded first
    assert "certs/dev/" in ignore
    copied = [rest.split()[0] for keyword, rest in _instructions(DOCKERFILE.read_text()) if keyword == "COPY"]
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {c for c in copied if not c.startswith("--")} <= allowed | {"pyproject.toml"}

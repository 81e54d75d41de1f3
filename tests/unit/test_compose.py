"""compose.yaml against the Compose Specification JSON schema (no Docker engine runs here), plus the
promises the README makes about it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

from api.cli.up import gunicorn_args

ROOT = Path(__file__).resolve().parents[2]


def load() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_spec() -> None:
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    doc = load()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_shape() -> None:
    services = load()["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "beat", "flower"} <= set(services)
    for name in ("postgres", "redis", "api", "worker", "flower"):
        assert "healthcheck" in services[name], name
    # Scalable worker: no fixed name, no host port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert (ROOT / "Dockerfile").exists() and services["api"]["build"] == "."
    # The API runs the one server model (api/gunicorn_conf.py), as `envclone up` and the image do.
    assert services["api"]["command"] == ["gunicorn", *gunicorn_args("0.0.0.0:8000")]
    assert f'CMD {json.dumps(["gunicorn", *gunicorn_args("0.0.0.0:8000")])}' in (ROOT / "Dockerfile").read_text()


def test_redis_wants_a_password_and_every_envclone_service_has_it() -> None:
    services = load()["services"]
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")  # compose refuses to start without
    start = " ".join(redis["command"])
    # The password reaches redis-server through a config file written from the container's environment.
    assert "requirepass" in start and '"$$REDIS_PASSWORD"' in start and "redis-server /etc/redis-auth.conf" in start
    assert "REDISCLI_AUTH=" in " ".join(redis["healthcheck"]["test"])  # the health check authenticates
    envclone = [name for name, svc in services.items() if svc.get("build") == "."]
    assert set(envclone) == {"migrate", "api", "worker", "agent", "beat", "flower"}
    for name in envclone:
        url = services[name]["environment"]["ENVCLONE_BROKER_URL"]
        assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("}@redis:6379/0"), (name, url)


def test_no_secret_on_a_command_line() -> None:
    """ps shows every command line: secrets go through the environment, as compose interpolates them."""
    for name, svc in load()["services"].items():
        command = " ".join(svc.get("command", []))
        assert not re.search(r"\$\{\w*(PASSWORD|SECRET|TOKEN|AUTH)", command), (name, command)


def test_no_secret_is_written_in_the_file() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for line in text.splitlines():
        if not line.lstrip().startswith("#") and re.search(r"(PASSWORD|SECRET|TOKEN|AUTH)[^:]*:\s*\S", line) \
                and "${" not in line:
            raise AssertionError(f"literal secret in compose.yaml: {line.strip()}")


def test_agents_and_general_workers() -> None:
    """A host machine runs an agent (its own name, volume, pool, the cluster secret); general workers
    scale and never act as an agent."""
    services = load()["services"]
    agent, worker = services["agent"], services["worker"]
    assert agent["command"][:3] == ["envclone", "agent", "--host"] and "--address-pool" in agent["command"]
    assert "agent-data:/var/lib/envclone" in agent["volumes"]
    assert agent["environment"]["ENVCLONE_CLUSTER_SECRET"].startswith("${CLUSTER_SECRET:?")
    assert worker["environment"]["ENVCLONE_AGENT"] == "false" and "-Q" not in worker["command"]
    assert "agent-data" in load()["volumes"]

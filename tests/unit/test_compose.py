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
    assert any("--basic-auth=${FLOWER_BASIC_AUTH" in part for part in services["flower"]["command"])
    assert (ROOT / "Dockerfile").exists() and services["api"]["build"] == "."
    # The API runs the one server model (api/gunicorn_conf.py), as `envclone up` and the image do.
    assert services["api"]["command"] == ["gunicorn", *gunicorn_args("0.0.0.0:8000")]
    assert f'CMD {json.dumps(["gunicorn", *gunicorn_args("0.0.0.0:8000")])}' in (ROOT / "Dockerfile").read_text()


def test_no_secret_is_written_in_the_file() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for line in text.splitlines():
        if not line.lstrip().startswith("#") and re.search(r"(PASSWORD|SECRET|TOKEN|AUTH)[^:]*:\s*\S", line) \
                and "${" not in line:
            raise AssertionError(f"literal secret in compose.yaml: {line.strip()}")

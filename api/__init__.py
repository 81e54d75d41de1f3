"""The thin Flask API: validate, authorise, write the job in one transaction, enqueue. It never
waits on a worker."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import Info, OpenAPI

from api import body, errors
from api.stream_hub import Hub
from api.streams import StreamLimiter
from shared.config import get_settings
from workers.celery_app import Role, make_celery


def create_app() -> OpenAPI:
    app = OpenAPI(
        __name__,
        info=Info(title="envclone", version="0.1.0",
                  description="Clone live multi-node environments: consistent snapshots, new addresses."),
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        validation_error_status=422,
        validation_error_callback=errors.validation_error,
        doc_prefix="/docs",
    )
    body.install(app)
    app.json.sort_keys = False
    errors.register(app)

    from api.routes import environments, health, hosts, jobs

    app.register_api(health.bp)
    app.register_api(environments.bp)
    app.register_api(jobs.bp)
    app.register_api(hosts.bp)

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> Response:
        return jsonify(app.api_doc)

    settings = get_settings()  # fail at start, not at the first request, on bad configuration
    app.extensions["celery"] = make_celery(Role.PUBLISHER)
    app.extensions["stream_hub"] = Hub()
    app.extensions["streams"] = StreamLimiter(settings.broker_url, settings.max_streams_per_tenant,
                                              settings.max_stream_s, settings.api_threads)
    return app

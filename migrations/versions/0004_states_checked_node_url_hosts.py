"""states checked against their enums, node url and size, canvas run, hosts

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

from shared.states import EnvState, HostState, JobState, NodeState, SnapshotState, Step, StepState

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# (table, column, enum, constraint name): the same names the models give their enum columns.
CHECKS = [
    ("environments", "state", EnvState, "ck_environment_state"),
    ("nodes", "state", NodeState, "ck_node_state"),
    ("clone_jobs", "state", JobState, "ck_job_state"),
    ("step_runs", "step", Step, "ck_step_run_step"),
    ("step_runs", "state", StepState, "ck_step_run_state"),
    ("snapshots", "state", SnapshotState, "ck_snapshot_state"),
]


def upgrade() -> None:
    for table, column, enum, name in CHECKS:
        with op.batch_alter_table(table) as batch_op:
            batch_op.create_check_constraint(name, sa.column(column).in_([m.value for m in enum]))
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.add_column(sa.Column('url', sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column('size_bytes', sa.BigInteger(), nullable=False, server_default='0'))
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.add_column(sa.Column('canvas_run', sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'hosts',
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('reflink', sa.Boolean(), nullable=False),
        sa.Column('free_bytes', sa.BigInteger(), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
        sa.CheckConstraint(sa.column('state').in_([m.value for m in HostState]), name='ck_host_state'),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('hosts')
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.drop_column('canvas_run')
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.drop_column('size_bytes')
        batch_op.drop_column('url')
    for table, _column, _enum, name in reversed(CHECKS):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(name, type_='check')

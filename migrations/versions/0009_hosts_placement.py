"""hosts: every node belongs to a host; steps and snapshots record theirs; hosts report their pool

Revision ID: 0009
Revises: 0008
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nodes made before hosts existed live on the one host there was: "local" (the default name).
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.add_column(sa.Column('host', sa.String(63), nullable=False, server_default='local'))
        batch_op.create_index('ix_nodes_host', ['host'])
    # ...unless that one host had another name (ENVCLONE_HOST_NAME): then its nodes are its.
    op.execute("UPDATE nodes SET host = (SELECT name FROM hosts) WHERE (SELECT count(*) FROM hosts) = 1")
    with op.batch_alter_table('step_runs') as batch_op:
        batch_op.add_column(sa.Column('host', sa.String(63), nullable=True))
    with op.batch_alter_table('snapshots') as batch_op:
        batch_op.add_column(sa.Column('host', sa.String(63), nullable=True))
    with op.batch_alter_table('hosts') as batch_op:
        batch_op.add_column(sa.Column('address_pool', sa.String(64), nullable=True))
        batch_op.add_column(sa.Column('transfer_url', sa.String(256), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('hosts') as batch_op:
        batch_op.drop_column('started_at')
        batch_op.drop_column('transfer_url')
        batch_op.drop_column('address_pool')
    with op.batch_alter_table('snapshots') as batch_op:
        batch_op.drop_column('host')
    with op.batch_alter_table('step_runs') as batch_op:
        batch_op.drop_column('host')
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.drop_index('ix_nodes_host')
        batch_op.drop_column('host')

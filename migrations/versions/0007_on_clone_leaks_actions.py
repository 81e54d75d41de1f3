"""environment on_clone actions; a job's leaks and actions

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('environments') as batch_op:
        batch_op.add_column(sa.Column('on_clone', sa.JSON(), nullable=False, server_default='[]'))
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.add_column(sa.Column('leaks', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('actions', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.drop_column('actions')
        batch_op.drop_column('leaks')
    with op.batch_alter_table('environments') as batch_op:
        batch_op.drop_column('on_clone')

"""a job's masking rules run (rows masked per rule)

Revision ID: 0008
Revises: 0007
"""
from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.add_column(sa.Column('masked', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('clone_jobs') as batch_op:
        batch_op.drop_column('masked')

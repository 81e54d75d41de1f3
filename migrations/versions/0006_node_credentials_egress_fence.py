"""node credentials, environment egress and fence

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.add_column(sa.Column('credentials', sa.JSON(), nullable=False, server_default='{}'))
    with op.batch_alter_table('environments') as batch_op:
        batch_op.add_column(sa.Column('egress', sa.JSON(), nullable=False, server_default='[]'))
        batch_op.add_column(sa.Column('fence', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('environments') as batch_op:
        batch_op.drop_column('fence')
        batch_op.drop_column('egress')
    with op.batch_alter_table('nodes') as batch_op:
        batch_op.drop_column('credentials')

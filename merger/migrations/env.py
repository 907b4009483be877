"""Alembic's environment, configured in code by ``merger.migrations`` (no alembic.ini): the connection
to migrate is handed over in ``config.attributes["connection"]``."""

from alembic import context

from merger.db import Base

context.configure(connection=context.config.attributes["connection"], target_metadata=Base.metadata,
                  render_as_batch=True)  # SQLite alters a table by copying it
with context.begin_transaction():
    context.run_migrations()

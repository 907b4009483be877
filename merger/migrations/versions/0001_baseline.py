"""The schema of the first release (what ``Base.metadata.create_all`` made before migrations existed).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(64), primary_key=True, comment="sha256 of the file manifest"),
        sa.Column("name", sa.String(200), index=True),
        sa.Column("kind", sa.String(20), nullable=False, comment="model | adapter"),
        sa.Column("location", sa.String(4096), comment="external directory; NULL = in the store"),
        sa.Column("architecture", sa.String(200)),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recipe", sa.JSON, comment="normalized stage recipe that produced it"),
        sa.Column("recipe_digest", sa.String(64)),
        sa.Column("versions", sa.JSON),
        sa.Column("origin", sa.JSON, comment="where an imported model came from"),
        sa.Column("public", sa.Boolean, nullable=False, comment="visible to every user of the service"),
    )
    op.create_table(
        "model_files",
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_table(
        "edges",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("child_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("parent_id", sa.String(64), sa.ForeignKey("models.id"), nullable=False, index=True),
        sa.Column("relation", sa.String(20), nullable=False, comment="merge | adapter | quantized | finetune"),
        sa.Column("role", sa.String(20), nullable=False, comment="base | donor | adapter"),
        sa.Column("weight", sa.Float),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("details", sa.JSON),
    )
    op.create_table(
        "recipe_cache",
        sa.Column("key", sa.String(64), primary_key=True, comment="sha256 of stage recipe + input ids + versions"),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("stage", sa.String(200), nullable=False),
        sa.Column("cache_key", sa.String(64), nullable=False, index=True),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
        sa.Column("cache_hit", sa.Boolean, nullable=False),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "evaluations",
        sa.Column("cache_key", sa.String(64), primary_key=True,
                  comment="sha256 of model id, metric, data, settings, runtime, versions"),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("metric", sa.String(40), nullable=False, comment="perplexity | task_accuracy | multiple_choice | lm_eval"),
        sa.Column("dataset", sa.String(1024), nullable=False, comment="the data file as given (a label)"),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("limit", sa.Integer),
        sa.Column("settings", sa.JSON, nullable=False, comment="everything else that shapes the value: window, dtype"),
        sa.Column("runtime", sa.String(40), nullable=False, comment="transformers | transformers-gguf | llama.cpp"),
        sa.Column("values", sa.JSON, nullable=False),
        sa.Column("tokens_per_second", sa.Float),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("sha256", sa.String(64), primary_key=True, comment="tokens are stored hashed"),
        sa.Column("user", sa.String(100), sa.ForeignKey("users.name", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_grants",
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user", sa.String(100), sa.ForeignKey("users.name", ondelete="CASCADE"), primary_key=True),
        sa.Column("owner", sa.Boolean, nullable=False, comment="may change the model's visibility"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(100), sa.ForeignKey("users.name"), nullable=False, index=True),
        sa.Column("state", sa.String(20), nullable=False, index=True,
                  comment="queued | running | succeeded | failed | cancelled"),
        sa.Column("recipe", sa.JSON, nullable=False),
        sa.Column("recipe_name", sa.String(200), nullable=False),
        sa.Column("force", sa.Boolean, nullable=False),
        sa.Column("queue", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("stage", sa.String(200)),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("model_id", sa.String(64), sa.ForeignKey("models.id")),
        sa.Column("error_code", sa.String(40)),
        sa.Column("error_message", sa.String(4000)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("lease_until", sa.DateTime(timezone=True), comment="database lease (no Redis)"),
    )


def downgrade() -> None:
    for table in ("jobs", "model_grants", "tokens", "users", "evaluations", "runs", "recipe_cache", "edges", "model_files", "models"):
        op.drop_table(table)

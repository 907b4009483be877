"""merger: declarative model merging and adapter composition with content-hashed lineage."""

__version__ = "0.1.0"

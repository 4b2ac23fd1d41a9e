"""Stream-ingest pipeline for database user activity: API -> broker -> pipeline -> warehouse."""

__version__ = "0.1.0"

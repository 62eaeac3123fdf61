"""Database: SQLAlchemy 2 tables (``models``), engine/session (``session``), queries (``crud``)."""

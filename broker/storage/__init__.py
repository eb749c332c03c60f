"""SQLAlchemy models and queries; functions here flush, never commit."""

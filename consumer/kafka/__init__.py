"""Kafka I/O: client configuration, topic admin, and the local broker for development and tests."""

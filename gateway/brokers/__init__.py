"""Broker backends behind one Protocol: RabbitMQ (production) and embedded SQLite (default)."""

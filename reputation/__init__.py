"""Reputation: what verifiers found out about servers, signed and shared.

* score.py   - Beta reputation with exponential forgetting, probation and bans.
* store.py   - a verifier's history (SQLAlchemy; SQLite by default; restart-safe).
* tables.py  - its tables; engine.py - opening the database, row locks for concurrent
               writers (PostgreSQL: SELECT ... FOR UPDATE; SQLite: BEGIN IMMEDIATE).
* records.py - signed reputation records, their DHT key and DHT validator, the topic.
* gossip.py  - gossipsub on a host, the record topic's validator, following the topic.
* publish.py - RecordPublisher: DHT put + gossipsub publish, paced.
* cli.py     - `trustswarm reputation show`.

Depends on protocol/ only; node/, client/ and verifier/ build on it.
"""

"""One writer process for tests/test_reputation_store_concurrency.py (run as a script).

usage: store_writer.py URL KEY_FILE PEER MODEL THREADS ROUNDS

Opens its own ReputationStore (and refusal ledger) on URL, prints "ready", waits for a
line on stdin, then THREADS threads each do ROUNDS times: one check of PEER (passes and
failures alternate, all at the same instant so weights add up exactly), one refusal, one
sequence number and one published record carrying it. Prints the sequence numbers it got
as JSON on its last line.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from trustswarm.protocol.identity import Identity
from trustswarm.reputation.records import ReputationRecord, sign_record
from trustswarm.reputation.refusals import RefusalLedger
from trustswarm.reputation.score import OK
from trustswarm.reputation.store import ReputationStore

AT = 1_000_000.0  # every write at one instant: no decay between them


def record(identity: Identity, subject: str, model: str, sequence: int) -> ReputationRecord:
    now = time.time()
    return ReputationRecord(
        verifier_id=str(identity.peer_id),
        subject=subject,
        model_id=model,
        start=0,
        end=4,
        score=0.5,
        state=OK,
        passes=1,
        failures=0,
        issued_at=now,
        expires_at=now + 600,
        sequence=sequence,
    )


def main(argv: list[str]) -> int:
    url, key_file, peer, model = argv[:4]
    threads, rounds = int(argv[4]), int(argv[5])
    identity = Identity.load_or_create(key_file)
    store = ReputationStore(url)
    ledger = RefusalLedger(store.engine, store.model)
    sequences: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(rounds):
                store.record_check(peer, model, 0, 4, "forward", i % 2 == 0, "x", at=AT)
                ledger.record(peer, model, "busy", at=AT)
                sequence = store.next_sequence()
                sequences.append(sequence)
                store.save_published(sign_record(identity, record(identity, peer, model, sequence)))
        except BaseException as exc:  # reported to the test, which fails on it
            errors.append(exc)

    print("ready", flush=True)
    sys.stdin.readline()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    store.close()
    if errors:
        print(f"error: {errors[0]!r}", file=sys.stderr)
        return 1
    print(json.dumps(sequences), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

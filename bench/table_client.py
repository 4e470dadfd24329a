"""One client of the concurrent-clients row: `python bench/table_client.py JSON_SPEC`.

Connects to the swarm, warms up, prints {"ready": true}; then for each JSON line
{"column": ..., "seed": ...} on stdin measures that column (bench/table_measure.py) and
prints {"values": [...], "spans": [[start, end, units], ...]} (one per repeat,
time.monotonic(), the same clock in every process). Exits at EOF. Errors are printed as {"error": ...}.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    import torch
    from table_measure import Workload

    from trustswarm.client import DistributedModelForCausalLM

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    workload = Workload(**spec["workload"])
    try:
        model = DistributedModelForCausalLM.from_pretrained(
            spec["model_dir"],
            spec["peers"],
            redundancy=spec.get("redundancy", 1),
            request_timeout=spec.get("request_timeout", 30.0),
        )
    except Exception as exc:
        print(json.dumps({"error": f"cannot join the swarm: {exc}"}), flush=True)
        return 1
    vocab = model.config.vocab_size
    with model:
        from table_measure import inference_steps_per_s

        inference_steps_per_s(model, 8, 2, 1, vocab)  # warm-up: sessions, routes, RTTs
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            spans: list[tuple[float, float, int]] = []
            try:
                values = workload.measure(
                    model, request["column"], vocab, request["seed"], spans=spans
                )
            except Exception as exc:
                print(json.dumps({"error": repr(exc)}), flush=True)
                continue
            print(json.dumps({"values": values, "spans": spans}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

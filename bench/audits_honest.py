"""Honest servers under client audits (issue 11): float32 and bfloat16 servers, every
exchange audited, none penalised.

    python bench/audits_honest.py [--model-dir DIR] [--audits 1000] [--max-minutes 30]

Real SmolLM2-135M (by default) and a real swarm on loopback in this process
(trustswarm.testing.local_swarm): blocks 0:15 and 15:30, each span served by one float32
and one bfloat16 server. One real verifier with spot-checks off (one per hour) and its
audit quota lifted, so every verdict comes from audits. Clients with audit_rate=1 and
redundancy 1 and 2 take turns; each round is a greedy generation of a chat prompt (one
inference session per hop and replica), a forward pass with labels and its backward
(fine-tuning traffic), with the routes reshuffled over both dtypes. Rounds go on until
the verifier has judged `--audits` audits. Writes bench/results/audits_honest.{md,json}:
verdicts per server, dtype and kind, and every server's failures and state at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trustswarm.client import DistributedModelForCausalLM  # noqa: E402
from trustswarm.demo import DEFAULT_MODEL_DIR, chat_ids, ensure_model  # noqa: E402
from trustswarm.testing.local_swarm import LocalSwarm, RunningServer  # noqa: E402
from trustswarm.testing.local_verifier import (  # noqa: E402
    RunningVerifier,
    start_verifier,
    stop_verifier,
    wait_until,
)
from trustswarm.verifier.config import AuditConfig, CheckConfig, VerifierConfig  # noqa: E402

QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "How does a refrigerator work?",
    "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Translate 'good morning' into Spanish and German.",
    "What should I pack for a weekend hiking trip?",
    "Explain recursion to a ten-year-old.",
)
SPANS = ((0, 15), (15, 30))
TINY_SPANS = ((0, 3), (3, 6))


def question_ids(tokenizer, i: int) -> torch.Tensor:  # noqa: ANN001
    if tokenizer is None:  # the tiny model has no tokenizer: random prompts
        g = torch.Generator().manual_seed(i)
        return torch.randint(3, 512, (1, 4 + i % 9), generator=g)
    return chat_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)])


def one_round(client, tokenizer, rng: random.Random, i: int) -> None:  # noqa: ANN001
    """A generation, a forward with labels and its backward, on reshuffled routes."""
    for peer in client.swarm.view.rtts:  # vary the routes over both dtypes
        client.swarm.view.rtts[peer] = rng.random()
    ids = question_ids(tokenizer, i)
    client.generate(ids, max_new_tokens=rng.randint(4, 12), do_sample=False)
    embeds = client.get_input_embeddings()(ids).detach().requires_grad_()
    client(inputs_embeds=embeds, labels=ids).loss.backward()


def run(args: argparse.Namespace, swarm: LocalSwarm, verifier: RunningVerifier) -> dict:
    from transformers import AutoTokenizer

    tokenizer = None if args.tiny else AutoTokenizer.from_pretrained(args.model_dir)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + 60 * args.max_minutes
    stats: Counter[str] = Counter()
    rounds = 0
    while len(verifier.verifier.audits.results) < args.audits and time.monotonic() < deadline:
        k = 1 + rounds // args.rounds_per_client % 2  # redundancy 1, then 2, then 1 ...
        with DistributedModelForCausalLM.from_pretrained(
            args.model_dir, swarm.initial_peers, trusted_verifiers=[verifier.addrs[0]],
            audit_rate=1.0, redundancy=k, request_timeout=120,
        ) as client:  # fmt: skip
            wait_until(lambda c=client: len(c.swarm.view.servers) == 4, timeout=60)
            for _ in range(args.rounds_per_client):
                try:
                    one_round(client, tokenizer, rng, rounds)
                except Exception as exc:  # e.g. no majority between two honest replicas
                    stats["client_errors"] += 1
                    print(f"round {rounds + 1} failed: {type(exc).__name__}: {exc}", flush=True)
                rounds += 1
                print(f"round {rounds} (k={k}): {len(verifier.verifier.audits.results)} "
                      f"audits judged", flush=True)  # fmt: skip
            wait_until(lambda c=client: c.swarm.auditor.pending == 0, timeout=600)
            for name, value in vars(client.swarm.auditor.stats).items():
                stats[name] += value
    wait_until(lambda: len(verifier.verifier.audits.results) >= stats["accepted"], timeout=900)
    return {"rounds": rounds, "client_audit_stats": dict(stats)}


def summary(swarm: LocalSwarm, verifier: RunningVerifier, servers: list[RunningServer]) -> dict:
    results = list(verifier.verifier.audits.results)
    dtype_of = {s.peer_id: str(s.server.runner.dtype).removeprefix("torch.") for s in servers}
    rows = []
    for s in servers:
        rep = verifier.store.get(s.peer_id, verifier.verifier.model_id)
        mine = [r for r in results if r.peer_id == s.peer_id]
        rows.append(
            {
                "server": s.peer_id,
                "span": f"{s.server.runner.start}:{s.server.runner.end}",
                "dtype": dtype_of[s.peer_id],
                "audits": len(mine),
                "outcomes": dict(Counter(r.outcome for r in mine)),
                "kinds": dict(Counter(r.kind for r in mine)),
                "passes": rep.passes if rep else 0,
                "failures": rep.failures if rep else 0,
                "state": rep.state if rep else "unknown",
            }
        )
    penalised = [r for r in rows if r["failures"] or r["state"] == "banned"]
    bad = [r for r in results if r.outcome in ("fail", "fraud")]
    return {
        "audits_judged": len(results),
        "outcomes": dict(Counter(r.outcome for r in results)),
        "kinds": dict(Counter(r.kind for r in results)),
        "servers": rows,
        "honest_penalised": len(penalised),
        "bad_verdicts": [r.detail[:200] for r in bad][:10],
        "verifier_cpu_seconds": sum(r.cpu_seconds for r in results),
    }


def markdown(data: dict) -> str:
    s = data["summary"]
    lines = [
        "# Honest servers under client audits (bench/audits_honest.py)",
        "",
        f"{data['model']}, blocks {data['spans']}, each served by a float32 and a bfloat16 "
        "server (real hosts on loopback, one process); one real verifier, spot-checks off; "
        f"clients with audit_rate=1, redundancy 1 and 2; {data['rounds']} rounds of a greedy "
        "generation + a forward/backward with labels on reshuffled routes. "
        f"{data['minutes']:.1f} min, load average {data['load']} at the end.",
        "",
        f"**{'PASS' if s['honest_penalised'] == 0 and s['audits_judged'] >= data['target'] else 'FAIL'}: "
        f"{s['audits_judged']} audits judged ({s['outcomes']}; kinds {s['kinds']}); honest "
        f"servers penalised: {s['honest_penalised']}/4**",
        "",
        "| server | span | dtype | audits | verdicts | kinds | passes | failures | state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in s["servers"]:
        lines.append(
            f"| {r['server'][-8:]} | {r['span']} | {r['dtype']} | {r['audits']} | "
            f"{r['outcomes']} | {r['kinds']} | {r['passes']} | {r['failures']} | "
            f"{r['state']} |"
        )
    lines += [
        "",
        f"Client side: {data['client_audit_stats']}. Verifier CPU judging audits: "
        f"{s['verifier_cpu_seconds']:.0f} s. 'inconclusive' verdicts (ill-conditioned tokens, "
        "DESIGN-NOTES) count as neither pass nor failure.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--audits", type=int, default=1000)
    parser.add_argument("--rounds-per-client", type=int, default=10)
    parser.add_argument("--max-minutes", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tiny", action="store_true", help="the tiny random 6-block Llama")
    args = parser.parse_args()
    if args.tiny:
        from trustswarm.testing.tiny_model import make_tiny_model_dir

        args.model_dir = make_tiny_model_dir(Path(tempfile.mkdtemp(prefix="ts-tiny-")))
    else:
        ensure_model(args.model_dir)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    swarm = LocalSwarm(args.model_dir)
    verifier = None
    try:
        servers = [
            swarm.start_server(span, dtype=dtype)
            for span in (TINY_SPANS if args.tiny else SPANS)
            for dtype in (torch.float32, torch.bfloat16)
        ]
        config = VerifierConfig(
            checks=CheckConfig(check_every=3600.0),
            audits=AuditConfig(max_per_window=1_000_000, compute_share=1.0, queue_items=4096),
        )
        db = Path(tempfile.mkdtemp(prefix="ts-audits-honest-")) / "verifier.db"
        verifier = start_verifier(swarm, f"sqlite:///{db}", config)
        data = run(args, swarm, verifier)
        data["summary"] = summary(swarm, verifier, servers)
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()
    data |= {
        "target": args.audits,
        "spans": " and ".join(f"{a}:{b}" for a, b in (TINY_SPANS if args.tiny else SPANS)),
        "minutes": (time.monotonic() - began) / 60,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "audits_honest_tiny" if args.tiny else "audits_honest"
    data["model"] = "tiny random 6-block Llama" if args.tiny else "SmolLM2-135M"
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    text = markdown(data)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0 if data["summary"]["honest_penalised"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

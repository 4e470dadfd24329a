"""`trustswarm api` with the official `openai` client: a real loopback swarm of the real
SmolLM2 (3 servers x 10 blocks), the Starlette app under a real uvicorn server on
127.0.0.1, and property tests of the request validation (never a 500)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from trustswarm.api.app import Served, api_app
from trustswarm.api.errors import APIError
from trustswarm.api.schemas import Limits, parse_body, parse_chat, parse_completion
from trustswarm.api.text import StopText
from trustswarm.client import DistributedModelForCausalLM
from trustswarm.demo import chat_ids
from trustswarm.testing.local_swarm import LocalSwarm
from trustswarm.testing.local_verifier import start_verifier, stop_verifier, wait_until
from trustswarm.verifier.config import CheckConfig, VerifierConfig

SPANS = [(0, 10), (10, 20), (20, 30)]
TOKENS = 8  # max_tokens of most requests: keeps the file well under 90 s on 2 cores


def openai_client(port: int) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=120,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


def raw_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """A plain HTTP request (for bodies the openai client would never send)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@dataclass
class Api:
    swarm: LocalSwarm
    model: DistributedModelForCausalLM
    tokenizer: object
    port: int
    model_id: str

    def client(self) -> openai.OpenAI:
        return openai_client(self.port)

    def raw(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        return raw_request(self.port, method, path, body)

    def active_sessions(self) -> int:
        return sum(s.server.ctx.active_sessions for s in self.swarm.servers)


@contextmanager
def serving(served: Served) -> Iterator[int]:
    """The app under a real uvicorn server on 127.0.0.1 (a free port) in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(api_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, every=0.05)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def api(real_model_dir: Path) -> Iterator[Api]:
    swarm = LocalSwarm(real_model_dir)
    try:
        for span in SPANS:
            swarm.start_server(span)
        tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
        with DistributedModelForCausalLM.from_pretrained(
            real_model_dir, swarm.initial_peers
        ) as model:
            served = Served(model, tokenizer, Limits(vocab_size=model.config.vocab_size))
            with serving(served) as port:
                yield Api(swarm, model, tokenizer, port, served.model_id)
    finally:
        swarm.close()


def local_greedy(hf_model, tokenizer, ids: torch.Tensor, tokens: int = TOKENS) -> str:  # noqa: ANN001
    with torch.inference_mode():
        out = hf_model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def chat(api: Api, prompt: str, **kwargs: object):  # noqa: ANN201
    kwargs.setdefault("max_tokens", TOKENS)
    kwargs.setdefault("temperature", 0)
    return api.client().chat.completions.create(
        model=api.model_id, messages=[{"role": "user", "content": prompt}], **kwargs
    )


def streamed_text(stream) -> tuple[str, list]:  # noqa: ANN001
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def check_trust(api: Api, facts: dict) -> None:
    peers = {s.peer_id for s in api.swarm.servers}
    assert facts["redundancy"] == 1
    assert [(s["start"], s["end"]) for s in facts["spans"]] == SPANS
    assert all(len(s["servers"]) == 1 and set(s["servers"]) <= peers for s in facts["spans"])
    assert facts["disagreements"] == []
    assert facts["audits"]["drawn"] == 0  # no verifier: nothing is audited


# -- the real swarm ----------------------------------------------------------------------


@pytest.mark.real_model
def test_models_lists_the_served_model(api: Api) -> None:
    models = api.client().models.list()
    assert [m.id for m in models.data] == [api.model_id]
    assert api.client().models.retrieve(api.model_id).id == api.model_id


@pytest.mark.real_model
def test_chat_greedy_equals_local_model_streamed_and_not(api: Api, real_hf_model) -> None:
    prompt = "Name three primary colors."
    expected = local_greedy(real_hf_model, api.tokenizer, chat_ids(api.tokenizer, prompt))
    answer = chat(api, prompt)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.prompt_tokens == chat_ids(api.tokenizer, prompt).shape[1]
    assert 1 <= answer.usage.completion_tokens <= TOKENS
    check_trust(api, answer.model_extra["trustswarm"])

    stream = chat(api, prompt, stream=True, stream_options={"include_usage": True})
    text, chunks = streamed_text(stream)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == answer.choices[0].finish_reason
    check_trust(api, last.model_extra["trustswarm"])
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


@pytest.mark.real_model
def test_text_completion_equals_local_model(api: Api, real_hf_model) -> None:
    prompt = "The capital of France is"
    ids = torch.tensor([api.tokenizer(prompt)["input_ids"]])
    expected = local_greedy(real_hf_model, api.tokenizer, ids, 8)
    client = api.client()
    answer = client.completions.create(
        model=api.model_id, prompt=prompt, max_tokens=8, temperature=0
    )
    assert answer.choices[0].text == expected
    check_trust(api, answer.model_extra["trustswarm"])
    stream = client.completions.create(
        model=api.model_id, prompt=ids[0].tolist(), max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected


@pytest.mark.real_model
def test_stop_sequences_end_the_text_before_them(api: Api, real_hf_model) -> None:
    prompt = "Write one sentence about the sea."
    full = local_greedy(real_hf_model, api.tokenizer, chat_ids(api.tokenizer, prompt), 16)
    middle = [" " + w for w in full.split()[2:-1] if " " + w in full]
    assert middle, full
    stop = middle[0]  # a word in the middle of the greedy answer
    expected = full[: full.index(stop)]
    answer = chat(api, prompt, max_tokens=16, stop=["never appears", stop])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    text, chunks = streamed_text(chat(api, prompt, max_tokens=16, stop=stop, stream=True))
    assert text == expected
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"


@pytest.mark.real_model
def test_sampling_with_a_seed_repeats(api: Api) -> None:
    def sample(seed: int) -> str:
        answer = chat(api, "Tell me a story.", max_tokens=6, temperature=0.9, top_p=0.9, seed=seed)
        return answer.choices[0].message.content

    first = sample(1234)
    assert first == sample(1234)
    assert first.strip()
    # A temperature so small the warped scores overflow decodes greedily, not a 500.
    tiny = chat(api, "Tell me a story.", max_tokens=4, temperature=1e-30)
    assert (
        tiny.choices[0].message.content
        == chat(api, "Tell me a story.", max_tokens=4).choices[0].message.content
    )


@pytest.mark.real_model
def test_four_concurrent_requests_each_in_its_own_session(api: Api, real_hf_model) -> None:
    prompts = ["What is 2+2?", "Say hello.", "Name a fruit.", "What color is the sky?"]
    expected = [
        local_greedy(real_hf_model, api.tokenizer, chat_ids(api.tokenizer, p)) for p in prompts
    ]
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], max(s.server.ctx.active_sessions for s in api.swarm.servers))
            time.sleep(0.005)

    def one(i: int) -> str:
        if i % 2:
            return streamed_text(chat(api, prompts[i], stream=True))[0]
        return chat(api, prompts[i]).choices[0].message.content

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
    finally:
        done.set()
        watcher.join()
    assert answers == expected
    assert peak[0] == 4  # every server held all four sessions at once
    wait_until(lambda: api.active_sessions() == 0, timeout=10)


@pytest.mark.real_model
def test_bad_requests_get_openai_error_json(api: Api) -> None:
    client = api.client()
    with pytest.raises(openai.BadRequestError) as bad_n:
        chat(api, "hi", n=2)
    assert bad_n.value.status_code == 400
    assert bad_n.value.body["param"] == "n" and "n=1" in bad_n.value.body["message"]
    assert bad_n.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as hot:
        chat(api, "hi", temperature=5)
    assert hot.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.body["code"] == "model_not_found"
    status, body = api.raw("POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = api.raw("GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = api.raw("POST", "/v1/completions", b" " * (2 << 20))
    assert status == 413
    assert api.active_sessions() == 0  # none of them opened a session


@pytest.mark.real_model
def test_client_disconnect_mid_stream_closes_the_session(api: Api) -> None:
    stream = chat(api, "Write a long essay about the history of Rome.", max_tokens=400, stream=True)
    received = []
    for chunk in stream:
        received.append(chunk)
        if len(received) == 4:
            break
    assert api.active_sessions() == len(SPANS)  # one session per span, still running
    began = time.monotonic()
    stream.close()  # drops the connection mid-stream
    wait_until(lambda: api.active_sessions() == 0, timeout=10, every=0.02)
    # Closed within a few steps (400 tokens would take far longer).
    assert time.monotonic() - began < 5
    assert chat(api, "Say hello.", max_tokens=2).choices[0].message.content  # still serving


@pytest.mark.real_model
def test_client_disconnect_during_a_non_streamed_request_closes_the_session(api: Api) -> None:
    body = {"model": api.model_id, "prompt": "Once upon a time", "max_tokens": 400}
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
    conn.request(
        "POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    wait_until(lambda: api.active_sessions() == len(SPANS), timeout=20, every=0.02)
    began = time.monotonic()
    conn.close()  # gone before the answer
    wait_until(lambda: api.active_sessions() == 0, timeout=10, every=0.02)
    assert time.monotonic() - began < 5


def test_trust_facts_name_every_replica_and_the_audits_drawn(
    tiny_model_dir: Path, real_model_dir: Path, tmp_path: Path
) -> None:
    """redundancy=2 and audit_rate=1 on the tiny model (token-id prompts below its
    vocabulary; SmolLM2's tokenizer only decodes): both replicas of each span are
    listed, and each replica's transcript was drawn for an audit at close."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops gain nothing from threads
    swarm = LocalSwarm(tiny_model_dir)
    verifier = None
    try:
        servers = [swarm.start_server(span) for span in [(0, 3), (3, 6)] * 2]
        config = VerifierConfig(checks=CheckConfig(check_every=3600.0))
        verifier = start_verifier(swarm, f"sqlite:///{tmp_path / 'v.db'}", config)
        tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model_dir,
            [s.addrs[0] for s in servers],  # all four: no wait for discovery
            redundancy=2,
            trusted_verifiers=[verifier.addrs[0]],
            audit_rate=1.0,
        ) as model:
            wait_until(lambda: len(model.swarm.view.servers) == 4, timeout=30)
            with serving(Served(model, tokenizer, Limits(vocab_size=512))) as port:
                answer = openai_client(port).completions.create(
                    model="tiny-llama", prompt=[5, 6, 7, 8], max_tokens=4, temperature=0
                )
        facts = answer.model_extra["trustswarm"]
        assert facts["redundancy"] == 2
        by_span = {(s.server.span): set() for s in servers}
        for s in servers:
            by_span[s.server.span].add(s.peer_id)
        assert {(f["start"], f["end"]): set(f["servers"]) for f in facts["spans"]} == by_span
        assert facts["disagreements"] == []
        assert facts["audits"]["drawn"] == 4  # 2 spans x 2 replicas, one transcript each
        assert facts["audits"]["verifiers"] == [verifier.addrs[0]]
        assert facts["audits"]["rate"] == 1.0
    finally:
        if verifier is not None:
            stop_verifier(swarm, verifier)
        swarm.close()
        torch.set_num_threads(threads)


# -- request validation: malformed, huge or NaN fields are a clean 400 ----------------------

LIMITS = Limits(vocab_size=49152)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "tools",
    "frequency_penalty",
    "echo",
    "best_of",
    "logit_bias",
    "response_format",
]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(body=bodies, chat_endpoint=st.booleans())
def test_validation_accepts_or_refuses_with_an_api_error(body: dict, chat_endpoint: bool) -> None:
    parse = parse_chat if chat_endpoint else parse_completion
    try:
        request = parse(body, LIMITS)
    except APIError as exc:
        assert exc.status == 400 and exc.type == "invalid_request_error" and exc.message
        return
    sampling = request.sampling
    assert 1 <= sampling.max_tokens <= LIMITS.max_tokens_limit
    assert 0 <= sampling.temperature <= 2 and 0 <= sampling.top_p <= 1
    assert len(sampling.stop) <= LIMITS.max_stop and all(sampling.stop)


@settings(max_examples=200, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda v: json.dumps(v, allow_nan=True).encode(), json_values),
        st.integers(1, 20_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(4400, 9000).map(lambda n: b'{"max_tokens": ' + b"9" * n + b"}"),
    )
)
def test_parse_body_refuses_anything_but_a_json_object_cleanly(raw: bytes) -> None:
    try:
        body = parse_body(raw)
    except APIError as exc:
        assert exc.status == 400
        return
    assert isinstance(body, dict)


@pytest.mark.real_model
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_http_never_answers_a_malformed_request_with_a_500(api: Api, body: dict, path: str) -> None:
    body["model"] = "not-served"  # a valid request ends at 404: nothing is generated
    status, answer = api.raw("POST", path, json.dumps(body, allow_nan=True).encode())
    assert status in (400, 404), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}


@pytest.mark.real_model
def test_stop_text_holds_back_a_partial_stop_string(real_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    ids = tokenizer("Hello world, this is a test")["input_ids"]
    text = StopText(tokenizer, ("is a",))
    released = "".join(text.push(t) for t in ids)
    assert text.stopped and released == "Hello world, this "
    plain = StopText(tokenizer, ("no match here",))
    out = "".join(plain.push(t) for t in ids) + plain.flush()
    assert out == "Hello world, this is a test" and not plain.stopped

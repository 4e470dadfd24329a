"""The health page's renderers (HTML, JSON, Prometheus) on hostile and odd snapshots,
and its state built from a real SwarmView fed real signed announcements and records."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from trustswarm.client.swarm import SwarmView
from trustswarm.client.trust import TrustView
from trustswarm.health.measure import Measurement
from trustswarm.health.metrics import MAX_LABEL, metrics_registry, render_metrics
from trustswarm.health.render import number, render_page
from trustswarm.health.state import (
    BROKEN,
    HEALTHY,
    ModelHealth,
    ServerRow,
    SwarmSnapshot,
    VerifierRecord,
    snapshot_model,
)
from trustswarm.protocol.announcement import Announcement, sign_announcement
from trustswarm.protocol.identity import Identity
from trustswarm.reputation.records import ReputationRecord, sign_record
from trustswarm.testing.health_env import serve_web

HOSTILE = '<script>alert("x")</script>&"\'<img src=x onerror=alert(1)>'
# Every tag the renderer writes: anything else in the page came from a peer.
OUR_TAGS = {
    "html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "a", "section",
    "span", "table", "thead", "tbody", "tr", "th", "td", "br",
}  # fmt: skip

texts = st.one_of(st.text(max_size=40), st.just(HOSTILE), st.just("</style><script>"))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(1e308),
    st.integers(min_value=-(10**400), max_value=10**400),
)
maybe_numbers = st.one_of(st.none(), numbers)
spans = st.tuples(st.integers(-5, 5000), st.integers(-5, 5000))


@st.composite
def verifier_records(draw: st.DrawFn) -> VerifierRecord:
    return VerifierRecord(
        verifier_id=draw(texts),
        state=draw(st.sampled_from(["ok", "probation", "banned"]) | texts),
        score=draw(numbers),
        passes=draw(st.integers(0, 2**63)),
        failures=draw(st.integers(0, 2**63)),
        issued_at=draw(numbers),
        expires_at=draw(numbers),
        last_check_at=draw(maybe_numbers),
        last_audit_at=draw(maybe_numbers),
        ban_reason=draw(st.one_of(st.none(), texts)),
    )


@st.composite
def server_rows(draw: st.DrawFn) -> ServerRow:
    start, end = draw(spans)
    return ServerRow(
        peer_id=draw(texts),
        start=start,
        end=end,
        dtype=draw(texts),
        weights_digest=draw(texts),
        throughput=draw(numbers),
        rtt=draw(maybe_numbers),
        active_sessions=draw(st.one_of(st.none(), st.integers(-(10**30), 10**30))),
        addrs=tuple(draw(st.lists(texts, max_size=3))),
        observed_ip=draw(st.one_of(st.none(), texts)),
        state=draw(st.sampled_from(["ok", "probation", "banned", "unverified"]) | texts),
        score=draw(maybe_numbers),
        banned=draw(st.booleans()),
        ban_reason=draw(st.one_of(st.none(), texts)),
        records=tuple(draw(st.lists(verifier_records(), max_size=2))),
        expires_at=draw(numbers),
        measured_throughput=draw(maybe_numbers),
        measured_at=draw(maybe_numbers),
        measure_error=draw(st.one_of(st.none(), texts)),
        boasting=draw(st.booleans()),
    )


@st.composite
def models(draw: st.DrawFn) -> ModelHealth:
    blocks = draw(st.integers(0, 64))
    counts = st.lists(st.integers(0, 10**6), min_size=blocks, max_size=blocks)
    return ModelHealth(
        model_id=draw(texts),
        num_blocks=blocks,
        status=draw(st.sampled_from([HEALTHY, BROKEN])),
        coverage=tuple(draw(counts)),
        established=tuple(draw(counts)),
        servers=tuple(draw(st.lists(server_rows(), max_size=4))),
        digest_conflicts=tuple(draw(st.lists(texts, max_size=2))),
        error=draw(st.one_of(st.none(), texts)),
    )


snapshots = st.builds(
    SwarmSnapshot,
    taken_at=numbers,
    refresh_seconds=numbers,
    trusted_verifiers=st.lists(texts, max_size=2).map(tuple),
    models=st.lists(models(), max_size=2).map(tuple),
    error=st.one_of(st.none(), texts),
)


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def _tags(page: str) -> Tags:
    parser = Tags()
    parser.feed(page)
    parser.close()
    return parser


@settings(max_examples=150, deadline=None)
@given(snapshots)
def test_page_has_only_our_markup(snapshot: SwarmSnapshot):
    page = render_page(snapshot, now=time.time())
    parsed = _tags(page)
    assert parsed.tags <= OUR_TAGS, parsed.tags - OUR_TAGS
    assert not any(a.startswith("on") or a == "src" for a in parsed.attrs)
    assert "<script" not in page.lower() and "<img" not in page.lower()
    for model in snapshot.models:
        for row in model.servers:
            assert f'data-peer="{_escaped(row.peer_id)}"' in page


def _escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


@settings(max_examples=150, deadline=None)
@given(snapshots)
def test_json_is_strict_json(snapshot: SwarmSnapshot):
    data = snapshot.to_json()
    text = json.dumps(data, allow_nan=False)  # NaN / inf would raise here
    again = json.loads(text)
    assert len(again["models"]) == len(snapshot.models)
    for model, out in zip(snapshot.models, again["models"], strict=True):
        assert out["model_id"] == model.model_id
        assert [s["peer_id"] for s in out["servers"]] == [r.peer_id for r in model.servers]


@settings(max_examples=100, deadline=None)
@given(snapshots)
def test_metrics_parse_back(snapshot: SwarmSnapshot):
    text = render_metrics(metrics_registry(lambda: snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    healthy = families["trustswarm_model_healthy"].samples
    assert sorted(s.labels["model"] for s in healthy) == sorted(
        m.model_id[:MAX_LABEL] for m in snapshot.models
    )
    banned = families["trustswarm_server_banned"].samples
    assert len(banned) == sum(len(m.servers) for m in snapshot.models)


@given(numbers)
def test_number_never_fails(value: float | int):
    assert number(value)


def test_empty_swarm_renders_everywhere():
    snapshot = SwarmSnapshot(time.time(), 30.0, (), (), error="no initial peer answered")
    page = render_page(snapshot)
    assert "no initial peer answered" in page
    assert snapshot.to_json()["models"] == []
    assert b"trustswarm_model_healthy" in render_metrics(metrics_registry(lambda: snapshot))
    web = serve_web(lambda: None)  # before the first snapshot
    try:
        assert _fetch(web.url)[0] == 503
        assert _fetch(web.url + "metrics")[0] == 200
    finally:
        web.stop()


def _fetch(url: str) -> tuple[int, dict[str, str], str]:
    """Status, headers (lower-case names) and body of a GET on the loopback app."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, exc.headers, exc.read()
    return status, {k.lower(): v for k, v in headers.items()}, body.decode()


def _signed(identity: Identity, model_id: str, span: tuple[int, int], **fields: object):
    now = time.time()
    ann = Announcement(
        peer_id=str(identity.peer_id),
        model_id=model_id,
        start=span[0],
        end=span[1],
        weights_digest=str(fields.get("digest", "ab" * 32)),
        dtype=str(fields.get("dtype", "float32")),
        throughput=float(fields.get("throughput", 100.0)),
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        issued_at=now,
        expires_at=now + 120,
    )
    return sign_announcement(identity, ann)


def _record(verifier: Identity, subject: str, model_id: str, state: str, score: float):
    now = time.time()
    record = ReputationRecord(
        verifier_id=str(verifier.peer_id), subject=subject, model_id=model_id, start=0, end=4,
        score=score, state=state, passes=7, failures=2 if state == "banned" else 0,
        issued_at=now - 5, expires_at=now + 300, sequence=1,
    )  # fmt: skip
    return sign_record(verifier, record)


def test_hostile_swarm_view_to_page():
    """Real signed announcements with a hostile model id, a verifier's real ban and the
    client's own ban with a hostile reason: the page shows them all, escaped."""
    model_id = HOSTILE
    verifier = Identity.generate()
    trust = TrustView({str(verifier.peer_id)}, 0.5, model_id)
    view = SwarmView(model_id, None, trust=trust)
    servers = [Identity.generate() for _ in range(4)]
    for identity, span in zip(servers, [(0, 2), (2, 4), (0, 4), (1, 3)], strict=True):
        assert view.consider(_signed(identity, model_id, span))
    honest, cheat, other = str(servers[0].peer_id), str(servers[2].peer_id), str(servers[3].peer_id)
    for peer in (honest, str(servers[1].peer_id)):
        assert trust.accept(_record(verifier, peer, model_id, "ok", 0.9))
    assert trust.accept(_record(verifier, cheat, model_id, "banned", 0.0))
    view.ban(other, f"invalid answer: {HOSTILE}")
    view.rtts[honest] = 0.0123
    health = snapshot_model(view)
    assert health.status == HEALTHY and health.num_blocks == 4
    assert health.established == (1, 1, 1, 1)
    rows = {r.peer_id: r for r in health.servers}
    assert rows[cheat].banned and "banned by verifier" in rows[cheat].ban_reason
    assert rows[other].banned and HOSTILE in rows[other].ban_reason
    assert rows[honest].state == "ok" and rows[honest].score == 0.9
    snapshot = SwarmSnapshot(time.time(), 5.0, (str(verifier.peer_id),), (health,))
    web = serve_web(lambda: snapshot)
    try:
        status, headers, page = _fetch(web.url)
        state = json.loads(_fetch(web.url + "api/v1/state")[2])
        metrics = _fetch(web.url + "metrics")[2]
    finally:
        web.stop()
    assert status == 200
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "<script" not in page and _escaped(HOSTILE) in page
    assert _tags(page).tags <= OUR_TAGS
    assert page.count("data-peer=") == 4 and "12.3" in page  # RTT in ms
    assert state["models"][0]["model_id"] == HOSTILE
    assert {s["peer_id"]: s["banned"] for s in state["models"][0]["servers"]}[cheat] is True
    families = {f.name: f for f in text_string_to_metric_families(metrics)}
    banned = {s.labels["peer_id"]: s.value for s in families["trustswarm_server_banned"].samples}
    assert banned[cheat] == 1.0 and banned[honest] == 0.0
    assert math.isnan(
        {s.labels["peer_id"]: s.value for s in families["trustswarm_server_rtt_seconds"].samples}[
            cheat
        ]
    )


def test_uncovered_blocks_make_a_model_broken():
    view = SwarmView("m", None)
    for span in [(0, 2), (4, 6)]:
        assert view.consider(_signed(Identity.generate(), "m", span))
    health = snapshot_model(view, num_blocks=8)
    assert health.status == BROKEN and health.uncovered == [2, 3, 6, 7]
    assert "2-3, 6-7" in render_page(SwarmSnapshot(time.time(), 30.0, (), (health,)))
    other = _signed(Identity.generate(), "m", (0, 2), digest="cd" * 32)
    assert view.consider(other)
    assert snapshot_model(view).digest_conflicts == ("0:2",)


def test_verifier_reason_and_last_check_and_measurements_reach_the_page():
    """A verifier's signed ban reason and last check / audit times, and our own
    throughput measurements (with a boaster and a failure) reach page, JSON and metrics."""
    model_id = "m"
    verifier = Identity.generate()
    trust = TrustView({str(verifier.peer_id)}, 0.5, model_id)
    view = SwarmView(model_id, None, trust=trust)
    servers = [Identity.generate() for _ in range(3)]
    for identity in servers:
        assert view.consider(_signed(identity, model_id, (0, 4), throughput=1000.0))
    honest, cheat, broken = (str(s.peer_id) for s in servers)
    now = time.time()
    record = dataclasses.replace(
        _record(verifier, cheat, model_id, "banned", 0.0).record,
        last_check_at=now - 60,
        last_audit_at=now - 7200,
        ban_reason=f"spot-check: answer off by 3.2 {HOSTILE}",
    )
    assert trust.accept(sign_record(verifier, record))
    measured = {
        honest: Measurement(now - 3, 16, 0.02, 0.001, 842.0),
        cheat: Measurement(now - 3, 16, 0.5, 0.001, 32.0),  # 1000 announced: boasting
        broken: Measurement(now - 3, 16, None, None, None, "InvalidAnswer: <b>bad</b>"),
    }
    health = snapshot_model(view, now=now, measurements=measured, boast_factor=4.0)
    rows = {r.peer_id: r for r in health.servers}
    assert rows[honest].measured_throughput == 842.0 and not rows[honest].boasting
    assert rows[cheat].boasting and not rows[broken].boasting
    assert rows[broken].measure_error == "InvalidAnswer: <b>bad</b>"
    assert "spot-check: answer off by 3.2" in rows[cheat].ban_reason
    snapshot = SwarmSnapshot(now, 5.0, (str(verifier.peer_id),), (health,))
    page = render_page(snapshot, now=now)
    assert _tags(page).tags <= OUR_TAGS and "<b>bad" not in page
    cheat_row = page.split(f'data-peer="{cheat}"')[1].split("</tr>")[0]
    assert "last check 60 s ago" in cheat_row and "last audit 2 h ago" in cheat_row
    assert "boasting" in cheat_row and _escaped(HOSTILE) in cheat_row
    assert "842" in page.split(f'data-peer="{honest}"')[1].split("</tr>")[0]
    state = {s["peer_id"]: s for s in snapshot.to_json()["models"][0]["servers"]}
    assert state[cheat]["records"][0]["last_check_at"] == pytest.approx(now - 60)
    assert state[broken]["measured_throughput"] is None
    text = render_metrics(metrics_registry(lambda: snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    got = {
        s.labels["peer_id"]: s.value
        for s in families["trustswarm_server_measured_throughput"].samples
    }
    assert got[honest] == 842.0 and math.isnan(got[broken])
    boast = {s.labels["peer_id"]: s.value for s in families["trustswarm_server_boasting"].samples}
    assert boast == {honest: 0.0, cheat: 1.0, broken: 0.0}

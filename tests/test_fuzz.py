"""Short, derandomized runs of the fuzz targets in contrib/fuzz (the long runs are
`contrib/fuzz/run_fuzz.py`), and fuzzed peer requests over real HTTPS against a running pair."""

from __future__ import annotations

import importlib.util
import json
import ssl
import sys
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import h11
import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdagent import batchwire
from qkdagent.testing import in_ci, missing, open_agent_pair, selecting_target
from qkdagent.testing.agents import LINK

FUZZ = Path(__file__).resolve().parents[1] / "contrib" / "fuzz"
MUTATIONS = 2000
HYPOTHESIS = 200
PLUGIN_OF = {
    "etsi014_client": "qkdagent_etsi014",
    "etsi014_sim": "qkdagent_etsi014",
    "etsi004": "qkdagent_etsi004",
    "etsi004_rest": "qkdagent_etsi004",
    "dske_wire": "qkdagent_dske",
    "bb84_frames": "qkdagent_bb84",
    "qupskd_wire": "qkdagent_qupskd",
    "tlspsk_files": "qkdagent_tlspsk",
}


def _load(path: Path) -> ModuleType:
    if str(path.parent) not in sys.path:  # the targets import their sibling helpers
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"qkdfuzz_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


engine = _load(FUZZ / "engine.py")
TARGETS = engine.discover(FUZZ)


def test_every_core_target_is_there() -> None:
    assert {"peer_request", "peer_reply", "peer_batch", "config", "secret_ref"} <= set(TARGETS)


def _describe(result: Any) -> str:
    return "; ".join(
        f"{c.kind} x{c.count} escaped from {c.where} on {c.data[:80]!r}"
        for c in result.distinct.values()
    )


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_survives_a_short_derandomized_run(name: str) -> None:
    plugin = PLUGIN_OF.get(name)
    if plugin and importlib.util.find_spec(plugin) is None:
        missing(f"{plugin} is not installed, so target {name} cannot run")
    module = _load(TARGETS[name])
    assert module.SEEDS and callable(module.target)
    result = engine.fuzz(
        name,
        module,
        inputs=MUTATIONS + HYPOTHESIS,
        hypothesis_examples=HYPOTHESIS,
        derandomize=True,
        seed=0,
    )
    assert result.inputs >= MUTATIONS + len(module.SEEDS)
    assert result.crashes == 0, _describe(result)


def test_the_engine_reports_a_crash_and_where_it_escaped() -> None:
    """The harness itself can fail: a parser that lets RecursionError out is caught."""
    fake = ModuleType("fuzz_fake")
    fake.SEEDS = [b'{"a": [1, 2]}']  # type: ignore[attr-defined]
    fake.FORMAT = "json"  # type: ignore[attr-defined]

    def target(data: bytes) -> None:
        try:
            json.loads(data)
        except ValueError:
            pass

    fake.target = target  # type: ignore[attr-defined]
    result = engine.fuzz("fake", fake, inputs=3000, hypothesis_examples=0, seed=0)
    (crash,) = result.distinct.values()
    assert crash.kind == "RecursionError" and result.crashes > 0
    assert engine.minimize(target, crash).count(b"[") + crash.data.count(b"{") > 100


def test_a_selecting_target_lets_through_only_its_parsers_refusals() -> None:
    def refuse(data: bytes) -> None:
        raise ValueError("refused")

    def crash(data: bytes) -> None:
        raise KeyError(data)

    target = selecting_target([refuse, crash, refuse], [(ValueError,), (ValueError,), ()])
    target(b"")
    target(b"\x00abc")  # parser 0 refuses as allowed
    target(b"\x03abc")  # byte 0 wraps around: parser 0 again
    with pytest.raises(KeyError):
        target(b"\x01abc")
    with pytest.raises(ValueError):
        target(b"\x02abc")  # parser 2 may not fail at all
    with pytest.raises(ValueError, match="one tuple of refusals per parser"):
        selecting_target([refuse], [])


# --- over real HTTPS --------------------------------------------------------------------------

REC = {"sinks": {"rec": {"type": "recording"}}}


class LivePair:
    """An agent pair in a trio loop on a thread of its own, so one pair serves every example of
    a (synchronous) hypothesis test; the test thread reaches it through trio.from_thread."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.pair: Any = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> LivePair:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError("agent pair did not start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    async def _main(self) -> None:
        link = {"interval": 3600, "jitter": 0, "reject_after": 7200}
        try:
            async with open_agent_pair(self._directory, alice=REC, bob=REC, link=link) as pair:
                await pair.wait_for_epoch(1)
                self.pair, self._stop = pair, trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                await pair.stop("alice")
                await pair.stop("bob")
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise

    def run(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def state(self, names: tuple[str, ...] = ("alice", "bob")) -> tuple:
        """The sides' link state and used key IDs (read on the agents' own thread)."""

        def read() -> tuple:
            out = []
            for name in names:
                store = self.pair.agents[name].store
                record = store.load(LINK)
                used = store._db.execute("SELECT COUNT(*) FROM used_key_ids").fetchone()[0]
                pending = record.pending.epoch if record.pending else None
                keys = (record.chain_key.reveal(), record.auth_key.reveal())
                out.append((record.epoch, keys, pending, used))
            return tuple(out)

        return trio.from_thread.run_sync(read, trio_token=self._token)

    def url(self, name: str, action: str) -> str:
        return f"https://{self.pair.configs[name]['agent']['listen']}/v1/links/{LINK}/{action}"

    def client(self, name: str = "alice") -> httpx.Client:
        """A client presenting `name`'s certificate (the peer of the agent it talks to: a
        certificate naming no peer is reset at the handshake)."""
        tls = self.pair.agents[name].settings.tls
        ctx = ssl.create_default_context(cafile=str(tls.ca))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        return httpx.Client(verify=ctx, timeout=10)


LIVE_EXAMPLES = settings(
    max_examples=50,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
"""Hypothesis settings of the tests against a live pair (one pair serves every example)."""


def _mutated(seeds: list[bytes], fmt: str | None) -> st.SearchStrategy[bytes]:
    """Seeds mutated by the fuzz engine, reproducibly."""
    return st.builds(
        lambda seed, rnd: engine.Mutator(rnd, list(seeds), fmt, []).mutate(),
        st.integers(),
        st.randoms(use_true_random=False),
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LivePair]:
    with LivePair(tmp_path) as pair:
        yield pair


def test_fuzzed_peer_requests_over_https_are_4xx_and_change_nothing(live: LivePair) -> None:
    requests = _load(TARGETS["peer_request"])
    bodies = st.one_of(
        requests.STRATEGY, st.sampled_from(requests.SEEDS), _mutated(requests.SEEDS, "json")
    )
    before = live.state()
    statuses: list[int] = []
    with live.client("alice") as as_alice, live.client("bob") as as_bob:

        @LIVE_EXAMPLES
        @given(st.sampled_from(["alice", "bob"]), st.sampled_from(requests.KINDS), bodies)
        def post(name: str, action: str, body: bytes) -> None:
            http = as_bob if name == "alice" else as_alice  # each agent hears from its peer
            reply = http.post(live.url(name, action), content=body)
            statuses.append(reply.status_code)
            assert 400 <= reply.status_code < 500, (reply.status_code, body[:200])
            assert live.state() == before

        post()
    assert len(statuses) >= 50
    assert live.state() == before
    assert live.run(live.pair.alice.link(LINK).rotate_once)  # the link still rotates
    after = live.state()
    assert after[0][0] == after[1][0] == before[0][0] + 1


def test_fuzzed_batches_over_https_are_refused_item_by_item_and_change_nothing(
    live: LivePair,
) -> None:
    """Batches (issue 18): mangled containers, and well-formed ones carrying fuzzed requests
    for the real link and others: the batch is a 4xx (or a 503 once the address has spent its
    refusal budget), or a 200 whose every item is a 4xx; no state moves."""
    batches = _load(TARGETS["peer_batch"])
    requests = _load(TARGETS["peer_request"])
    items = st.lists(
        st.tuples(st.sampled_from(requests.KINDS), requests.STRATEGY), min_size=1, max_size=8
    ).map(  # the real link once, and links the agent does not have (a batch names each once)
        lambda pairs: batchwire.encode_request(
            [batchwire.Item(f"{LINK}{i or ''}", a, b) for i, (a, b) in enumerate(pairs)]
        )
    )
    mangled = _mutated(batches.SEEDS, None)
    before = live.state()
    outcomes: list[str] = []
    with live.client("alice") as as_alice, live.client("bob") as as_bob:

        @LIVE_EXAMPLES
        @given(st.sampled_from(["alice", "bob"]), st.one_of(items, mangled))
        def post(name: str, body: bytes) -> None:
            http = as_bob if name == "alice" else as_alice
            url = live.url(name, "rotate").replace(f"/v1/links/{LINK}/rotate", "/v1/batch")
            reply = http.post(url, content=body)
            if reply.status_code == 200:
                count = int.from_bytes(body[4:6], "big")
                answers = batchwire.decode_reply(reply.content, count)
                assert all(400 <= a.status < 500 for a in answers), answers
                outcomes.append("items")
            elif reply.status_code == 503:  # the address's refusal budget is spent
                assert reply.json()["error"] == "busy"
                outcomes.append("busy")
            else:
                assert 400 <= reply.status_code < 500, (reply.status_code, body[:200])
                outcomes.append("batch")
            assert live.state() == before

        post()
    assert {"items", "batch"} <= set(outcomes)
    assert live.state() == before
    assert live.run(live.pair.alice.link(LINK).rotate_once)  # the link still rotates


async def _answer_once(stream: trio.SSLStream, status: int, body: bytes) -> None:
    """Read one request and answer it with `status` and `body` (then close)."""
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            return
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    headers.append(("connection", "close"))
    for out in (h11.Response(status_code=status, headers=headers), h11.Data(data=body)):
        await stream.send_all(conn.send(out))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    await stream.aclose()


def test_fuzzed_peer_replies_over_https_are_one_failed_attempt(live: LivePair) -> None:
    """A server holding bob's certificate answers alice's rotate with garbage: each is one
    failed attempt, alice's committed state stays, and the link rotates once bob is back."""
    replies = _load(TARGETS["peer_reply"])
    pair = live.pair
    tls = pair.agents["bob"].settings.tls
    bob_port = int(pair.configs["bob"]["agent"]["listen"].rsplit(":", 1)[1])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    server_ctx.load_cert_chain(str(tls.cert), str(tls.key))

    def alice_state() -> tuple:
        return live.state(("alice",))[0][:3]  # epoch, chain and auth key, pending

    async def exchange(status: int, body: bytes) -> bool:
        async def handler(stream: trio.SSLStream) -> None:
            with trio.move_on_after(10):
                await _answer_once(stream, status, body)

        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(trio.serve_ssl_over_tcp, handler, bob_port, server_ctx, host="127.0.0.1")
            )
            committed = await pair.alice.link(LINK).rotate_once()
            nursery.cancel_scope.cancel()
        return committed

    live.run(pair.stop, "bob")
    before = alice_state()
    outcomes: list[bool] = []

    @settings(
        max_examples=30,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.sampled_from([200, 400, 403, 409, 413, 500]),
        st.one_of(
            st.just(replies.peer_seeds.NESTED), replies.STRATEGY, st.sampled_from(replies.SEEDS)
        ),
    )
    def reply(status: int, body: bytes) -> None:
        outcomes.append(live.run(exchange, status, body))
        assert outcomes[-1] is False
        error = pair.alice.link(LINK).status.last_error or ""
        assert error.startswith("peer:"), error  # refused as a bad reply, not as a bug
        assert alice_state() == before

    reply()
    assert len(outcomes) >= 30
    live.run(pair.start, "bob")
    assert live.run(pair.alice.link(LINK).rotate_once)
    after = live.state()
    assert after[0][0] == after[1][0] == before[0] + 1


def test_ci_runs_the_etsi014_targets() -> None:
    """In CI the plugin is installed, so its fuzz targets must exist and run (not skip)."""
    if not in_ci():
        pytest.skip("checked under CI=true only")
    assert importlib.util.find_spec("qkdagent_etsi014") is not None

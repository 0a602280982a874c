"""Every hook spec is documented, has a typed facade method, is exercised here, and the facade
applies DESIGN §3's error policies (registration stops the start; observers never do)."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pluggy
import pytest
import trio
import trio.testing

from qkdagent import (
    CommandRegistry,
    ComponentEvent,
    DemoLink,
    EraseEvent,
    KeyMeta,
    Link,
    PluginContext,
    RotationErrorEvent,
    RotationEvent,
    Secret,
    Service,
    Sink,
    hookimpl,
)
from qkdagent import hookspecs as specs_module
from qkdagent.errors import PluginError
from qkdagent.hooks import OBSERVATION_HOOKS, Hooks
from qkdagent.plugins import PLUGIN_GROUP, Plugins
from qkdagent.testing import MemoryPool, open_agent_pair

SPECS = {
    name: function
    for name, function in inspect.getmembers(specs_module, inspect.isfunction)
    if name.startswith("qkdagent_")
}
PAIR_HOOKS = {  # exercised by a running agent pair below
    "qkdagent_register_link_protocols",
    "qkdagent_register_sources",
    "qkdagent_register_sinks",
    "qkdagent_register_services",
    *OBSERVATION_HOOKS,
}
CLI_HOOKS = {"qkdagent_add_commands", "qkdagent_demo_link"}  # exercised through the facade


def _firstresult(name: str) -> bool:
    pm = pluggy.PluginManager(specs_module.PROJECT)
    pm.add_hookspecs(specs_module)
    return bool(getattr(pm.hook, name).spec.opts["firstresult"])


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_spec_documents_when_parameters_result_and_exceptions(name: str) -> None:
    doc = inspect.getdoc(SPECS[name]) or ""
    labels = re.findall(r"^(When|Parameters|Result|Exception):", doc, re.MULTILINE)
    assert labels == ["When", "Parameters", "Result", "Exception"], name
    parameters = doc.split("Parameters:", 1)[1].split("Result:", 1)[0]
    for parameter in inspect.signature(SPECS[name]).parameters:
        assert f"`{parameter}" in parameters, f"{name}: parameter {parameter} not described"
    result = doc.split("Result:", 1)[1].split("Exception:", 1)[0]
    assert ("firstresult" in result) == _firstresult(name), name
    assert "every implementation is called" in result or _firstresult(name), name


def test_every_spec_has_a_facade_method_and_a_test() -> None:
    assert set(SPECS) == PAIR_HOOKS | CLI_HOOKS  # a new spec needs a test here
    for name in SPECS:
        assert callable(getattr(Hooks, name.removeprefix("qkdagent_"))), name


# -- a running agent pair calls every registration and observation hook ------------------------


class ReportingSink(Sink):
    """A sink whose background task reports one event, to reach `on_component_event`."""

    type_name = "hookspec-reporting"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        self.context.report(ComponentEvent(self.name, "hello", "from run()"))
        await trio.sleep_forever()

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        await trio.lowlevel.checkpoint()

    async def erase(self, link: Link, reason: str) -> None:
        await trio.lowlevel.checkpoint()


class Observer:
    """Implements every hook a running agent calls and records what it received."""

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = {}
        self.agent = ""

    def _seen(self, name: str, value: Any) -> None:
        self.calls.setdefault(name, []).append(value)

    @hookimpl
    def qkdagent_register_sources(self, register: Callable[..., None]) -> None:
        self._seen("qkdagent_register_sources", register)

    @hookimpl
    def qkdagent_register_sinks(self, register: Callable[..., None]) -> None:
        register(ReportingSink)
        self._seen("qkdagent_register_sinks", register)

    @hookimpl
    def qkdagent_register_link_protocols(self, register: Callable[..., None]) -> None:
        self._seen("qkdagent_register_link_protocols", register)

    @hookimpl
    def qkdagent_register_services(
        self, register: Callable[[Service], None], context: PluginContext
    ) -> None:
        self.agent = context.agent_name

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            self._seen("service started", context.agent_name)
            task_status.started()
            await trio.sleep_forever()

        register(Service("hookspec-observer", run))
        self._seen("qkdagent_register_services", context)

    @hookimpl
    def qkdagent_after_rotation(self, event: RotationEvent) -> None:
        self._seen("qkdagent_after_rotation", event)

    @hookimpl
    def qkdagent_on_rotation_error(self, event: RotationErrorEvent) -> None:
        self._seen("qkdagent_on_rotation_error", event)

    @hookimpl
    def qkdagent_after_erase(self, event: EraseEvent) -> None:
        self._seen("qkdagent_after_erase", event)

    @hookimpl
    def qkdagent_on_component_event(self, event: ComponentEvent) -> None:
        self._seen("qkdagent_on_component_event", event)


@pytest.fixture
def observers(monkeypatch: pytest.MonkeyPatch) -> Generator[list[Observer], None, None]:
    """Every plugin manager loading plugins for an agent gets its own Observer first."""
    made: list[Observer] = []
    load = Plugins.load

    def observed(self: Plugins, names: Any, *, group: str = PLUGIN_GROUP) -> None:
        if group == PLUGIN_GROUP and "hookspec-observer" not in self.loaded:
            made.append(Observer())
            self.add("hookspec-observer", made[-1], "tests")
        load(self, names, group=group)

    monkeypatch.setattr(Plugins, "load", observed)
    yield made


async def test_a_running_pair_calls_every_registration_and_observation_hook(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, observers: list[Observer]
) -> None:
    sides = {"sinks": {"rec": {"type": "recording"}, "rep": {"type": "hookspec-reporting"}}}
    link = {"interval": 120, "reject_after": 180, "jitter": 0}
    async with open_agent_pair(
        tmp_path, alice=sides, bob=sides, link=link, local=True, start=False
    ) as pair:
        pool = MemoryPool.named(pair.configs["alice"]["sources"]["sim"]["pool"])
        pool.down = True  # the first attempt fails at the source
        await pair.start("bob")
        await pair.start("alice")
        (alice,) = [o for o in observers if o.agent == "alice"]
        while "qkdagent_on_rotation_error" not in alice.calls:  # noqa: ASYNC110 (virtual clock)
            await trio.sleep(0.5)
        pool.down = False
        await pair.wait_for_epoch(1)
    assert set(alice.calls) == PAIR_HOOKS | {"service started"}
    (error,) = alice.calls["qkdagent_on_rotation_error"]
    assert (error.link, error.epoch, error.stage) == ("alice-bob", 0, "source")
    assert [e.reason for e in alice.calls["qkdagent_after_erase"]] == ["startup"]
    assert alice.calls["qkdagent_after_erase"][0].sinks == ("rec", "rep")
    rotation = alice.calls["qkdagent_after_rotation"][0]
    assert (rotation.link, rotation.epoch, rotation.initiator) == ("alice-bob", 1, True)
    assert alice.calls["qkdagent_on_component_event"] == [
        ComponentEvent("rep", "hello", "from run()")
    ]
    (bob,) = [o for o in observers if o.agent == "bob"]
    assert bob.calls["qkdagent_after_rotation"][0].initiator is False


# -- the facade: one typed method per hook, two error policies ---------------------------------


def _hooks(*plugins: object) -> Hooks:
    manager = Plugins()
    for n, plugin in enumerate(plugins):
        manager.add(f"p{n}", plugin, "tests")
    return manager.hooks


def test_a_failing_observer_is_logged_by_type_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    class Broken:
        @hookimpl
        def qkdagent_after_rotation(self, event: RotationEvent) -> None:
            raise ValueError("the message might quote anything: SECRET-TEXT")

    class Good:
        @hookimpl
        def qkdagent_after_rotation(self, event: RotationEvent) -> None:
            seen.append(event.link)

    class NoArgs:
        @hookimpl
        def qkdagent_after_rotation(self) -> None:
            seen.append("no args")

    event = RotationEvent("ab", 1, ("k",), True, 0.1, ("rec",))
    for order in ((Broken(), Good(), NoArgs()), (Good(), NoArgs(), Broken())):
        seen.clear()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="qkdagent.hooks"):
            _hooks(*order).after_rotation(event)  # does not raise
        assert sorted(seen) == ["ab", "no args"]
        assert "qkdagent_after_rotation observer of plugin" in caplog.text
        assert "ValueError at " in caplog.text and "test_hookspecs.py:" in caplog.text
        assert "SECRET-TEXT" not in caplog.text


@pytest.mark.parametrize(
    ("method", "event"),
    [
        ("on_rotation_error", RotationErrorEvent("ab", 0, "peer", "down")),
        ("after_erase", EraseEvent("ab", 0, "startup", ("rec",))),
        ("on_component_event", ComponentEvent("rec", "repaired", "put back")),
    ],
)
def test_every_observation_method_reaches_its_hook_and_never_raises(
    method: str, event: object
) -> None:
    seen: list[object] = []
    hook = f"qkdagent_{method}"

    def good(self: object, event: object) -> None:
        seen.append(event)

    def bad(self: object, event: object) -> None:
        raise RuntimeError("observer bug")

    good_plugin = type("Good", (), {hook: hookimpl(good)})()
    bad_plugin = type("Bad", (), {hook: hookimpl(bad)})()
    getattr(_hooks(bad_plugin, good_plugin), method)(event)
    assert seen == [event]


def test_an_observation_wrapper_is_called_through_pluggy_and_still_guarded() -> None:
    seen: list[str] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def qkdagent_after_erase(self, event: EraseEvent) -> Generator[None, None, None]:
            seen.append("before")
            yield
            seen.append("after")

    class Broken:
        @hookimpl
        def qkdagent_after_erase(self, event: EraseEvent) -> None:
            raise RuntimeError("bug")

    _hooks(Broken(), Wrapper()).after_erase(EraseEvent("ab", 0, "startup", ()))
    assert seen == ["before"]  # pluggy stopped at the failure; the call did not raise


def test_a_failing_registration_hook_stops_the_start_naming_the_plugin() -> None:
    class Broken:
        @hookimpl
        def qkdagent_register_sinks(self, register: Callable[..., None]) -> None:
            raise KeyError("oops")

    with pytest.raises(
        PluginError, match=r"plugin 'bad': qkdagent_register_sinks failed: KeyError"
    ):
        Plugins().add("bad", Broken(), "tests")

    class BadServices:
        @hookimpl
        def qkdagent_register_services(self, context: PluginContext) -> None:
            raise RuntimeError("no")

    with pytest.raises(PluginError, match="qkdagent_register_services failed: RuntimeError"):
        _hooks(BadServices()).register_services(PluginContext("a", Path(".")))


def test_registration_hooks_through_the_facade(tmp_path: Path) -> None:
    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    demo = DemoLink("two simulators", Service("sim", run))

    class Cli:
        @hookimpl
        def qkdagent_add_commands(self, cli: CommandRegistry) -> None:
            cli.add("hello", help="say hello", configure=lambda parser: None, run=lambda a: 0)

        @hookimpl
        def qkdagent_demo_link(self, directory: Path) -> DemoLink:
            (directory / "pki").mkdir()
            return demo

    class Silent:
        @hookimpl
        def qkdagent_demo_link(self, directory: Path) -> None:
            return None

    class Services:
        @hookimpl
        def qkdagent_register_services(self, register: Callable[[Service], None]) -> None:
            register(Service("exporter", run))

    hooks = _hooks(Cli(), Silent(), Services())
    registry = CommandRegistry()
    hooks.add_commands(registry)
    assert list(registry.commands) == ["hello"]
    assert hooks.demo_link(tmp_path) is demo  # firstresult: Silent's None is skipped
    assert (tmp_path / "pki").is_dir()
    assert [s.name for s in hooks.register_services(PluginContext("a", tmp_path))] == ["exporter"]
    assert _hooks(Silent()).demo_link(tmp_path) is None

    class BrokenDemo:
        @hookimpl
        def qkdagent_demo_link(self, directory: Path) -> DemoLink:
            raise OSError("disk full")

    with pytest.raises(PluginError, match="qkdagent_demo_link failed: OSError"):
        _hooks(BrokenDemo()).demo_link(tmp_path)

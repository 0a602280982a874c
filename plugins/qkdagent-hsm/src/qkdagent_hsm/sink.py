"""Sink type `pkcs11`: each link's secret as a persistent generic-secret object in a token.

Objects follow cqptoolkit's convention: the label names the other side (default: the peer agent's
name; a per-link address can be given) and the ID identifies the epoch. Only the current key
carries the label (older kept keys move to the retired label, default `<label>.old`), so a lookup
by label alone is unambiguous. A consumer on this host finds the key a peer's client means by the
TLS-PSK identity `pkcs:object=<label>;id=<hex id>`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Any

from qkdagent import (
    KeyMeta,
    Link,
    Misconfigured,
    Options,
    PluginContext,
    Secret,
    Sink,
    SinkError,
)

from . import naming, token
from .state import HSM, HsmState
from .token import DEFAULT_LABEL_LIMIT, KeyPolicy, OpenToken, TokenSpec
from .uri import TokenSelector, UriError, parse_uri
from .worker import Worker

log = logging.getLogger(__name__)

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class Pkcs11Sink(Sink):
    """Store derived secrets in a PKCS#11 token, keeping the newest `retention` per link."""

    type_name = "pkcs11"
    concurrent_prepare = False  # every token call of the agent queues on one worker thread

    def __init__(self, name: str, options: Options, context: PluginContext) -> None:
        super().__init__(name, options, context)
        self.spec = _token_spec(options)
        self.pin: Secret = options.secret("pin")
        self.template: str = options.string(
            "object_label", "{peer}", check=naming.check_template, max_len=1024
        )
        self.fixed_labels: dict[str, str] = _fixed_labels(options)
        self.retired_template: str | None = _retired_template(options)
        self.id_bytes: int = options.integer("id_bytes", 8, min=1, max=naming.MAX_ID_BYTES)
        self.retention: int = options.integer("retention", 2, min=1)
        problem = naming.check_retention(self.retention, self.id_bytes)
        if problem:
            options.fail("retention", problem)
        self.max_label_bytes: int | None = options.integer("max_label_bytes", None, min=1, max=4096)
        self.policy = KeyPolicy(
            key_type=options.string(
                "key_type", "generic_secret", choices=("generic_secret", "sha256_hmac")
            ),
            sensitive=options.boolean("sensitive", True),
            extractable=options.boolean("extractable", False),
        )
        self.label_limit = self.max_label_bytes or DEFAULT_LABEL_LIMIT
        self._entry: OpenToken | None = None
        self._owners: dict[str, str] = {}
        self._state: HsmState = context.stash.setdefault(HSM, HsmState)

    @property
    def worker(self) -> Worker:
        """The agent's PKCS#11 worker thread (shared by its pkcs11 sinks)."""
        return self._state.worker

    # -- lifecycle -----------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Open and log in to the token, then check IDs and labels against its limits."""
        if self._entry is not None:
            return
        entry = await self._state.open(self.spec, self.pin)
        try:
            self._check_limits(entry)
        except BaseException:
            await self._state.close(entry)  # even when cancelled: the session is ours
            raise
        self._entry = entry
        log.info(
            "sink %s: using token %r (serial %s, %s %s)",
            self.name,
            entry.info.label,
            entry.info.serial,
            entry.info.manufacturer,
            entry.info.model,
        )

    async def aclose(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            await self._state.close(entry)

    def _check_limits(self, entry: OpenToken) -> None:
        """Check IDs and every label this sink will write against the token's limits."""
        info = entry.info
        where = f"sink {self.name!r}, token {info.label!r}"
        if info.id_limit is not None and self.id_bytes > info.id_limit:
            raise Misconfigured(
                f"{where}: id_bytes = {self.id_bytes}, "
                f"but the token allows {info.id_limit}-byte IDs"
            )
        limit = self.max_label_bytes or info.label_limit or DEFAULT_LABEL_LIMIT
        if info.label_limit is not None and limit > info.label_limit:
            raise Misconfigured(
                f"{where}: max_label_bytes = {limit}, but the token allows {info.label_limit}"
            )
        # The real labels of the links the core assigned (self.links), and every fixed label.
        rendered = {link.name: self._render(link) for link in self.links}
        problem = naming.check_links(rendered, limit)
        for link_name in self.fixed_labels:
            if problem is None and link_name not in rendered:
                fixed = self._render(Link(link_name, self.context.agent_name, "", True))
                problem = naming.check_link_labels(fixed, limit, link_name)
        if problem:
            raise Misconfigured(f"{where}: {problem}")
        if not self.links:
            self._check_template_floor(where, limit)
        self.label_limit = limit

    def _check_template_floor(self, where: str, limit: int) -> None:
        """Without links yet, refuse templates too long even with empty peer and link names."""
        local = self.context.agent_name
        floor = naming.link_labels(
            self.template, self.retired_template, {}, link="", peer="", local=local
        )
        for what, text in (("object_label", floor.label), ("retired_label", floor.retired)):
            size = len((text or "").encode("utf-8"))
            if size > limit:
                raise Misconfigured(
                    f"{where}: {what} template renders at least {size} bytes "
                    f"({text!r} before peer/link names), over the limit of {limit}"
                )

    # -- naming ---------------------------------------------------------------------------------

    def _render(self, link: Link) -> naming.LinkLabels:
        return naming.link_labels(
            self.template,
            self.retired_template,
            self.fixed_labels,
            link=link.name,
            peer=link.peer,
            local=link.local,
        )

    def labels(self, link: Link) -> naming.LinkLabels:
        """The labels of a link's objects on this token (current key, retained older keys).

        prepare() checked the links known then; this also guards links added by a reload.
        """
        labels = self._render(link)
        problem = naming.check_link_labels(labels, self.label_limit, link.name)
        problem = problem or naming.label_clash(self._owners, link.name, labels)
        if problem:
            raise SinkError(f"sink {self.name!r}: {problem}")
        for text in labels.all():
            self._owners[text] = link.name
        return labels

    def object_id(self, epoch: int) -> bytes:
        return naming.epoch_id(epoch, self.id_bytes)

    def identity(self, link: Link, epoch: int) -> str:
        """The TLS-PSK identity under which a consumer on this host finds `epoch`'s key."""
        return naming.identity(self.labels(link).label, self.object_id(epoch))

    # -- sink contract --------------------------------------------------------------------------

    def _open(self) -> OpenToken:
        if self._entry is None:
            raise SinkError(f"sink {self.name!r} is not prepared (token not open)")
        return self._entry

    async def install(self, link: Link, secret: Secret, meta: KeyMeta) -> None:
        if len(secret) == 0:
            raise SinkError(f"sink {self.name!r}: refusing an empty secret")
        entry = self._open()
        labels = self.labels(link)
        label = labels.label
        keep = naming.keep_window(meta.epoch, self.retention, self.id_bytes)
        result = await self.worker.run(
            lambda: token.install(
                entry,
                label=label,
                retired_label=labels.retired,
                keep=keep,
                secret=secret,
                policy=self.policy,
            )
        )
        log.debug(
            "sink %s: link %s epoch %d stored as %s (%s, destroyed %d, relabelled %d)",
            self.name,
            link.name,
            meta.epoch,
            naming.identity(label, keep[0]),
            "created" if result.created else "already present",
            result.destroyed,
            result.relabelled,
        )

    async def token_mac(self, link: Link, challenge: bytes) -> tuple[bytes, bytes] | None:
        """(ID, HMAC-SHA256 over `challenge`) computed inside the token by the newest key."""
        entry = self._open()
        label = self.labels(link).label
        return await self.worker.run(
            lambda: token.current_mac(entry, label=label, challenge=challenge)
        )

    async def verify(self, link: Link, secret: Secret, meta: KeyMeta) -> bool | None:
        """True if the newest object is `meta.epoch`'s and the token's HMAC matches ours."""
        challenge = os.urandom(32)
        found = await self.token_mac(link, challenge)
        if found is None:
            return False
        object_id, mac = found
        expected = hmac.new(secret.reveal(), challenge, hashlib.sha256).digest()
        same = hmac.compare_digest(mac, expected)
        return same and object_id == self.object_id(meta.epoch)

    async def erase(self, link: Link, reason: str) -> None:
        entry = self._open()
        labels = self.labels(link).all()
        count = await self.worker.run(lambda: token.erase(entry, labels=labels))
        for text in labels:  # a removed link's label may go to another link after a reload
            self._owners.pop(text, None)
        log.info(
            "sink %s: link %s erased (%s): destroyed %d object(s)",
            self.name,
            link.name,
            reason,
            count,
        )

    # -- read-back for operators and tests ---------------------------------------------------------

    async def read_current(self, link: Link) -> Secret | None:
        """The newest key's value when the token allows reading it (sensitive = false)."""
        entry = self._open()
        label = self.labels(link).label
        return await self.worker.run(lambda: token.current_value(entry, label=label))

    async def object_ids(self, link: Link) -> dict[str, list[bytes]]:
        """IDs under the link's labels, by an authoritative search of the token (slow)."""
        entry = self._open()
        labels = self.labels(link).all()
        return await self.worker.run(lambda: token.link_ids(entry, labels=labels))


def _token_spec(options: Options) -> TokenSpec:
    has_uri, has_label = options.has("uri"), options.has("token")
    if has_uri == has_label:
        options.fail("token", 'give exactly one of token = "<label>" or uri = "pkcs11:..."')
    module: str | None = None
    if has_uri:
        text = options.string("uri", max_len=2048)
        try:
            parsed = parse_uri(text)
        except UriError as exc:
            options.fail("uri", str(exc))
        selector, module = parsed.selector, parsed.module_path
    else:
        selector = TokenSelector(label=options.string("token", max_len=32))
    if options.has("module"):
        if module is not None:
            options.fail("module", "is also given as module-path in uri; keep one")
        module = str(options.path("module"))
    return TokenSpec(module or DEFAULT_MODULE, selector)


def _retired_template(options: Options) -> str | None:
    """The retired-label template, or None for `retired_label = false` (older keys keep the
    label, so a lookup by label alone is ambiguous: for tokens that cannot relabel objects)."""
    if options.raw("retired_label", naming.DEFAULT_RETIRED_LABEL) is False:
        return None
    template: str = options.string(
        "retired_label",
        naming.DEFAULT_RETIRED_LABEL,
        check=lambda t: naming.check_template(t, extra=("label",)),
        max_len=1024,
    )
    return template


def _fixed_labels(options: Options) -> dict[str, str]:
    table: dict[str, Any] = options.table("object_labels", {})
    for link_name, label in table.items():
        if not isinstance(label, str) or not label:
            options.fail(
                "object_labels", f"label for link {link_name!r} must be a non-empty string"
            )
    if len(set(table.values())) != len(table):
        options.fail("object_labels", "gives the same label to two links")
    return dict(table)

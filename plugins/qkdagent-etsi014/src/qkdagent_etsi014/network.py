"""The KME side of ETSI GS QKD 014 as pure logic: KMEs, their SAEs, links and key pools.

No I/O and no clock of its own (one is injected), so every rule of the spec is testable without a
server. `KmeNetwork.status/enc_keys/dec_keys` take the identity the TLS layer established for the
caller and either return the answer or raise `ApiError` **before** taking any key, so a refused
request never consumes key material.

Delivery model: Get key takes `number * size` bits from the link between the master's KME and the
KME of every named slave (a relay through the master's KME consumes key on each link, Annex B) and
parks the keys at each slave's KME. Get key with key IDs hands a parked key to a named SAE once;
the key leaves a KME when every SAE named for it at that KME has fetched it.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from qkdagent import CsprngSupply, KeySupply, SupplyExhausted, SupplyFactory

from .wire import MSG_KEY_ACCESS_ERROR, MSG_KEYS_NOT_FOUND, MSG_SIZE_MULTIPLE_OF_8


class ApiError(Exception):
    """An answer other than 200: status, spec message and optional details."""

    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, f"unauthorized: {reason}")


@dataclass(frozen=True)
class KeyRequest:
    """A parsed Get key request (sizes in bits); defaults are filled in by the network."""

    number: int | None = None
    size: int | None = None
    additional_slave_sae_ids: tuple[str, ...] = ()
    extension_mandatory: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """The Status limits every KME of the simulated network advertises (bits, keys)."""

    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 1024
    max_key_count: int = 100_000
    max_sae_id_count: int = 4

    def check(self) -> None:
        if not 8 <= self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need 8 <= min_key_size <= key_size <= max_key_size")
        if any(v % 8 for v in (self.min_key_size, self.key_size, self.max_key_size)):
            raise ValueError("key sizes must be multiples of 8")
        if self.max_key_per_request < 1 or self.max_key_count < 1 or self.max_sae_id_count < 0:
            raise ValueError("max_key_per_request and max_key_count must be >= 1")

    @property
    def store_bits(self) -> int:
        """The most a link's store ever holds (`max_key_count` is the maximum of
        `stored_key_count`, counted in keys of `key_size`): a larger request can never succeed."""
        return self.max_key_count * self.key_size


# A key parked at a slave's KME: (master SAE, key, SAEs named for it there, SAEs that have not
# fetched it yet, time it becomes fetchable). A plain tuple of str/bytes/float/tuples of str on
# purpose: the garbage collector stops tracking such tuples, whereas with one object (and a set)
# per key every full collection walked all parked keys (~0.3 s per 700,000: latency spikes).
Parked = tuple[str, bytes, tuple[str, ...], tuple[str, ...], float]
# Literal indexes (Final), so the type checker knows each field's type.
_MASTER: Final = 0
_VALUE: Final = 1
_NAMED: Final = 2
_WAITING: Final = 3
_READY_AT: Final = 4


@dataclass
class Kme:
    kme_id: str
    saes: frozenset[str]
    parked: OrderedDict[str, Parked] = field(default_factory=OrderedDict)


def new_key_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs from one CSPRNG read; uuid.uuid4() is 10x slower."""
    digits = os.urandom(16 * count).hex()
    ids = []
    for i in range(0, 32 * count, 32):
        h = digits[i : i + 32]
        variant = "89ab"[int(h[16], 16) & 3]
        ids.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}")
    return ids


def split(material: bytes, step: int) -> list[bytes]:
    return [material[i : i + step] for i in range(0, len(material), step)]


class KmeNetwork:
    """Several KMEs joined pairwise by simulated QKD links."""

    def __init__(
        self,
        kmes: dict[str, list[str]],
        *,
        limits: Limits | None = None,
        rate_bps: float = 1_000_000.0,
        initial_fill: float = 1.0,
        sync_delay: float = 0.0,
        supply_factory: SupplyFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`kmes` maps KME ID -> the SAE IDs attached to it; `sync_delay` is how long after
        Get key the slaves' KMEs still answer "not found" (key synchronisation lag)."""
        self.limits = limits or Limits()
        self.limits.check()
        if not 0.0 <= initial_fill <= 1.0:
            raise ValueError("initial_fill must be between 0 and 1")
        self.clock = clock
        self.sync_delay = sync_delay
        self.kmes: dict[str, Kme] = {}
        self.home: dict[str, str] = {}
        for kme_id, saes in kmes.items():
            self.kmes[kme_id] = Kme(kme_id, frozenset(saes))
            for sae in saes:
                if sae in self.home:
                    raise ValueError(f"SAE {sae!r} is attached to two KMEs")
                self.home[sae] = kme_id
        capacity = self.limits.store_bits

        def default_supply(a: str, b: str) -> KeySupply:
            return CsprngSupply(
                rate_bps=rate_bps,
                capacity_bits=capacity,
                initial_bits=int(capacity * initial_fill),
                clock=clock,
            )

        self._make_supply = supply_factory or default_supply
        self.links: dict[frozenset[str], KeySupply] = {}

    def link(self, a: str, b: str) -> KeySupply:
        """The link between KMEs `a` and `b` (a == b: SAEs of one KME share a local store)."""
        pair = frozenset((a, b))
        supply = self.links.get(pair)
        if supply is None:
            supply = self.links[pair] = self._make_supply(*sorted((a, b)))
        return supply

    # -- identity -------------------------------------------------------------------------

    def _caller(self, kme_id: str, caller: str | None) -> Kme:
        kme = self.kmes[kme_id]
        if caller is None:
            raise unauthorized("the client certificate does not identify an SAE")
        if caller not in kme.saes:
            raise unauthorized("the calling SAE is not attached to this KME")
        return kme

    def _known(self, sae: str, what: str) -> str:
        if sae not in self.home:
            raise ApiError(400, f"{what} is not known to this KME network")
        return self.home[sae]

    # -- Get status -----------------------------------------------------------------------

    def status(self, kme_id: str, caller: str | None, slave: str) -> dict[str, Any]:
        self._caller(kme_id, caller)
        target = self._known(slave, "slave_SAE_ID")
        lim = self.limits
        return {
            "source_KME_ID": kme_id,
            "target_KME_ID": target,
            "master_SAE_ID": caller,
            "slave_SAE_ID": slave,
            "key_size": lim.key_size,
            "stored_key_count": self.link(kme_id, target).available_bits() // lim.key_size,
            "max_key_count": lim.max_key_count,
            "max_key_per_request": lim.max_key_per_request,
            "max_key_size": lim.max_key_size,
            "min_key_size": lim.min_key_size,
            "max_SAE_ID_count": lim.max_sae_id_count,
        }

    # -- Get key --------------------------------------------------------------------------

    def enc_keys(
        self, kme_id: str, caller: str | None, slave: str, request: KeyRequest
    ) -> list[tuple[str, bytes]]:
        self._caller(kme_id, caller)
        assert caller is not None
        lim = self.limits
        number = 1 if request.number is None else request.number
        size = lim.key_size if request.size is None else request.size
        if number < 1:
            raise ApiError(400, "number must be at least 1")
        if number > lim.max_key_per_request:
            raise ApiError(400, f"number exceeds max_key_per_request ({lim.max_key_per_request})")
        if size % 8:
            raise ApiError(400, MSG_SIZE_MULTIPLE_OF_8)
        if not lim.min_key_size <= size <= lim.max_key_size:
            raise ApiError(
                400, f"size must be between {lim.min_key_size} and {lim.max_key_size} bits"
            )
        if request.extension_mandatory:
            raise ApiError(
                400,
                "not all extension_mandatory parameters are supported",
                [{"extension_mandatory_unsupported": name} for name in request.extension_mandatory],
            )
        extra = request.additional_slave_sae_ids
        if len(extra) > lim.max_sae_id_count:
            raise ApiError(
                400,
                f"additional_slave_SAE_IDs lists {len(extra)} SAEs, "
                f"max_SAE_ID_count is {lim.max_sae_id_count}",
            )
        slaves = (slave, *extra)
        if len(set(slaves)) != len(slaves):
            raise ApiError(400, "an SAE is named twice among the slave SAEs")
        if caller in slaves:
            raise ApiError(400, "the master SAE cannot be one of its own slave SAEs")
        targets: dict[str, set[str]] = {}
        self._known(slave, "slave_SAE_ID")
        for index, sae in enumerate(extra):
            self._known(sae, f"additional_slave_SAE_IDs[{index}]")
        for sae in slaves:
            targets.setdefault(self.home[sae], set()).add(sae)
        bits = number * size
        if bits > lim.store_bits:  # a 400, not a 503: waiting would never help
            raise ApiError(
                400,
                f"number * size ({bits} bits) exceeds what this KME can ever store "
                f"(max_key_count * key_size = {lim.store_bits} bits)",
            )
        primary = self.link(kme_id, self.home[slave])
        relays = [self.link(kme_id, t) for t in targets if t != self.home[slave]]
        for supply in (primary, *relays):
            if supply.available_bits() < bits:
                raise ApiError(
                    503, MSG_KEY_ACCESS_ERROR, [{"stored_bits": supply.available_bits()}]
                )
        try:
            material = primary.take(bits)
            for supply in relays:
                supply.take(bits)
        except SupplyExhausted:  # pragma: no cover - checked just above, single-threaded
            raise ApiError(503, MSG_KEY_ACCESS_ERROR) from None
        step = size // 8
        keys = list(zip(new_key_ids(number), split(material, step), strict=True))
        ready_at = self.clock() + self.sync_delay
        for target, names in targets.items():
            kme = self.kmes[target]
            named = tuple(sorted(names))
            parked = kme.parked
            for key_id, value in keys:
                parked[key_id] = (caller, value, named, named, ready_at)
            while len(kme.parked) > lim.max_key_count * 4:
                kme.parked.popitem(last=False)
        return keys

    # -- Get key with key IDs -------------------------------------------------------------

    def dec_keys(
        self, kme_id: str, caller: str | None, master: str, key_ids: list[str]
    ) -> list[tuple[str, bytes]]:
        kme = self._caller(kme_id, caller)
        assert caller is not None
        self._known(master, "master_SAE_ID")
        if not key_ids:
            raise ApiError(400, "key_IDs must list at least one key_ID")
        if len(key_ids) > self.limits.max_key_per_request:
            raise ApiError(
                400,
                f"key_IDs lists more than max_key_per_request ({self.limits.max_key_per_request})",
            )
        if len(set(key_ids)) != len(key_ids):
            raise ApiError(400, "a key_ID is listed twice")
        now = self.clock()
        found: list[Parked] = []
        for key_id in key_ids:
            parked = kme.parked.get(key_id)
            if parked is None or parked[_MASTER] != master or now < parked[_READY_AT]:
                raise ApiError(400, MSG_KEYS_NOT_FOUND)
            found.append(parked)
        for parked in found:
            if caller not in parked[_NAMED]:
                raise unauthorized("the calling SAE was not named in the Get key request")
        for parked in found:
            if caller not in parked[_WAITING]:
                raise ApiError(400, MSG_KEYS_NOT_FOUND)
        result = []
        for key_id, parked in zip(key_ids, found, strict=True):
            waiting = tuple(sae for sae in parked[_WAITING] if sae != caller)
            if waiting:  # other SAEs at this KME still have to fetch it (keeps its place)
                kme.parked[key_id] = (
                    master,
                    parked[_VALUE],
                    parked[_NAMED],
                    waiting,
                    parked[_READY_AT],
                )
            else:
                del kme.parked[key_id]
            result.append((key_id, parked[_VALUE]))
        return result

    def parked_count(self, kme_id: str) -> int:
        return len(self.kmes[kme_id].parked)

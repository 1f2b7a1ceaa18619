"""The latest swap of a device wins, whatever the arrival order, restarts or rebalances (issue 10).

Each story starts with the device online, so its first swap is deferred (100611). Swap A has
the CloudEvent ``time`` t1, swap B of the same device t2 > t1; other online devices are
deferred in between, so their deferrals interleave with the device's. Then the device goes
offline. Whatever happened in between, A ends ``rebind-failed`` ``SUPERSEDED``, B ends
``credential-updated``, the platform holds B's nodeId, and every input has exactly one outcome.

* (a) A deferred, then B arrives while A's next try is on the wire (so A comes back deferred
  after B was read and deferred);
* (b) the same, and the service is SIGKILLed and restarted between B's arrival and the device
  going offline;
* (c) the same, with a rebalance in between: a second replica joins, then the first leaves, so
  the device's partition certainly changes owner;
* (d) B arrives (and is deferred) before A: A must never be sent to the platform.

"Arrived" means handled and committed: the group's committed input offset is past the record
(read with an admin client, whatever the service's implementation).
"""

from __future__ import annotations

import signal
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.faults.conftest import FaultKit, ServiceProcess
from tests.simulator.control import SimulatorControl
from tests.support.accounting import Inputs, Produced, produce_inputs
from tests.support.events import Received, swap_event
from tests.support.group import committed_past, group_state
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

T1 = "2026-11-25T09:30:00Z"
T2 = "2026-11-25T09:31:00Z"
FAST_RETRY: dict[str, Any] = {"online_retry_initial_seconds": 1.0, "online_retry_max_seconds": 2.0}
OTHERS = 4
HELD = 3.0
"""Seconds the platform holds the device's call that is on the wire when B arrives."""
DEVICE_ONLINE = "100611"


@dataclass
class Story:
    kit: FaultKit
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    inputs: Inputs = field(default_factory=Inputs)

    @property
    def device(self) -> str:
        return f"sup-{self.tag}"

    @property
    def others(self) -> list[str]:
        return [f"sup-o{i}-{self.tag}" for i in range(OTHERS)]

    def node(self, name: str, device: str | None = None) -> str:
        return f"{device or self.device}-{name}"

    async def seed_online(self) -> None:
        await self.kit.control.seed_devices(
            [
                {"device_id": d, "node_id": f"old-{d}", "status": "ONLINE"}
                for d in [self.device, *self.others]
            ]
        )

    async def swap(self, device: str, name: str, ce_time: str) -> Produced:
        event_id = str(uuid.uuid4())
        node = self.node(name, device)
        value = swap_event(device, node, event_id=event_id, ce_time=ce_time)
        produced = await produce_inputs(
            self.kit.harness.bootstrap,
            self.kit.harness.topics.device_swapped,
            [(device.encode(), value, [], (event_id, device, node))],
        )
        self.inputs.records.extend(produced.records)
        return produced.records[0]

    async def puts(self, device: str | None = None) -> list[dict[str, Any]]:
        control: SimulatorControl = self.kit.control
        return await control.calls(operation="refresh_key", device_id=device)

    async def handled(self, *records: Produced, timeout: float = 60) -> None:
        """Each record was read and its answer (outcome or deferral) committed."""
        h = self.kit.harness

        async def committed() -> bool:
            for r in records:
                if not await committed_past(
                    h.bootstrap, h.group_id, h.topics.device_swapped, r.partition, r.offset
                ):
                    return False
            return True

        await wait_until(committed, timeout, f"input offsets committed past {records}")

    async def deferred(self, *records: Produced, timeout: float = 60) -> None:
        """Each record was sent to the platform, answered 100611, and handled."""
        for r in records:

            async def tried(r: Produced = r) -> bool:
                return any(
                    c["body"].get("nodeId") == r.node_id and c["error_code"] == DEVICE_ONLINE
                    for c in await self.puts(r.device_id)
                )

            await wait_until(tried, timeout, f"{r.node_id} answered 100611")
        await self.handled(*records, timeout=timeout)

    async def other_retries(self, count: int, timeout: float = 60) -> None:
        """``count`` more 100611 answers to the other devices: deferrals keep interleaving."""
        before = await self._other_online_answers()

        async def more() -> bool:
            return await self._other_online_answers() >= before + count

        await wait_until(more, timeout, f"{count} more retries of the other devices")

    async def _other_online_answers(self) -> int:
        others = set(self.others)
        return sum(
            1 for c in await self.puts() if c["device_id"] in others and c["error_code"] == "100611"
        )

    async def retried_after(self, produced: Produced, after_seq: int, timeout: float = 60) -> None:
        """The platform saw ``produced``'s nodeId again after call ``after_seq``."""

        async def again() -> bool:
            return any(
                c["seq"] > after_seq and c["body"].get("nodeId") == produced.node_id
                for c in await self.puts(produced.device_id)
            )

        await wait_until(again, timeout, f"{produced.node_id} retried after call {after_seq}")

    async def on_the_wire(self, produced: Produced, timeout: float = 30) -> None:
        """A call with ``produced``'s nodeId has reached the platform and is not answered yet."""

        async def held() -> bool:
            return any(
                c["status"] == 0 and c["body"].get("nodeId") == produced.node_id
                for c in await self.puts(produced.device_id)
            )

        await wait_until(held, timeout, f"a call with {produced.node_id} on the wire")

    async def group_settled(self, members: int, timeout: float = 60) -> None:
        h = self.kit.harness

        async def settled() -> bool:
            state, ids = await group_state(h.bootstrap, h.group_id)
            return state == "Stable" and len(ids) == members

        await wait_until(settled, timeout, f"the group Stable with {members} member(s)")

    def outcome_of(self, records: list[Received], produced: Produced) -> Received:
        mine = [r for r in records if r.data.get("swapEventId") == produced.event_id]
        assert len(mine) == 1, f"{produced.node_id}: {len(mine)} outcomes"
        return mine[0]


async def _start(story: Story, instance: str) -> ServiceProcess:
    proc = story.kit.process(instance=instance, **FAST_RETRY)
    await proc.start_ready()
    return proc


async def _finish(
    story: Story, label: str, a: Produced, b: Produced, *, a_never_sent: bool = False
) -> None:
    """Device offline, every input answered; check A, B, the platform; print the accounting."""
    control, kit = story.kit.control, story.kit
    reader = kit.reader
    assert reader is not None
    await control.set_status(story.device, "OFFLINE")

    async def both_answered() -> bool:
        ids = {r.data.get("swapEventId") for r in reader.records if r.value}
        return a.event_id in ids and b.event_id in ids

    await wait_until(both_answered, 60, "outcomes of A and B")
    for other in story.others:
        await control.set_status(other, "OFFLINE")
    await reader.wait_answered(story.inputs, timeout=60)
    accounting = await kit.finish(label, story.inputs)

    records = reader.records
    out_a, out_b = story.outcome_of(records, a), story.outcome_of(records, b)
    device = await control.device(story.device)
    sent = [(c["body"].get("nodeId"), c["error_code"]) for c in await story.puts(story.device)]
    h = kit.harness.topics

    def result(rec: Received) -> str:
        return (
            str(rec.data.get("errorCode")) if rec.topic == h.rebind_failed else "credential-updated"
        )

    names = {a.node_id: "A", b.node_id: "B"}
    figures = {
        "A": result(out_a),
        "B": result(out_b),
        "platform_node": names.get(device["node_id"], device["node_id"]),
        "puts_A": sum(1 for n, _ in sent if n == a.node_id),
        "puts_B": sum(1 for n, _ in sent if n == b.node_id),
        "applied": [names.get(p[0], p[0]) for p in device["applied_pairs"]],
    }
    print(accounting.line_with(**figures), flush=True)
    accounting.assert_clean()
    if a_never_sent:
        assert figures["puts_A"] == 0, f"the older swap A was sent to the platform: {sent}"
    assert out_a.topic == h.rebind_failed, f"A ended {out_a.topic}: {out_a.data}"
    assert out_a.data["errorCode"] == "SUPERSEDED", out_a.data
    assert out_b.topic == h.credential_updated, f"B ended {out_b.topic}: {out_b.data}"
    assert out_b.data["nodeId"] == b.node_id
    assert device["node_id"] == b.node_id, f"the platform holds {device['node_id']}: {sent}"
    assert device["applied_pairs"] == [[b.node_id, b.node_id]], (
        f"applied {device['applied_pairs']}, sent {sent}"
    )


async def _a_deferred_then_b(story: Story) -> tuple[Produced, Produced]:
    """A deferred, the others' deferrals interleaved, then B (newer) arrives and is handled."""
    o = story.others
    a = await story.swap(story.device, "A", T1)
    await story.deferred(a)
    first_others = [await story.swap(d, "x", T1) for d in o[:2]]
    await story.deferred(*first_others)
    # A re-deferred behind the other devices' deferrals.
    seq = max(c["seq"] for c in await story.puts(o[1]))
    await story.retried_after(a, seq)
    # B arrives while A's next try is on the wire (held by the platform): A comes back deferred
    # after B was read, and after B's own deferral.
    await story.kit.control.inject_latency(
        HELD, operation="refresh_key", device_id=story.device, times=1
    )
    await story.on_the_wire(a)
    b = await story.swap(story.device, "B", T2)
    later_others = [await story.swap(d, "x", T1) for d in o[2:]]
    await story.handled(b, *later_others)
    await story.other_retries(2 * OTHERS)
    return a, b


@pytest.mark.timeout(240)
async def test_a_newer_swap_supersedes_a_deferred_one(
    fault_kit: FaultKit, process_logs: None
) -> None:
    story = Story(fault_kit)
    await story.seed_online()
    await fault_kit.start_reader()
    await _start(story, "sa0")
    a, b = await _a_deferred_then_b(story)
    await _finish(story, "supersede-a-deferred-then-b", a, b)


@pytest.mark.timeout(240)
async def test_supersede_survives_a_sigkill_between_the_newer_swap_and_offline(
    fault_kit: FaultKit, process_logs: None
) -> None:
    story = Story(fault_kit)
    await story.seed_online()
    await fault_kit.start_reader()
    service = await _start(story, "sb0")
    a, b = await _a_deferred_then_b(story)
    await service.kill()
    await service.start_ready()
    await story.other_retries(2 * OTHERS)  # the restarted service works the deferrals again
    await _finish(story, "supersede-b-sigkill", a, b)


@pytest.mark.timeout(300)
async def test_supersede_survives_a_rebalance_between_the_newer_swap_and_offline(
    fault_kit: FaultKit, process_logs: None
) -> None:
    story = Story(fault_kit)
    await story.seed_online()
    await fault_kit.start_reader()
    first = await _start(story, "sc0")
    a, b = await _a_deferred_then_b(story)
    await _start(story, "sc1")  # rebalance 1: the partitions are shared by two replicas
    await story.group_settled(2)
    await story.other_retries(OTHERS)
    first.signal(signal.SIGTERM)  # rebalance 2: every partition moves to the second replica
    assert await first.wait_exit(45) == 0
    await story.group_settled(1)
    await story.other_retries(2 * OTHERS)
    await _finish(story, "supersede-c-rebalance", a, b)


@pytest.mark.timeout(240)
async def test_an_older_swap_arriving_after_a_newer_deferred_one_is_never_applied(
    fault_kit: FaultKit, process_logs: None
) -> None:
    story = Story(fault_kit)
    o = story.others
    await story.seed_online()
    await fault_kit.start_reader()
    await _start(story, "sd0")
    b = await story.swap(story.device, "B", T2)
    await story.deferred(b)
    first_others = [await story.swap(d, "x", T1) for d in o[:2]]
    await story.deferred(*first_others)
    a = await story.swap(story.device, "A", T1)  # older, arriving later
    later_others = [await story.swap(d, "x", T1) for d in o[2:]]
    await story.handled(a, *later_others)
    await story.other_retries(2 * OTHERS)
    await _finish(story, "supersede-d-out-of-order", a, b, a_never_sent=True)

"""The scheduler's pure decision (`engine.schedule.decide`), fed values: no threads, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.plan import STRATEGIES, Extent, plan
from engine.schedule import Consumer, Decision, Situation, TrailState, Wait, decide

PLAN = tuple(Extent("f", i * 10, 10, i * 10) for i in range(6))  # [0,10) ... [50,60)


def offsets(extents: tuple[Extent, ...]) -> list[int]:
    return [e.offset for e in extents]


def test_without_a_consumer_it_fills_the_free_slots_in_plan_order() -> None:
    d = decide(PLAN, Situation(next=0, in_flight=0, concurrency=2))
    assert offsets(d.submit) == [0, 10] and d.skip == () and d.next == 2
    assert d.wait is Wait.EVENT and d.drop is None
    d = decide(PLAN, Situation(next=2, in_flight=1, concurrency=2))
    assert offsets(d.submit) == [20] and d.next == 3
    assert decide(PLAN, Situation(next=3, in_flight=2, concurrency=2)).submit == ()


def test_extents_the_consumer_passed_are_skipped_not_read() -> None:
    d = decide(PLAN, Situation(next=0, in_flight=0, concurrency=1, consumer=Consumer(25)))
    assert offsets(d.skip) == [0, 10] and offsets(d.submit) == [20] and d.next == 3


def test_skipping_waits_for_a_free_slot_like_submitting() -> None:
    d = decide(PLAN, Situation(next=0, in_flight=1, concurrency=1, consumer=Consumer(60)))
    assert d.skip == () and d.submit == () and d.next == 0 and d.wait is Wait.EVENT


def test_a_finished_consumer_skips_everything_and_ends_the_prefetch() -> None:
    d = decide(
        PLAN, Situation(next=1, in_flight=0, concurrency=8, consumer=Consumer(finished=True))
    )
    assert offsets(d.skip) == [10, 20, 30, 40, 50] and d.submit == ()
    assert d.wait is Wait.NOTHING


def test_the_window_holds_extents_back() -> None:
    s = Situation(next=0, in_flight=0, concurrency=8, consumer=Consumer(5), window=20)
    d = decide(PLAN, s)
    assert offsets(d.submit) == [0, 10] and d.next == 2 and d.wait is Wait.CONSUMER
    # An extent longer than the window still goes, once the front reaches its start.
    big = (Extent("g", 0, 100, 0), Extent("g", 100, 100, 100))
    d = decide(big, replace(s, consumer=Consumer(0), window=10))
    assert offsets(d.submit) == [0] and d.next == 1


def test_a_slower_rank_holds_the_window_and_is_polled() -> None:
    consumer = Consumer(position=30, slowest=0)
    trail = TrailState(lag=100, step=100)
    s = Situation(next=3, in_flight=0, concurrency=8, consumer=consumer, window=20, trail=trail)
    d = decide(PLAN, s)
    assert d.submit == () and d.wait is Wait.POLL  # the slowest rank wakes nobody: poll
    d = decide(PLAN, replace(s, consumer=Consumer(position=30, slowest=30)))
    assert offsets(d.submit) == [30, 40] and d.wait is Wait.CONSUMER


def test_drops_follow_the_slowest_rank_a_trail_behind() -> None:
    trail = TrailState(lag=10, step=20)
    s = Situation(
        next=6, in_flight=1, concurrency=2, consumer=Consumer(45, slowest=35), trail=trail
    )
    d = decide(PLAN, s)
    assert d.drop == (0, 25) and d.trail == TrailState(10, 20, done=25, busy=True)
    assert decide(PLAN, replace(s, trail=d.trail)).drop is None  # one drop at a time
    idle = replace(d.trail, busy=False)
    assert decide(PLAN, replace(s, trail=idle)).drop is None  # less than a step further
    d2 = decide(PLAN, replace(s, trail=idle, consumer=Consumer(60, slowest=55)))
    assert d2.drop == (25, 45)


def test_nothing_is_dropped_while_a_rank_is_unknown_or_after_the_end() -> None:
    trail = TrailState(lag=0, step=1)
    s = Situation(
        next=6, in_flight=1, concurrency=2, consumer=Consumer(60, slowest=None), trail=trail
    )
    assert decide(PLAN, s).drop is None
    assert decide(PLAN, replace(s, consumer=Consumer(60, finished=True, slowest=60))).drop is None


def test_a_running_drop_keeps_the_prefetch_alive() -> None:
    busy = TrailState(lag=0, step=1, done=60, busy=True)
    s = Situation(next=6, in_flight=0, concurrency=2, consumer=Consumer(60, slowest=60), trail=busy)
    assert decide(PLAN, s).wait is Wait.EVENT
    assert decide(PLAN, replace(s, trail=replace(busy, busy=False))).wait is Wait.NOTHING
    assert decide((), Situation(next=0, in_flight=0, concurrency=1)).wait is Wait.NOTHING


# ------------------------------------------------------------------ property tests


@dataclass
class Sim:
    """A run of the scheduler against a made-up world: reads end, the consumer moves."""

    extents: tuple[Extent, ...]
    concurrency: int
    window: int | None
    has_consumer: bool
    trail: TrailState | None
    position: int = 0
    slowest: int | None = 0
    finished: bool = False
    next: int = 0
    in_flight: list[Extent] = field(default_factory=list)
    submitted: list[Extent] = field(default_factory=list)
    skipped: list[Extent] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)

    def situation(self) -> Situation:
        consumer = None
        if self.has_consumer:
            slowest = self.slowest if self.trail is not None and not self.finished else None
            consumer = Consumer(self.position, self.finished, slowest)
        return Situation(
            self.next, len(self.in_flight), self.concurrency, consumer, self.window, self.trail
        )

    def step(self) -> Decision:
        s = self.situation()
        d = decide(self.extents, s)
        check(self.extents, s, d)
        self.submitted += d.submit
        self.skipped += d.skip
        self.in_flight += d.submit
        if d.drop is not None:
            self.dropped.append(d.drop)
        self.trail, self.next = d.trail, d.next
        return d


def check(extents: tuple[Extent, ...], s: Situation, d: Decision) -> None:
    """The rules one decision must keep, whatever the situation."""
    assert s.in_flight + len(d.submit) <= max(s.concurrency, s.in_flight)
    decided = sorted(d.submit + d.skip, key=lambda e: e.position)
    assert decided == list(extents[s.next : d.next]), "a contiguous run, in plan order"
    c = s.consumer
    for ext in d.skip:
        assert c is not None and (c.finished or ext.end <= c.position), "skips only passed ones"
    for ext in d.submit:
        if s.window is not None:
            front = c.front if c is not None else 0
            assert ext.end <= front + max(s.window, ext.length), "never beyond the window"
    if d.drop is not None:
        lo, hi = d.drop
        assert s.trail is not None and not s.trail.busy and c is not None and not c.finished
        assert c.slowest is not None, "never while a rank's position is unknown"
        assert lo == s.trail.done and hi - lo >= s.trail.step
        assert hi <= min(c.position, c.slowest) - s.trail.lag, "only behind the trail"
        assert d.trail is not None and d.trail.busy and d.trail.done == hi
    else:
        assert d.trail == s.trail
    finished = d.next == len(extents) and s.in_flight + len(d.submit) == 0
    assert (d.wait is Wait.NOTHING) == (finished and not (d.trail and d.trail.busy))


@st.composite
def sims(draw: st.DrawFn) -> Sim:
    sizes = draw(st.lists(st.integers(0, 40_000), max_size=5))
    axis = sum(sizes)
    world = draw(st.integers(1, 4))
    extents = plan(
        [(f"f{i}", n) for i, n in enumerate(sizes)],
        draw(st.integers(0, world - 1)),
        world,
        strategy=draw(st.sampled_from(STRATEGIES)),
        chunk_bytes=draw(st.sampled_from([4096, 8192, 12288])),
    )
    window = draw(st.none() | st.integers(1, 50_000))
    has_consumer = window is not None or draw(st.booleans())
    trail = None
    if window is not None and draw(st.booleans()):
        lag, step = draw(st.integers(0, axis)), draw(st.integers(1, max(1, axis // 2)))
        trail = TrailState(lag=lag, step=step)
    return Sim(tuple(extents), draw(st.integers(1, 4)), window, has_consumer, trail)


@settings(max_examples=300, deadline=None)
@given(sim=sims(), data=st.data())
def test_a_whole_prefetch_keeps_every_rule(sim: Sim, data: st.DataObject) -> None:
    total = sum(e.length for e in sim.extents) + 1
    ends = [e.end for e in sim.extents]
    for _ in range(data.draw(st.integers(0, 60))):
        sim.step()
        action = data.draw(st.sampled_from(["read", "move", "slowest", "drop", "finish"]))
        if action == "read" and sim.in_flight:
            sim.in_flight.pop(data.draw(st.integers(0, len(sim.in_flight) - 1)))
        elif action == "move" and sim.has_consumer:  # this rank, and the others behind it
            sim.position = data.draw(st.integers(sim.position, max(ends, default=0) + total))
            sim.slowest = data.draw(st.integers(sim.slowest or 0, sim.position))
        elif action == "slowest":
            sim.slowest = data.draw(st.none() | st.integers(0, sim.position))
        elif action == "drop" and sim.trail is not None:
            sim.trail = replace(sim.trail, busy=False)
        elif action == "finish" and sim.has_consumer:
            sim.finished = True
    # Then the world lets it end: the loader finishes, reads and drops complete.
    sim.finished = sim.finished or sim.has_consumer
    for _ in range(4 * len(sim.extents) + 4):
        if sim.step().wait is Wait.NOTHING:
            break
        sim.in_flight.clear()
        if sim.trail is not None:
            sim.trail = replace(sim.trail, busy=False)
    else:
        raise AssertionError("the prefetch never ended")
    decided = sorted(sim.submitted + sim.skipped, key=lambda e: e.position)
    assert decided == list(sim.extents), "every planned extent submitted or skipped, once"
    for (_, hi), (lo, _) in zip(sim.dropped, sim.dropped[1:], strict=False):
        assert hi == lo, "drops follow each other without overlap"

"""The steps of one prefetch before its first read: from files and options to a `Setup`.

`Preparation.run` resolves the files, tunes the stripe size, concurrency and backend for
the filesystem, gathers what the local ranks load (`engine.needs`), plans this rank's
share, sizes the window and the trail, opens the local ranks' board and starts the pace.
What it chose is kept in `Preparation.settled` and logged in one line by the
`Prefetcher` (`engine.engine`), which then hands the `Setup` to a `Scheduler`
(`engine.scheduler`). `Preparation.release` gives back what the steps took (the board,
the published needs, the pace's place as the node's leader) when the prefetch ends.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engine.adapt import MIN_READ_BYTES
from engine.backends import ProcessBackend, SendfileBackend, resolve_backend
from engine.cursor import ConsumerCursor, RankBoard
from engine.memory import auto_window, trail_bytes
from engine.needs import NodeNeeds, gather, needed_bytes, normalize, run_ends, union_bytes
from engine.options import PrefetchOptions
from engine.pace import Pace
from engine.plan import Extent, Regions, ResolvedFile, plan, resolve_files, split_extents
from engine.pool import DaemonPool
from engine.report import Tally
from engine.schedule import TrailState
from engine.scheduler import Setup
from engine.settle import Choice, Settled, is_auto, settle_trail, settle_tuning
from engine.tuning import Tuning, auto_tuning, stream_limit
from engine.warm import OpenFile

__all__ = ["Preparation"]

log = logging.getLogger(__name__)


def _files_and_starts(
    resolved: Sequence[ResolvedFile], extents: Sequence[Extent]
) -> tuple[dict[str, OpenFile], dict[str, int]]:
    """The planned files (each with its count of extents) and each file's start on the axis."""
    counts: dict[str, int] = {}
    for ext in extents:
        counts[ext.path] = counts.get(ext.path, 0) + 1
    files: dict[str, OpenFile] = {}
    starts: dict[str, int] = {}
    pos = 0
    for meta in resolved:
        starts[meta.path] = pos
        pos += meta.size
        if meta.path in counts:
            files[meta.path] = OpenFile(meta, counts[meta.path])
    return files, starts


class Preparation:
    """The set-up of one rank's prefetch. Run it once, release it at the end.

    Args:
        files: the checkpoint's files.
        rank: this process's local rank.
        world: number of local ranks.
        options: validated options.
        tally: the prefetch's counters (failures to resolve, files, planned bytes,
            notes and the window are recorded in it).
        needs: the byte ranges this rank loads (`engine.plan.Regions`), or None for
            everything.

    Example:
        >>> import asyncio
        >>> from engine.options import PrefetchOptions
        >>> from engine.pool import DaemonPool
        >>> prep = Preparation(["/etc/hostname"], 0, 1, PrefetchOptions(), Tally())
        >>> pool = DaemonPool(2)
        >>> setup = asyncio.run(prep.run(pool, cursor=None))
        >>> len(setup.resolved), prep.settled is not None
        (1, True)
        >>> prep.release(); pool.shutdown()
    """

    def __init__(
        self,
        files: Sequence[str | os.PathLike[str]],
        rank: int,
        world: int,
        options: PrefetchOptions,
        tally: Tally,
        *,
        needs: Regions | None = None,
    ) -> None:
        self.files = list(files)
        self.rank = rank
        self.world = world
        self.options = options
        self.needs = needs
        self._tally = tally
        self.backend, self.backend_reason = resolve_backend(options.backend)
        #: The stripe size and concurrency (None before `run` tuned them).
        self.tuning: Tuning | None = None
        #: The run-time adaptation, when concurrency is "auto".
        self.pace: Pace | None = None
        #: What the prefetch settled before its first read (None before `run` got there).
        self.settled: Settled | None = None
        self._own_board: RankBoard | None = None  # a board no cursor finishes
        self._needs_slot: Any = None  # this rank's published needs, removed at release

    async def run(self, pool: DaemonPool, *, cursor: ConsumerCursor | None) -> Setup:
        """Resolve, tune and plan; size the window and the trail; share the position.

        Args:
            pool: the prefetch's thread pool (every blocking call runs on it).
            cursor: the loader's position; None when nobody reports one.

        Returns:
            The `Setup` its `Scheduler` carries out.
        """
        resolved, failures = await pool.run(
            functools.partial(resolve_files, self.files, order=self.options.order)
        )
        for failure in failures:
            self._tally.record(failure)
        self._tally.files = len(resolved)
        tuning = self.tuning = await self._tune(pool, resolved)
        rank, world, node_needs = await self._node_needs(pool, resolved)
        extents = tuple(
            plan(
                resolved, rank, world, strategy=self.options.strategy,
                chunk_bytes=tuning.chunk_bytes, needs=node_needs,
            )
        )  # fmt: skip
        piece = 0
        if tuning.max_concurrency is not None and tuning.chunk_bytes > MIN_READ_BYTES:
            piece = MIN_READ_BYTES
            extents = tuple(split_extents(extents, piece))
        files, starts = _files_and_starts(resolved, extents)
        self._tally.total = sum(e.length for e in extents)
        window_choice = self._window(tuning, sum(m.size for m in resolved))
        window = self._tally.window = window_choice.value
        trail_choice = self._trail(tuning, window, has_consumer=cursor is not None)
        lag = trail_choice.value
        trail = None if lag is None else TrailState(lag, step=max(tuning.chunk_bytes, lag // 4))
        self.settled = Settled(
            Choice(self.backend.name, self.backend_reason), tuning, window_choice, trail_choice
        )
        board = None
        if self.world > 1 and (trail is not None or tuning.max_concurrency is not None):
            board = await self._open_board(pool, resolved)
        if trail is not None and board is not None:
            assert cursor is not None  # a trail needs a consumer
            cursor.share(board, starts)  # the position, for the other local ranks
        elif board is not None:
            self._own_board = board  # only for the node's rate: finished at release
        if tuning.max_concurrency is not None:
            self.pace = Pace(
                tuning.max_concurrency, tuning.chunk_bytes, self.world, board,
                streams=tuning.concurrency, rank=self.rank,
            )  # fmt: skip
        ends = run_ends(node_needs, {f.path: f.size for f in resolved}) if node_needs else {}
        return Setup(
            tuple(resolved), extents, files, starts, tuning, window, trail, self.pace,
            piece, ends,
        )  # fmt: skip

    def fall_back(self, reason: str) -> None:
        """Read in this process (`SendfileBackend`): the chosen backend cannot run."""
        self.backend, self.backend_reason = SendfileBackend(), f"fallback: {reason}"
        if self.settled is not None:
            backend = Choice(self.backend.name, self.backend_reason)
            self.settled = replace(self.settled, backend=backend)

    def release(self) -> None:
        """Give back what the set-up took: the pace's lead, the board, the published needs."""
        if self.pace is not None:
            self.pace.stop()
        if self._own_board is not None:
            self._own_board.finish()
        if self._needs_slot is not None:
            self._needs_slot.remove()

    async def _tune(self, pool: DaemonPool, resolved: Sequence[ResolvedFile]) -> Tuning:
        """The stripe size and concurrency: as given, or chosen for the filesystem.

        With ``concurrency="auto"`` the filesystem's default is only where run-time
        adaptation (`engine.pace`) starts. With ``backend="auto"`` a network or FUSE
        filesystem is read from a reader process (`engine.reader_process`).
        """
        opt = self.options
        first = resolved[0] if resolved else None
        auto = None
        if is_auto(opt.chunk_bytes) or is_auto(opt.concurrency) or is_auto(opt.backend):
            auto = await pool.run(  # the mount table, else statfs (may block): on the pool
                functools.partial(
                    auto_tuning, first.path if first else None, self.world,
                    dev=first.dev if first else None,
                )
            )  # fmt: skip
        if is_auto(opt.backend) and auto is not None and auto.network:
            self.backend, self.backend_reason = (
                ProcessBackend(),
                ("auto: network/FUSE filesystem -> " + ProcessBackend.description),
            )
        bound = stream_limit(self.world) if is_auto(opt.concurrency) else None
        return settle_tuning(opt.chunk_bytes, opt.concurrency, auto, bound=bound)

    async def _node_needs(
        self, pool: DaemonPool, resolved: list[ResolvedFile]
    ) -> tuple[int, int, list[NodeNeeds | None] | None]:
        """(rank, world, needs) to plan with: what every local rank loads, gathered; or,
        when a rank did not say in time, this rank alone warming all it loads."""
        if self.needs is None:
            return self.rank, self.world, None
        sizes = {f.path: f.size for f in resolved}
        own = await pool.run(normalize, self.needs, sizes)
        node, self._needs_slot = await pool.run(gather, resolved, self.rank, self.world, own)
        total = sum(sizes.values())
        if node is None:
            self._tally.notes.append(
                f"needs: the other local ranks' were unknown; warmed all "
                f"{needed_bytes(own, sizes)} of {total} bytes this rank loads"
            )
            return 0, 1, [own]
        union = union_bytes(node, sizes)
        self._tally.notes.append(f"needs: the node loads {union} of {total} bytes")
        return self.rank, self.world, node

    def _window(self, tuning: Tuning, checkpoint_bytes: int) -> Choice[int | None]:
        """The window in bytes: as given, or chosen from the memory budget for "auto"."""
        window = self.options.window_bytes
        if not is_auto(window):
            return Choice(window, "given" if window is not None else "none given")
        # Two stripe units per rank, so every rank always has something to read.
        min_bytes = 2 * tuning.chunk_bytes * self.world
        return Choice(*auto_window(checkpoint_bytes, min_bytes=min_bytes))

    def _trail(
        self, tuning: Tuning, window: int | None, *, has_consumer: bool
    ) -> Choice[int | None]:
        """The trail that goes with `window` (only where a consumer reports its position)."""
        lag = 0
        if window is not None:
            lag = trail_bytes(window, chunk_bytes=tuning.chunk_bytes, world=self.world)
        return settle_trail(window, lag, has_consumer=has_consumer)

    async def _open_board(self, pool: DaemonPool, resolved: list[ResolvedFile]) -> RankBoard | None:
        """The local ranks' shared board (`RankBoard`), or None where it cannot be made."""
        try:
            return await pool.run(RankBoard.open, resolved, self.rank, self.world)
        except (OSError, ValueError) as exc:
            log.info(
                "prefetch rank %d/%d: cannot share positions and rates with the other "
                "ranks (%s); consumed bytes are dropped behind this rank's own position, "
                "and the pace follows this rank's own rate",
                self.rank,
                self.world,
                exc,
            )
            return None

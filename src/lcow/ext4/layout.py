"""Block placement for the compact writer: where superblock copies sit, and a bump allocator.

With sparse_super, group 0 and groups 1, 3**k, 5**k and 7**k hold a superblock and a copy of
the group descriptor table at their first block. The writer streams file data before it
knows how many groups the image will have, so it reserves room for the descriptor table of
the largest image it accepts at each of those places and allocates every other block in
increasing order. Reserved blocks the final table does not need stay free.
"""

import bisect
from dataclasses import dataclass, field

from lcow.errors import InvalidArgumentError
from lcow.ext4 import format as fmt


def backup_groups(group_count: int) -> list[int]:
    """Return the groups other than 0 that hold a superblock copy, in increasing order."""
    groups = {1} if group_count > 1 else set()
    for base in (3, 5, 7):
        power = base
        while power < group_count:
            groups.add(power)
            power *= base
    return sorted(groups)


def descriptor_blocks(group_count: int) -> int:
    """Count the blocks of a group descriptor table for ``group_count`` groups."""
    return -(-group_count // fmt.GROUP_DESCS_PER_BLOCK)


@dataclass(frozen=True, slots=True)
class Region:
    """A reserved range of blocks [start, end) at the head of a group with a superblock."""

    group: int
    start: int
    end: int


@dataclass(slots=True)
class BlockAllocator:
    """Hand out blocks in increasing order, skipping the superblock regions.

    Blocks skipped to keep a run contiguous, and blocks released later, are recorded as free
    so the bitmaps can say so.
    """

    max_blocks: int
    regions: list[Region]
    next_block: int = 0
    free_runs: list[tuple[int, int]] = field(default_factory=list)  # (start, length)
    _region_starts: list[int] = field(default_factory=list)
    # A range [start, end) of blocks below max_blocks that holds no region, so allocate()
    # can skip the region search there. Regions never move, so the range stays valid.
    _clear_start: int = 0
    _clear_end: int = 0

    @classmethod
    def for_max_size(cls, max_size_bytes: int) -> "BlockAllocator":
        max_blocks = max_size_bytes // fmt.BLOCK_SIZE_BYTES
        if max_blocks < fmt.BLOCKS_PER_GROUP // 8:
            raise InvalidArgumentError(
                f"invalid maximum image size {max_size_bytes} bytes: the minimum is "
                f"{fmt.BLOCKS_PER_GROUP // 8 * fmt.BLOCK_SIZE_BYTES} bytes"
            )
        if max_blocks > 2**32 - 1:
            raise InvalidArgumentError(
                f"invalid maximum image size {max_size_bytes} bytes: without the 64bit "
                f"feature ext4 addresses at most {(2**32 - 1) * fmt.BLOCK_SIZE_BYTES} bytes"
            )
        max_groups = -(-max_blocks // fmt.BLOCKS_PER_GROUP)
        reserved = 1 + descriptor_blocks(max_groups)
        regions = [Region(0, 0, reserved)]
        for group in backup_groups(max_groups):
            start = group * fmt.BLOCKS_PER_GROUP
            regions.append(Region(group, start, start + reserved))
        allocator = cls(max_blocks=max_blocks, regions=regions, next_block=reserved)
        allocator._region_starts = [region.start for region in regions]
        return allocator

    def _region_after(self, block: int) -> Region | None:
        index = bisect.bisect_right(self._region_starts, block)
        return self.regions[index] if index < len(self.regions) else None

    def _region_at(self, block: int) -> Region | None:
        index = bisect.bisect_right(self._region_starts, block) - 1
        if index >= 0 and block < self.regions[index].end:
            return self.regions[index]
        return None

    def _check_limit(self, end: int) -> None:
        if end > self.max_blocks:
            raise InvalidArgumentError(
                f"the layer needs more than {self.max_blocks * fmt.BLOCK_SIZE_BYTES} bytes, "
                "the maximum image size; raise the limit to convert it"
            )

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """Allocate ``count`` blocks as few runs as the reserved regions allow."""
        start = self.next_block
        if self._clear_start <= start and start + count <= self._clear_end:
            self.next_block = start + count
            return [(start, count)] if count else []
        runs = self._allocate_runs(count)
        self._find_clear_range()
        return runs

    def _find_clear_range(self) -> None:
        start = self.next_block
        if self._region_at(start) is not None:
            self._clear_start = self._clear_end = 0
            return
        following = self._region_after(start)
        self._clear_start = start
        self._clear_end = min(following.start if following else self.max_blocks, self.max_blocks)

    def _allocate_runs(self, count: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        while count:
            region = self._region_at(self.next_block)
            if region is not None:
                self.next_block = region.end
            following = self._region_after(self.next_block)
            room = following.start - self.next_block if following else count
            take = min(count, room)
            self._check_limit(self.next_block + take)
            runs.append((self.next_block, take))
            self.next_block += take
            count -= take
        return runs

    def allocate_contiguous(self, count: int) -> int:
        """Allocate ``count`` consecutive blocks and return the first."""
        while True:
            region = self._region_at(self.next_block)
            if region is not None:
                self.next_block = region.end
            following = self._region_after(self.next_block)
            if following is None or following.start - self.next_block >= count:
                break
            if following.start - self.next_block > 0:
                self.free_runs.append((self.next_block, following.start - self.next_block))
            self.next_block = following.end
        start = self.next_block
        self._check_limit(start + count)
        self.next_block += count
        return start

    def release(self, runs: list[tuple[int, int]]) -> None:
        """Mark runs that were allocated but are no longer referenced as free."""
        self.free_runs.extend(runs)

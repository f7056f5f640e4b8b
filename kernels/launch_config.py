"""Launch configurations of the fused kernel: what a config is, the heuristic default for a
B×L problem, and the candidates the GPU tuner times (``launch.tune``).

Every config computes the same per-element gradient bits; only the loss's summation order
differs between them.
"""

from __future__ import annotations

from typing import NamedTuple

import triton

from .switches import forced_config_label


class LaunchConfig(NamedTuple):
    """One launch configuration: path ``row`` (W1 [+ W2] tiles hold whole rows) or ``split``
    (W1-wide column tiles, two kernels); BLOCK_B rows per program; Triton's num_warps and
    num_stages (the kernels have no software-pipelined loop, so num_stages only matters to
    the final ticket reduction and is kept for completeness)."""

    path: str
    block_b: int
    w1: int
    w2: int
    num_warps: int
    num_stages: int = 1

    def label(self) -> str:
        tiles = f"{self.w1}+{self.w2}" if self.w2 else f"{self.w1}"
        return f"{self.path}:bb{self.block_b}:w{tiles}:nw{self.num_warps}:ns{self.num_stages}"

    @staticmethod
    def parse(text: str) -> "LaunchConfig":
        """Inverse of ``label`` (for the PML_KERNEL_CONFIG override), e.g. ``split:bb1:w4096:nw8:ns1``."""
        try:
            path, bb, w, nw, ns = text.strip().split(":")
            w1, _, w2 = w[1:].partition("+")
            cfg = LaunchConfig(path, int(bb[2:]), int(w1), int(w2 or 0), int(nw[2:]), int(ns[2:]))
        except (ValueError, IndexError):
            raise ValueError(f"kernel config must look like 'row:bb4:w512+128:nw4:ns1' or "
                             f"'split:bb1:w4096:nw8:ns1', got {text!r}") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        def pow2(v):
            return v >= 1 and v & (v - 1) == 0
        if self.path not in ("row", "split"):
            raise ValueError(f"config path must be 'row' or 'split', got {self.path!r}")
        if not (pow2(self.block_b) and pow2(self.w1) and self.w1 >= 16 and (self.w2 == 0 or (pow2(self.w2) and self.w2 >= 16))
                and pow2(self.num_warps) and self.num_warps <= 32 and self.num_stages >= 1):
            raise ValueError(f"config {self.label()}: block sizes and num_warps must be powers of two, tiles >= 16")
        if max(self.w1, self.w2) > ROW_MAX_LANES:  # the packed N_e/|S| counts need tiles < 2**15
            raise ValueError(f"config {self.label()}: tiles must be <= {ROW_MAX_LANES} wide")
        if self.path == "split" and (self.w2 or self.block_b != 1):
            raise ValueError(f"config {self.label()}: a split config has one tile width and block_b 1")


ROW_MAX_LANES = 16384  # rows up to this many labels stay in one program (row path)
_GPU_TILE = 4096       # elements per program the small-L row heuristic aims at
_GPU_MIN_PROGRAMS = 264  # ~2 programs per SM on an H100/H200
INTERP_TILE = 16384    # the interpreter runs programs one after another: fewer, larger ones


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def row_tiles(L: int) -> tuple[int, int]:
    """(W1, W2): one or two power-of-two tiles covering L labels with the least waste.

    9605 -> (8192, 2048), 600 -> (512, 128), 1024 -> (1024, 0). A second tile narrower than 64
    is not worth it (80 -> (128, 0)): a tile must span at least 32 lanes per warp, or Triton
    lays the two tiles out differently and converts (and recomputes) between the layouts.
    """
    p = max(16, next_pow2(L))
    if p == 16 or p == L:
        return p, 0
    lo = p // 2
    w2 = max(16, next_pow2(L - lo))
    return (lo, w2) if lo + w2 < p and w2 >= 64 else (p, 0)


def _row_warps(bb: int, w1: int, w2: int, hi: int = 32) -> int:
    """~16 elements per thread, and every warp along the columns of both tiles (W >= 32·warps)."""
    cap = max(1, min(w1, w2 or w1) // 32)
    return max(1, min(_warps_for(bb * (w1 + w2), lo=1, hi=hi), cap))


def _warps_for(elems: int, lo: int = 2, hi: int = 16) -> int:
    """~16 elements per thread: enough loads in flight without spilling."""
    w = next_pow2(max(1, elems // 512))
    return max(lo, min(hi, w))


def heuristic_config(B: int, L: int, *, interpret: bool, block_l: int | None = None,
                     window: bool = False) -> LaunchConfig:
    """The default (untuned) config; ``block_l`` forces the tile width (tests: split path).

    ``window``: the split path's aligned-window addressing (contiguous inputs, L % 16 != 0),
    where a tile owns 16 columns fewer than its width.
    """
    need = L  # the row path addresses rows plainly (see device_kernels._row_kernel)
    if block_l is not None:
        if block_l < 16 or block_l & (block_l - 1) or block_l > ROW_MAX_LANES:
            raise ValueError(f"block_l must be a power of two in [16, {ROW_MAX_LANES}], got {block_l!r}")
        if window and L + 15 <= block_l and B == 1:
            return LaunchConfig("row", 1, block_l, 0, 1 if interpret else _row_warps(1, block_l, 0))
        if need <= block_l and not (window and B == 1):
            w1, w2 = block_l, 0
        elif window and block_l <= 16:
            raise ValueError(f"block_l must be > 16 here (the aligned window uses 16 slots), got {block_l}")
        elif interpret:
            return LaunchConfig("split", 1, block_l, 0, 1)
        else:
            return LaunchConfig("split", 1, block_l, 0, _warps_for(block_l, hi=8))
    else:
        w1, w2 = row_tiles(need)
        if w1 + w2 > ROW_MAX_LANES:
            if interpret:
                return LaunchConfig("split", 1, ROW_MAX_LANES, 0, 1)
            return LaunchConfig("split", 1, 4096, 0, 8)
    width = w1 + w2
    if interpret:
        bb = floor_pow2(min(max(1, INTERP_TILE // width), next_pow2(B)))
    else:
        bb = floor_pow2(min(max(1, _GPU_TILE // width), next_pow2(B)))
        while bb > 1 and triton.cdiv(B, bb) < _GPU_MIN_PROGRAMS:
            bb //= 2
    if bb == 1 and window and block_l is None:  # one row per program: 1-D, windowed, 15 slots more
        w1, w2 = row_tiles(L + 15)
        if w1 + w2 > ROW_MAX_LANES:
            return LaunchConfig("split", 1, ROW_MAX_LANES if interpret else 4096, 0, 1 if interpret else 8)
    return LaunchConfig("row", bb, w1, w2, 1 if interpret else _row_warps(bb, w1, w2))


def floor_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)).bit_length() - 1)


def _split_widths(L: int, window: bool) -> list[int]:
    """Split tile widths by the least padding (K tiles of W slots own K·(W - 16·window) columns)."""
    def lanes(w):
        return triton.cdiv(L, w - 16 if window else w) * w
    return sorted((2048, 4096, 8192), key=lambda w: (lanes(w), -w))


def candidate_configs(B: int, L: int, *, window: bool = False) -> list[LaunchConfig]:
    """What the GPU tuner times for a B×L problem (first entry = the heuristic): the row path
    with two warp counts against the split path's two best-fitting tile widths."""
    base = heuristic_config(B, L, interpret=False, window=window)
    if L <= 2048:
        return [base]  # small rows: the time is host overhead, not the kernel
    cands = [base]
    if base.path == "row":  # whole rows in registers vs. the split path's small tiles
        cands += [base._replace(num_warps=nw) for nw in (16, 32)
                  if nw != base.num_warps and nw <= _row_warps(1, base.w1, base.w2)][:1]
        w = _split_widths(L, window)[0]
        cands += [LaunchConfig("split", 1, w, 0, w // 512), LaunchConfig("split", 1, w, 0, w // 1024)]
    else:  # 16 and 32 elements per thread, and the least padded width
        w = _split_widths(L, window)[0]
        cands += [LaunchConfig("split", 1, 4096, 0, 4), LaunchConfig("split", 1, 8192, 0, 8), LaunchConfig("split", 1, w, 0, w // 1024)]
    out = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out[:4]



def check_fits(cfg: LaunchConfig, L: int, window: bool) -> None:
    """A forced config must hold this problem's rows (``window``: aligned-window addressing)."""
    cfg.check()
    need = L + 15 if window and cfg.block_b == 1 else L  # block_b 1 rows are windowed
    if cfg.path == "row" and cfg.w1 + cfg.w2 < need:
        raise ValueError(f"config {cfg.label()} holds {cfg.w1 + cfg.w2} slots per row, fewer than the {need} "
                         f"this L = {L} needs")
    if cfg.path == "split" and window and cfg.w1 <= 16:
        raise ValueError(f"config {cfg.label()}: split tiles must be wider than 16 here")

def forced_config() -> LaunchConfig | None:
    """The config PML_KERNEL_CONFIG forces, or None."""
    text = forced_config_label()
    return LaunchConfig.parse(text) if text else None

"""Surface extraction from an occupancy function: dense reference and sparse coarse-to-fine.

    mesh, stats = extract_surface(occupancy_fn, resolution=512)

`occupancy_fn` maps (N, 3) float32 points in the bbox frame to (N,) occupancies, inside where
occupancy > threshold. It may be a network, so the sparse method spends queries only where the
surface is: the query count grows with the surface area (res^2), not the volume (res^3).

Grid: `resolution` cells per axis, sample (i, j, k) at b_min + (i, j, k) * (b_max - b_min) /
resolution for i, j, k in 0..resolution (both ends included); axis 0 is x, 1 y, 2 z.

Sparse method (after MonoPort, ECCV 2020), with resolution = coarse_resolution * 2^k:
  1. Evaluate the whole coarse grid ((coarse_resolution + 1)^3 points).
  2. Refine to twice the resolution. New samples first get a guess: the multilinear
     interpolation of the coarse values, whose sign is exact wherever the coarse cell is
     uniform (all corners on one side). Then evaluate seeds near the surface:
       dilation=None (default): the midpoints of the coarse edges whose end signs differ;
       dilation=k >= 0: every corner of the children of the coarse cells whose corner signs
         differ ("mixed" cells), plus a ring of k fine cells (MonoPort's band).
  3. Track the surface: a mixed cell (signs of its corners differ) with a corner that is not
     evaluated yet gets that corner evaluated; look again, until every mixed cell has all
     eight corners evaluated. This walks along the surface from the seeds (and out of the band
     where the band was too thin), so only the corners of the surface cells are queried, and
     marching cubes only ever interpolates between evaluated values.
  4. Repeat 2-3 up to `resolution`, then run marching cubes per block and merge the vertices
     shared by neighbouring blocks into one mesh (watertight where the shape is closed).
A part of the shape thinner than the coarse spacing and not touching the rest can be missed
(as with any coarse-to-fine method): choose coarse_resolution for the thinnest part.

Storage: blocks of BLOCK^3 samples, allocated only where a sample was evaluated; no dense
point grid and no dense volume exist. A 1.8-units-tall human at 512 keeps about 25 MB of
blocks (peak process growth about 150 MB), against 13 GiB for the official dense grid.
"""

from __future__ import annotations

import itertools
import time

import mcubes
import numpy as np

from model.reconstruction.config import check_sparse_resolution
import torch
import trimesh

from model.reconstruction.mesh_cleanup import empty_mesh_arrays, keep_largest_component, merge_vertices

DEFAULT_BBOX = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
METHODS = ("sparse", "dense")

# Samples per block and axis. Even, so that a fine block's samples map into one coarse block.
BLOCK = 32
# The eight corner offsets of a cell, (8, 3).
CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), dtype=np.int64)
# Blocks per marching-cubes / scan chunk: bounds the transient (chunk, 33, 33, 33) arrays to ~10 MB each.
CHUNK_BLOCKS = 64
# Surface-tracking rounds per level before giving up (each round walks >= 1 cell further).
MAX_TRACK_ROUNDS = 256


def extract_surface(
    occupancy_fn,
    resolution=256,
    bbox=DEFAULT_BBOX,
    method="sparse",
    threshold=0.5,
    batch_points=65536,
    largest_component=False,
    coarse_resolution=32,
    dilation=None,
):
    """Mesh of the surface {occupancy = threshold}, as a (trimesh.Trimesh, stats dict).

    occupancy_fn: (N, 3) float32 tensor of points in the bbox frame -> (N,) occupancies;
        called with at most `batch_points` points at a time, under torch.no_grad().
    resolution: cells per axis (resolution + 1 samples per axis). Sparse needs
        resolution = coarse_resolution * 2^k.
    bbox: ((x_min, y_min, z_min), (x_max, y_max, z_max)), the grid's extent.
    method: "sparse" (coarse to fine, few queries) or "dense" (every sample, the reference).
    largest_component: keep only the connected component with the most faces.
    coarse_resolution, dilation: see `evaluate_grid`.

    The mesh is in the bbox frame with outward normals (positive volume for a closed shape).
    Nothing inside, or everything inside, gives an empty mesh.
    stats: points_evaluated, points_dense ((resolution + 1)^3), seconds_eval (inside
    occupancy_fn), seconds_grid (evaluation plus bookkeeping), seconds_mesh, seconds_total,
    resolution, method, vertices, faces, and for sparse the per-level figures of `evaluate_grid`.
    """
    start = time.perf_counter()
    grid = evaluate_grid(
        occupancy_fn, resolution, bbox, method, threshold, batch_points,
        coarse_resolution=coarse_resolution, dilation=dilation,
    )
    mesh, stats = mesh_from_grid(grid, largest_component)
    stats["seconds_total"] = time.perf_counter() - start
    return mesh, stats


def mesh_from_grid(grid, largest_component=False):
    """Marching cubes over an evaluated grid: (trimesh.Trimesh in the bbox frame, stats).

    Needs no occupancy function, so it can run in another process than `evaluate_grid`
    (after `grid.detach()`). stats: the grid's, plus seconds_mesh, vertices, faces.
    """
    mesh_start = time.perf_counter()
    vertices, faces = grid.marching_cubes()
    vertices, faces = merge_vertices(vertices, faces)
    if largest_component:
        vertices, faces = keep_largest_component(vertices, faces)
    # Index units -> bbox frame.
    vertices = grid.b_min + vertices * grid.step
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    stats = dict(grid.stats)
    stats.update(seconds_mesh=time.perf_counter() - mesh_start, vertices=len(mesh.vertices), faces=len(mesh.faces))
    return mesh, stats


def evaluate_grid(
    occupancy_fn,
    resolution=256,
    bbox=DEFAULT_BBOX,
    method="sparse",
    threshold=0.5,
    batch_points=65536,
    coarse_resolution=32,
    dilation=None,
):
    """Occupancy samples on the (resolution + 1)^3 grid: a `DenseGrid` or a `SparseGrid`.

    Both give `.dense()` (the (R+1, R+1, R+1) float32 values, fill values where the sparse
    method did not query), `.signs()` (inside = value > threshold), `.marching_cubes()`
    (vertices in index units, faces) and `.stats`.

    coarse_resolution: cells per axis of the fully evaluated first level (sparse only). Its
        spacing, (b_max - b_min) / coarse_resolution, is the thinnest feature sure to be found.
    dilation (sparse only): None (default) seeds each level at the midpoints of the coarse
        sign changes and lets the surface tracking query the corners of the surface cells
        only (fewest points). An int k >= 0 queries MonoPort's band instead: all corners of
        the children of the mixed coarse cells plus a ring of k fine cells; more points, and a
        better chance to catch a separate piece of surface lying close to the surface.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    resolution = int(resolution)
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of cells per axis, got {resolution}")
    if int(batch_points) < 1:
        raise ValueError(f"batch_points must be >= 1, got {batch_points}")
    b_min, b_max = _parse_bbox(bbox)
    evaluator = _Evaluator(occupancy_fn, b_min, (b_max - b_min) / resolution, int(batch_points))
    if method == "dense":
        return DenseGrid(evaluator, resolution, b_min, b_max, threshold)
    check_sparse_resolution(resolution, int(coarse_resolution))
    if dilation is not None:
        dilation = int(dilation)
        if dilation < 0:
            raise ValueError(f"dilation must be None or >= 0 cells, got {dilation}")
    return SparseGrid(evaluator, resolution, b_min, b_max, threshold, int(coarse_resolution), dilation)


def _parse_bbox(bbox):
    box = np.asarray(bbox, dtype=np.float64)
    if box.shape != (2, 3) or not np.all(box[1] > box[0]):
        raise ValueError(f"bbox must be ((x_min, y_min, z_min), (x_max, y_max, z_max)) with max > min, got {bbox}")
    return box[0], box[1]


class _Evaluator:
    """Calls occupancy_fn on grid indices in batches; counts points, calls and seconds.

    Points are computed from final-resolution indices by one formula for both methods, so the
    dense and the sparse grid query bit-identical points.
    """

    def __init__(self, fn, b_min, step, batch_points):
        self.fn, self.b_min, self.step, self.batch_points = fn, b_min, step, batch_points
        self.points = 0
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, index):
        """(N, 3) int64 final-resolution indices -> (N,) float32 occupancies."""
        start = time.perf_counter()
        out = np.empty(len(index), dtype=np.float32)
        for lo in range(0, len(index), self.batch_points):
            chunk = index[lo : lo + self.batch_points]
            points = torch.from_numpy((self.b_min + chunk * self.step).astype(np.float32))
            with torch.no_grad():
                values = torch.as_tensor(self.fn(points))
            values = values.detach().reshape(-1)
            if values.numel() != len(chunk):
                raise ValueError(
                    f"occupancy_fn returned {values.numel()} values for {len(chunk)} points; expected shape ({len(chunk)},)"
                )
            out[lo : lo + len(chunk)] = values.to("cpu", torch.float32).numpy()
            self.calls += 1
        self.points += len(index)
        self.seconds += time.perf_counter() - start
        return out


class _GridBase:
    """What both grids share: frame, threshold and fill values (only signs matter for fills)."""

    def __init__(self, evaluator, resolution, b_min, b_max, threshold, method):
        self.resolution = resolution
        self.b_min, self.b_max = b_min, b_max
        self.step = (b_max - b_min) / resolution
        # Signs are decided in float32, as marching cubes sees the float32 values.
        self.threshold = float(np.float32(threshold))
        self.fill_inside = np.float32(self.threshold + 1.0)
        self.fill_outside = np.float32(self.threshold - 1.0)
        self.method = method
        self._evaluator = evaluator
        self.stats = {}

    def detach(self):
        """Drop the occupancy function (often a network) once evaluation is done, so the grid
        pickles small and can be meshed in another process."""
        self._evaluator = None

    def signs(self):
        """(R+1, R+1, R+1) bool, inside = value > threshold (small resolutions: it is dense)."""
        return self.dense() > self.threshold

    def _base_stats(self, seconds_grid):
        ev = self._evaluator
        return dict(
            method=self.method,
            resolution=self.resolution,
            points_evaluated=int(ev.points),
            points_dense=(self.resolution + 1) ** 3,
            calls=int(ev.calls),
            seconds_eval=ev.seconds,
            seconds_grid=seconds_grid,
        )


class DenseGrid(_GridBase):
    """Every sample evaluated: the reference. Holds (R+1)^3 float32 values (540 MB at 512)."""

    def __init__(self, evaluator, resolution, b_min, b_max, threshold):
        super().__init__(evaluator, resolution, b_min, b_max, threshold, "dense")
        start = time.perf_counter()
        n = resolution + 1
        self.values = np.empty(n**3, dtype=np.float32)
        # Indices are generated per batch (x-slabs), never as a dense point grid.
        slab = max(1, evaluator.batch_points // (n * n))
        for i0 in range(0, n, slab):
            keys = np.arange(i0 * n * n, min(n, i0 + slab) * n * n, dtype=np.int64)
            self.values[keys[0] : keys[-1] + 1] = evaluator(_unravel(keys, resolution))
        self.values = self.values.reshape(n, n, n)
        self.stats = self._base_stats(time.perf_counter() - start)

    def dense(self):
        return self.values

    def marching_cubes(self):
        """(V, 3) float64 vertices in index units, (F, 3) int64 faces, outward for inside > threshold."""
        if not _has_sign_change(self.values > self.threshold):
            return empty_mesh_arrays()
        vertices, faces = mcubes.marching_cubes(self.values, self.threshold)
        return vertices, faces.astype(np.int64)


class SparseGrid(_GridBase):
    """Coarse-to-fine samples (module docstring); values live in blocks near the surface only.

    stats adds: coarse_resolution, dilation, level_resolutions, level_points (queries per
    level), level_track_rounds, level_blocks (allocated blocks per level), level_mixed_cells,
    blocks_mb (final level's block storage), mc_blocks, track_capped.
    """

    def __init__(self, evaluator, resolution, b_min, b_max, threshold, coarse_resolution, dilation):
        super().__init__(evaluator, resolution, b_min, b_max, threshold, "sparse")
        start = time.perf_counter()
        self.dilation = dilation
        per_level = dict(level_resolutions=[], level_points=[], level_track_rounds=[], level_blocks=[], level_mixed_cells=[])
        self.track_capped = False

        parent, n = None, coarse_resolution
        while True:
            level = _Level(n, resolution // n, self)
            before = evaluator.points
            if parent is None:
                # The coarse level: every sample.
                self._evaluate(level, None, _unravel(np.arange((n + 1) ** 3, dtype=np.int64), n))
            else:
                level.uniform = level.uniform_from(parent)
                if dilation is None:
                    seeds = _edge_midpoints(mixed, parent)
                else:
                    seeds = _children_samples(mixed, dilation, n)
                self._evaluate(level, parent, seeds)
            mixed, rounds = self._track(level, parent)
            per_level["level_resolutions"].append(n)
            per_level["level_points"].append(int(evaluator.points - before))
            per_level["level_track_rounds"].append(rounds)
            per_level["level_blocks"].append(level.count)
            per_level["level_mixed_cells"].append(len(mixed))
            if n == resolution:
                break
            # Only the last level is kept: peak storage is this level plus its parent.
            parent, n = level, n * 2
        self.level = level
        self.mixed_cells = mixed
        self.stats = self._base_stats(time.perf_counter() - start)
        self.stats.update(
            coarse_resolution=coarse_resolution,
            dilation=dilation,
            blocks_mb=level.nbytes() / 2**20,
            track_capped=self.track_capped,
            **per_level,
        )

    def _evaluate(self, level, parent, coords):
        """Make the (N, 3) level samples `coords` evaluated: copy from the parent or query."""
        if len(coords) == 0:
            return
        level.allocate(_unique_coords(coords // BLOCK, level.nb), parent)
        slot, local = level.locate(coords)
        todo = ~level.real[slot, local[:, 0], local[:, 1], local[:, 2]]
        slot, local = slot[todo], local[todo]
        level.values[slot, local[:, 0], local[:, 1], local[:, 2]] = self._evaluator(coords[todo] * level.scale)
        level.real[slot, local[:, 0], local[:, 1], local[:, 2]] = True

    def _track(self, level, parent):
        """Evaluate unevaluated corners of mixed cells until there are none -> (mixed cells (M, 3), rounds).

        After one full scan, each round rescans only the blocks whose cells can have changed:
        owners of cells with a newly evaluated corner and of cells in newly allocated blocks.
        """
        mixed, missing = level.scan(level.candidate_blocks())
        rounds = 0
        while len(missing):
            if rounds == MAX_TRACK_ROUNDS:
                self.track_capped = True
                break
            first_new = level.count
            self._evaluate(level, parent, missing)
            rounds += 1
            changed = np.concatenate([missing // BLOCK, level.blocks[first_new:]])
            touched = level.cell_owners(changed)
            rescanned, missing = level.scan(touched)
            stale = _block_marks(touched, level.nb)[_ravel(mixed // BLOCK, level.nb - 1)]
            mixed = np.concatenate([mixed[~stale], rescanned])
        return mixed, rounds

    def surface_cell_corners(self):
        """The distinct corners of the final surface cells: the values any method must know to
        build this mesh (a lower bound on points_evaluated; for benchmarks, not computed by default)."""
        corners = (self.mixed_cells[:, None, :] + CORNERS[None, :, :]).reshape(-1, 3)
        return len(np.unique(_ravel(corners, self.resolution)))

    def dense(self):
        """(R+1, R+1, R+1) float32: evaluated values where queried, elsewhere a value with the
        inferred sign (the interpolated guess, or threshold +- 1 in unallocated blocks).

        Built x-slab by x-slab; meant for tests at small resolutions.
        """
        n = self.resolution + 1
        out = np.empty((n, n, n), dtype=np.float32)
        yz = _unravel(np.arange(n * n, dtype=np.int64), n - 1)[:, 1:]
        for i in range(n):
            coords = np.concatenate([np.full((n * n, 1), i, dtype=np.int64), yz], axis=1)
            out[i] = self.level.values_at(coords).reshape(n, n)
        return out

    def marching_cubes(self):
        """(V, 3) float64 vertices in index units, (F, 3) int64 faces, one marching cubes per block.

        Only blocks owning a mixed cell are meshed; the vertices on shared block faces are
        duplicated here and merged by `merge_vertices`.
        """
        blocks = _unique_coords(self.mixed_cells // BLOCK, self.level.nb)
        self.stats["mc_blocks"] = len(blocks)
        if len(blocks) == 0:
            return empty_mesh_arrays()
        level, parts_v, parts_f, offset = self.level, [], [], 0
        for lo in range(0, len(blocks), CHUNK_BLOCKS):
            chunk = blocks[lo : lo + CHUNK_BLOCKS]
            values, _ = level.halo(chunk)
            # Samples past the grid's last one are padding: crop them, as the dense grid ends there.
            extent = np.minimum(BLOCK + 1, level.n + 1 - chunk * BLOCK)
            for k, origin in enumerate(chunk * BLOCK):
                ex, ey, ez = extent[k]
                volume = np.ascontiguousarray(values[k, :ex, :ey, :ez])
                vertices, faces = mcubes.marching_cubes(volume, self.threshold)
                if len(faces):
                    parts_v.append(vertices + origin)
                    parts_f.append(faces.astype(np.int64) + offset)
                    offset += len(vertices)
        if not parts_f:
            return empty_mesh_arrays()
        return np.concatenate(parts_v), np.concatenate(parts_f)


class _Level:
    """The samples of one level: n cells per axis, (n + 1)^3 samples, stored by block.

    Sample (i, j, k) of this level is final-resolution sample (i, j, k) * scale.
    Block b owns samples b * BLOCK + [0, BLOCK) per axis: every sample is stored once, so a
    sample shared by two blocks' cells has one value. Samples past n are padding (never
    evaluated). A block is allocated once one of its samples is evaluated; all samples of an
    unallocated block have the sign `uniform[b]` (see `uniform_from`).

    slot: (nb, nb, nb) int64 slot of each block in `values`, -1 if unallocated.
    values: (slots, BLOCK, BLOCK, BLOCK) float32, evaluated values, or guesses with the inferred sign.
    real: same shape, bool, True where evaluated (or copied from an evaluated parent sample).
    """

    def __init__(self, n, scale, grid):
        self.n, self.scale = n, scale
        self.threshold, self.fill_inside, self.fill_outside = grid.threshold, grid.fill_inside, grid.fill_outside
        self.nb = -(-(n + 1) // BLOCK)  # blocks per axis that own samples
        self.nb_cells = -(-n // BLOCK)  # blocks per axis that own cells (a cell's owner owns its lower corner)
        self.slot = np.full((self.nb,) * 3, -1, dtype=np.int64)
        self.uniform = np.zeros((self.nb,) * 3, dtype=bool)
        self.values = np.empty((0, BLOCK, BLOCK, BLOCK), dtype=np.float32)
        self.real = np.empty((0, BLOCK, BLOCK, BLOCK), dtype=bool)
        self.blocks = np.zeros((0, 3), dtype=np.int64)  # (slots, 3) block coords of each slot
        self.count = 0

    def nbytes(self):
        return self.values.nbytes + self.real.nbytes + self.slot.nbytes + self.uniform.nbytes

    def fill(self, inside):
        return np.where(inside, self.fill_inside, self.fill_outside)

    # -- lookups ---------------------------------------------------------------------------

    def locate(self, coords):
        """(N, 3) sample coords of allocated blocks -> slots (N,), local coords (N, 3)."""
        block = coords // BLOCK
        return self.slot[block[:, 0], block[:, 1], block[:, 2]], coords % BLOCK

    def values_at(self, coords):
        """(N, 3) sample coords (any) -> (N,) float32: stored values, uniform fill if unallocated."""
        block, local = coords // BLOCK, coords % BLOCK
        slot = self.slot[block[:, 0], block[:, 1], block[:, 2]]
        stored = self.values[np.maximum(slot, 0), local[:, 0], local[:, 1], local[:, 2]] if self.count else 0
        return np.where(slot >= 0, stored, self.fill(self.uniform[block[:, 0], block[:, 1], block[:, 2]]))

    def uniform_from(self, parent):
        """(nb, nb, nb) bool: the sign of each block if it stays unallocated.

        Fine block b covers coarse samples b * BLOCK / 2 + [0, BLOCK / 2): if it holds no
        evaluated sample, no mixed coarse cell touches its samples, so they all share the sign
        of the coarse cells there, e.g. that of coarse sample b * BLOCK / 2.
        """
        b = _unravel(np.arange(self.nb**3, dtype=np.int64), self.nb - 1)
        return (parent.values_at(b * (BLOCK // 2)) > self.threshold).reshape((self.nb,) * 3)

    # -- allocation ------------------------------------------------------------------------

    def allocate(self, blocks, parent):
        """Allocate the (K, 3) unique blocks not yet allocated, initialised from `parent`.

        Even samples (those of the parent level) keep the parent's value and evaluated flag;
        odd samples get the fill of the parent sample at index // 2, whose coarse cell is
        uniform wherever the fine sample is not evaluated.
        """
        blocks = blocks[self.slot[blocks[:, 0], blocks[:, 1], blocks[:, 2]] < 0]
        if len(blocks) == 0:
            return
        values = np.empty((len(blocks), BLOCK, BLOCK, BLOCK), dtype=np.float32)
        real = np.zeros(values.shape, dtype=bool)
        if parent is None:
            values[:] = self.fill_outside
        else:
            for lo in range(0, len(blocks), CHUNK_BLOCKS):
                sl = slice(lo, lo + CHUNK_BLOCKS)
                values[sl], real[sl] = self._from_parent(blocks[sl], parent)
        self.slot[blocks[:, 0], blocks[:, 1], blocks[:, 2]] = self.count + np.arange(len(blocks))
        self.values = np.concatenate([self.values, values])
        self.real = np.concatenate([self.real, real])
        self.blocks = np.concatenate([self.blocks, blocks])
        self.count += len(blocks)

    def _from_parent(self, blocks, parent):
        """(K, 3) fine blocks -> initial values, real flags, each (K, BLOCK, BLOCK, BLOCK).

        Values are the multilinear interpolation of the parent's (the coarse samples at index
        // 2 and (index + 1) // 2 per axis): exact copies on even samples, which keep the
        parent's evaluated flag, and a sign guess elsewhere. Where the coarse cell is uniform
        the guess is its sign; inside mixed coarse cells it is the best cheap guess, and any
        cell it makes look mixed gets its corners evaluated by the surface tracking.
        """
        half = BLOCK // 2
        coarse_values, coarse_real = parent.halo(blocks // 2)  # (K, BLOCK+1, ...) coarse samples
        # Fine block b covers coarse samples (b % 2) * BLOCK / 2 + [0, BLOCK / 2] of its parent's halo.
        start = (blocks % 2) * half
        k = np.arange(len(blocks))[:, None, None, None]
        ix, iy, iz = (start[:, a, None] + np.arange(half + 1)[None, :] for a in range(3))
        index = (k, ix[:, :, None, None], iy[:, None, :, None], iz[:, None, None, :])
        values = _upsample2(coarse_values[index])
        real = np.zeros(values.shape, dtype=bool)
        real[:, ::2, ::2, ::2] = coarse_real[index][:, :half, :half, :half]
        return values, real

    # -- cells -----------------------------------------------------------------------------

    def candidate_blocks(self):
        """(K, 3) blocks that may own a mixed cell: allocated ones and their lower neighbours.

        A cell whose corners all lie in unallocated blocks is not mixed: neighbouring
        unallocated blocks share one sign (a coarse sign change between them would have been
        seeded, allocating one of them). So a mixed cell has a corner in an allocated block,
        and its owner holds its lower corner: that block or one below it on some axes.
        """
        return self.cell_owners(self.blocks)

    def cell_owners(self, blocks):
        """(K, 3) blocks -> (U, 3) unique blocks owning a cell with a corner in one of them."""
        if len(blocks) == 0:
            return np.zeros((0, 3), np.int64)
        blocks = _unique_coords(blocks, self.nb)  # callers pass one row per changed sample
        near = (blocks[:, None, :] - CORNERS[None, :, :]).reshape(-1, 3)
        near = near[np.all((near >= 0) & (near < self.nb_cells), axis=1)]
        return _unique_coords(near, self.nb)

    def halo(self, blocks):
        """(K, 3) blocks -> values, real, each (K, BLOCK+1, BLOCK+1, BLOCK+1): the block's own
        samples plus the first layer of its +x, +y, +z neighbours, i.e. all corners of its cells."""
        k, size = len(blocks), BLOCK + 1
        values = np.empty((k, size, size, size), dtype=np.float32)
        real = np.empty((k, size, size, size), dtype=bool)
        for offset in CORNERS:
            # Offset 0 on an axis: the neighbour's BLOCK samples go to [0, BLOCK); 1: its first one to BLOCK.
            src = tuple(slice(0, 1) if o else slice(0, BLOCK) for o in offset)
            dst = (slice(None),) + tuple(slice(BLOCK, size) if o else slice(0, BLOCK) for o in offset)
            nb = blocks + offset
            inside_grid = np.all(nb < self.nb, axis=1)
            nb = np.minimum(nb, self.nb - 1)
            slot = np.where(inside_grid, self.slot[nb[:, 0], nb[:, 1], nb[:, 2]], -1)
            fill = self.fill(inside_grid & self.uniform[nb[:, 0], nb[:, 1], nb[:, 2]])[:, None, None, None]
            allocated = (slot >= 0)[:, None, None, None]
            if self.count:
                safe = np.maximum(slot, 0)
                values[dst] = np.where(allocated, self.values[(safe,) + src], fill)
                real[dst] = allocated & self.real[(safe,) + src]
            else:
                values[dst] = fill
                real[dst] = False
        return values, real

    def scan(self, blocks):
        """Mixed cells owned by the (K, 3) blocks -> (mixed cells (M, 3), unevaluated corners (T, 3)).

        Mixed: corner signs differ. The corners returned are those of mixed cells that are not
        evaluated yet: the surface left the evaluated band there.
        """
        mixed_parts, missing_parts = [], []
        cell = np.arange(BLOCK)
        for lo in range(0, len(blocks), CHUNK_BLOCKS):
            chunk = blocks[lo : lo + CHUNK_BLOCKS]
            values, real = self.halo(chunk)
            inside = values > self.threshold
            any_in = np.zeros((len(chunk), BLOCK, BLOCK, BLOCK), dtype=bool)
            all_in = np.ones_like(any_in)
            all_real = np.ones_like(any_in)
            for ox, oy, oz in CORNERS:
                corner = (slice(None), slice(ox, ox + BLOCK), slice(oy, oy + BLOCK), slice(oz, oz + BLOCK))
                any_in |= inside[corner]
                all_in &= inside[corner]
                all_real &= real[corner]
            # Cells exist below n only; past it the halo holds padding.
            origin = chunk * BLOCK
            valid = [(origin[:, a, None] + cell[None, :]) < self.n for a in range(3)]
            mixed = any_in & ~all_in & valid[0][:, :, None, None] & valid[1][:, None, :, None] & valid[2][:, None, None, :]
            k, i, j, l = np.nonzero(mixed)
            cells = origin[k] + np.stack([i, j, l], axis=1)
            mixed_parts.append(cells)
            unsure = ~all_real[k, i, j, l]
            if unsure.any():
                k, i, j, l, cells_u = k[unsure], i[unsure], j[unsure], l[unsure], cells[unsure]
                for ox, oy, oz in CORNERS:
                    open_corner = ~real[k, i + ox, j + oy, l + oz]
                    missing_parts.append(cells_u[open_corner] + (ox, oy, oz))
        mixed = np.concatenate(mixed_parts) if mixed_parts else np.zeros((0, 3), np.int64)
        missing = np.concatenate(missing_parts) if missing_parts else np.zeros((0, 3), np.int64)
        if len(missing):
            missing = _unravel(np.unique(_ravel(missing, self.n)), self.n)
        return mixed, missing


# -- helpers ---------------------------------------------------------------------------------


def _ravel(coords, n):
    """(N, 3) sample coords of a grid with n cells per axis -> (N,) int64 keys (x-major)."""
    m = n + 1
    return (coords[:, 0] * m + coords[:, 1]) * m + coords[:, 2]


def _unravel(keys, n):
    """(N,) int64 keys -> (N, 3) int64 sample coords of a grid with n cells per axis."""
    m = n + 1
    return np.stack([keys // (m * m), (keys // m) % m, keys % m], axis=1)


def _block_marks(coords, size):
    """(N, 3) block coords in [0, size) -> (size^3,) bool, True at each given block's key (`_ravel`).

    A dense table: O(N) where sorting is O(N log N), and block grids are small (65^3 at 2048)."""
    marks = np.zeros(size**3, dtype=bool)
    marks[_ravel(coords, size - 1)] = True
    return marks


def _unique_coords(coords, size):
    """(N, 3) block coords in [0, size) -> (U, 3) unique rows, sorted x-major."""
    return _unravel(np.flatnonzero(_block_marks(coords, size)), size - 1)


# The twelve edges of a cell as pairs of rows of CORNERS that differ on one axis.
EDGES = np.array([(i, j) for i in range(8) for j in range(i + 1, 8) if np.abs(CORNERS[i] - CORNERS[j]).sum() == 1])


def _edge_midpoints(mixed, parent):
    """(M, 3) mixed coarse cells -> (N, 3) unique fine samples at the midpoints of their edges
    whose end signs differ: the surface crosses each such edge, so one of its two halves is a
    sign change of the fine grid, a seed from which the tracking walks along the surface."""
    if len(mixed) == 0:
        return np.zeros((0, 3), np.int64)
    inside = np.stack([parent.values_at(mixed + c) > parent.threshold for c in CORNERS], axis=1)  # (M, 8)
    crossed = inside[:, EDGES[:, 0]] != inside[:, EDGES[:, 1]]  # (M, 12)
    cell, edge = np.nonzero(crossed)
    # Fine index of the midpoint of coarse edge (c + a, c + b): 2c + a + b.
    midpoints = 2 * mixed[cell] + CORNERS[EDGES[edge, 0]] + CORNERS[EDGES[edge, 1]]
    n = 2 * parent.n
    return _unravel(np.unique(_ravel(midpoints, n)), n)


def _children_samples(mixed, dilation, n):
    """(M, 3) mixed coarse cells -> (N, 3) unique fine samples to evaluate (fine grid of n cells).

    The children of coarse cell c span fine samples 2c .. 2c + 2; the ring adds `dilation` on
    every side. Built in chunks so the transient key array stays small.
    """
    if len(mixed) == 0:
        return np.zeros((0, 3), np.int64)
    span = np.arange(-dilation, 3 + dilation)
    offsets = np.stack(np.meshgrid(span, span, span, indexing="ij"), axis=-1).reshape(-1, 3)
    chunk = max(1, 4_000_000 // len(offsets))
    keys = []
    for lo in range(0, len(mixed), chunk):
        samples = (2 * mixed[lo : lo + chunk, None, :] + offsets[None, :, :]).reshape(-1, 3)
        keys.append(np.unique(_ravel(np.clip(samples, 0, n), n)))
    return _unravel(np.unique(np.concatenate(keys)), n)


def _upsample2(coarse):
    """(K, h+1, h+1, h+1) -> (K, 2h, 2h, 2h): multilinear values at the fine samples 0 .. 2h-1."""
    out = coarse
    for axis in (1, 2, 3):
        lo = np.take(out, np.arange(out.shape[axis] - 1), axis=axis)
        hi = np.take(out, np.arange(1, out.shape[axis]), axis=axis)
        # Interleave coarse samples (even) and midpoints (odd) along the axis.
        out = np.stack([lo, (lo + hi) * np.float32(0.5)], axis=axis + 1)
        shape = list(lo.shape)
        shape[axis] *= 2
        out = out.reshape(shape)
    return out


def _has_sign_change(inside):
    return bool(inside.any()) and not bool(inside.all())



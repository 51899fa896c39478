"""The procedural town of the synthetic world (dataset/synthetic.py): a lattice of roads, the blocks between them,
street furniture, and every agent as an oriented box.

World coordinates are metres, x east, y north, z up, on flat ground. Static things are painted into a raster of
TOWN_RESOLUTION cells covering [-half_size, half_size]^2: one ground class per cell (it fills the ground slab
GROUND_SLAB) and two vertical layers ('solid': buildings, walls, poles, trunks, barriers, cones, clutter; 'crown':
tree crowns, which hang over the solid layer), each a (class, first slab, end slab) triple per cell. A frame reads
the raster by nearest neighbour at its voxel centres, so a static voxel keeps its world position from frame to
frame. Buildings are hollow shells (walls and a roof): Occ3D's labels come from LiDAR points, so real frames have
no building interiors either. Vehicles, cyclists and pedestrians (parked ones included) are `Agents`: boxes moving
at constant velocity.
"""
import dataclasses

import numpy as np

from dataset.constants import CLASS_ID, FREE_CLASS, GRID_SHAPE, VOXEL_SIZE

TOWN_RESOLUTION = 0.2     # metres per raster cell: half a voxel, so nearest-neighbour lookup stays voxel-precise
# The real Occ3D frame (tests/data/occ3d_sample) has all of its driveable_surface in the lowest slab
GROUND_SLAB = 0
TOP_SLAB = GRID_SHAPE[2]  # end slab of anything that reaches the top of the grid
LANE_WIDTH = 3.5
PARKING_WIDTH = 2.5
MEDIAN_WIDTH = 1.0
WALL_THICKNESS = 0.8      # two voxels: a thinner wall could fall between the voxel centres of a rotated frame
ROAD_SPACING = (55.0, 100.0)   # metres between parallel roads
TOWN_MARGIN = 70.0             # metres kept between any ego position and the edge of the raster (view radius 57 m)

# Agent boxes: length, width, height in metres (about nuScenes' mean box sizes; riders included)
AGENT_SIZES = {
    'car': (4.6, 1.95, 1.7), 'truck': (7.0, 2.5, 3.3), 'bus': (11.0, 2.9, 3.5), 'trailer': (10.0, 2.6, 3.6),
    'construction_vehicle': (6.5, 2.8, 3.2), 'motorcycle': (2.1, 0.8, 1.5), 'bicycle': (1.8, 0.6, 1.7),
    'pedestrian': (0.7, 0.7, 1.8),
}
TRAFFIC_MIX = {'car': 0.76, 'truck': 0.1, 'bus': 0.08, 'motorcycle': 0.06}
BIKE_LANE_MIX = {'bicycle': 0.8, 'motorcycle': 0.2}


def slabs(height_m):
    """Number of voxel slabs (at least one) of an object ``height_m`` metres tall."""
    return max(1, int(height_m / VOXEL_SIZE + 0.5))


def _slab_end(height_m):
    """End slab (exclusive) of an object standing on the ground slab."""
    return min(TOP_SLAB, GROUND_SLAB + 1 + slabs(height_m))


@dataclasses.dataclass
class Roads:
    """The road lattice. Axis 0: north-south roads at x = position[0][i]; axis 1: east-west roads at
    y = position[1][j]. Per road: lanes per direction, parking strips on both sides, a median (barrier or island)."""
    position: tuple
    lanes: tuple
    parking: tuple
    median: tuple          # per road: '', 'barrier' or 'island'
    half_size: float

    def inner_offset(self, axis, index):
        """Distance (m) from the centre line to the inner edge of the first lane."""
        return MEDIAN_WIDTH / 2 if self.median[axis][index] else 0.0

    def lane_offset(self, axis, index, lane):
        """Distance (m) from the centre line to the centre of lane ``lane`` (0 = inner) of either direction."""
        return self.inner_offset(axis, index) + (lane + 0.5) * LANE_WIDTH

    def half_width(self, axis, index):
        """Distance (m) from the centre line to the kerb."""
        return (self.inner_offset(axis, index) + self.lanes[axis][index] * LANE_WIDTH
                + self.parking[axis][index] * PARKING_WIDTH)


def make_roads(rng, half_size):
    """Draw a road lattice covering [-half_size, half_size]^2."""
    position, lanes, parking, median = [], [], [], []
    for _ in range(2):
        coords = [-half_size + rng.uniform(10.0, 40.0)]
        while coords[-1] + ROAD_SPACING[1] < half_size:
            coords.append(coords[-1] + rng.uniform(*ROAD_SPACING))
        count = len(coords)
        lane_counts = rng.choice([1, 2], size=count)
        position.append(np.array(coords))
        lanes.append(lane_counts)
        # one-lane roads always keep a parking strip: the kerb corners then clear the ego's right-turn arc
        parking.append((lane_counts == 1) | (rng.random(count) < 0.5))
        median.append(tuple(rng.choice(['', 'barrier', 'island']) if n == 2 else '' for n in lane_counts))
    return Roads(tuple(position), tuple(lanes), tuple(parking), tuple(median), half_size)


@dataclasses.dataclass
class Agents:
    """K oriented boxes moving at constant velocity along their heading (speed 0 for parked ones).

    cls (K,) uint8 class ids; length, width (K,) metres; height (K,) slabs above the ground slab;
    x, y (K,) metres at time 0; yaw (K,) radians; speed (K,) m/s.
    """
    cls: np.ndarray
    length: np.ndarray
    width: np.ndarray
    height: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    speed: np.ndarray

    def positions(self, time):
        """Box centres (K,), (K,) in metres at ``time`` seconds after the start of the scene."""
        return self.x + self.speed * time * np.cos(self.yaw), self.y + self.speed * time * np.sin(self.yaw)


class _AgentList:
    """Collects agents one by one and turns them into `Agents`."""

    def __init__(self):
        self.rows = []

    def add(self, name, x, y, yaw, speed=0.0):
        length, width, height = AGENT_SIZES[name]
        self.rows.append((CLASS_ID[name], length, width, slabs(height), x, y, yaw, speed))

    def build(self):
        columns = np.array(self.rows, np.float64).reshape(-1, 8).T                  # (8, K)
        return Agents(columns[0].astype(np.uint8), *columns[1:3], columns[3].astype(np.int64), *columns[4:])


@dataclasses.dataclass
class Town:
    """A painted town: ``ground`` (N, N) uint8 and ``layers`` (2, 3, N, N) uint8 = (solid, crown) x (class, first
    slab, end slab) over cells of TOWN_RESOLUTION starting at world x = y = ``origin``; plus roads and agents."""
    roads: Roads
    origin: float
    ground: np.ndarray
    layers: np.ndarray
    agents: Agents

    def cells(self, x, y):
        """Raster indices (nearest cell) of world points x, y (any equal shapes), clipped to the raster."""
        last = self.ground.shape[0] - 1
        return (np.clip(np.floor((x - self.origin) / TOWN_RESOLUTION), 0, last).astype(np.intp),
                np.clip(np.floor((y - self.origin) / TOWN_RESOLUTION), 0, last).astype(np.intp))


class _Painter:
    """Paints axis-aligned rectangles and discs (world metres) into the ground raster and the layers."""

    def __init__(self, half_size):
        cells = int(round(2 * half_size / TOWN_RESOLUTION))
        self.origin = -half_size
        self.ground = np.full((cells, cells), CLASS_ID['terrain'], np.uint8)
        self.layers = np.zeros((2, 3, cells, cells), np.uint8)
        self.layers[:, 0] = FREE_CLASS

    def _span(self, lo, hi):
        """Cells whose centre lies in [lo, hi)."""
        first = int(np.ceil((lo - self.origin) / TOWN_RESOLUTION - 0.5))
        end = int(np.ceil((hi - self.origin) / TOWN_RESOLUTION - 0.5))
        size = self.ground.shape[0]
        return slice(min(max(first, 0), size), min(max(end, 0), size))

    def ground_rect(self, x0, x1, y0, y1, name):
        self.ground[self._span(x0, x1), self._span(y0, y1)] = CLASS_ID[name]

    def rect(self, x0, x1, y0, y1, name, height_m):
        """A solid box standing on the ground, ``height_m`` tall (inf: up to the top of the grid)."""
        end = TOP_SLAB if np.isinf(height_m) else _slab_end(height_m)
        region = (slice(None), self._span(x0, x1), self._span(y0, y1))
        self.layers[0][region] = np.array([CLASS_ID[name], GROUND_SLAB + 1, end], np.uint8)[:, None, None]

    def building(self, x0, x1, y0, y1, height_m):
        """Walls WALL_THICKNESS thick (from the ground slab up) and a one-slab roof around free space, as Occ3D
        sees a building: its labels come from LiDAR points, which never reach the inside."""
        self.ground_rect(x0, x1, y0, y1, 'manmade')
        self.rect(x0, x1, y0, y1, 'manmade', height_m)
        end = TOP_SLAB if np.isinf(height_m) else _slab_end(height_m)
        inside = (slice(None), self._span(x0 + WALL_THICKNESS, x1 - WALL_THICKNESS),
                  self._span(y0 + WALL_THICKNESS, y1 - WALL_THICKNESS))
        roof = (CLASS_ID['manmade'], end - 1, end) if end < TOP_SLAB else (FREE_CLASS, 0, 0)
        self.layers[0][inside] = np.array(roof, np.uint8)[:, None, None]
        self.ground[inside[1:]] = FREE_CLASS

    def clear(self, x0, x1, y0, y1):
        """Remove the solid things of a rectangle."""
        region = (slice(None), self._span(x0, x1), self._span(y0, y1))
        self.layers[0][region] = np.array([FREE_CLASS, 0, 0], np.uint8)[:, None, None]

    def disc(self, cx, cy, radius, name, first_slab, end_slab, layer):
        """A vertical cylinder; cells of the bounding square outside the circle are left alone."""
        rows, cols = self._span(cx - radius, cx + radius), self._span(cy - radius, cy + radius)
        xs = self.origin + (np.arange(rows.start, rows.stop) + 0.5) * TOWN_RESOLUTION
        ys = self.origin + (np.arange(cols.start, cols.stop) + 0.5) * TOWN_RESOLUTION
        inside = (xs[:, None] - cx) ** 2 + (ys[None, :] - cy) ** 2 <= radius ** 2     # (rows, cols)
        for channel, value in enumerate((CLASS_ID[name], first_slab, end_slab)):
            self.layers[layer, channel, rows, cols][inside] = value

    def tree(self, rng, x, y, size=1.0):
        """Trunk in the solid layer and crown in the crown layer; ``size`` scales the crown."""
        self.disc(x, y, 0.3, 'vegetation', GROUND_SLAB + 1, _slab_end(rng.uniform(2.0, 3.0)), layer=0)
        crown_bottom = GROUND_SLAB + 1 + slabs(rng.uniform(1.6, 2.8))
        crown_top = min(TOP_SLAB, crown_bottom + slabs(size * rng.uniform(2.5, 5.0)))
        self.disc(x, y, size * rng.uniform(1.8, 3.5), 'vegetation', crown_bottom, crown_top, layer=1)


def _buildings(painter, rng, x0, x1, y0, y1):
    """Front yards of terrain (some with hedges) around lots of buildings separated by narrow alleys."""
    setback = rng.uniform(1.0, 6.0)
    if rng.random() < 0.5 and setback > 2.0:
        painter.rect(x0 + 0.5, x1 - 0.5, y0 + 0.5, y0 + 1.3, 'vegetation', 1.2)
    x0, x1, y0, y1 = x0 + setback, x1 - setback, y0 + setback, y1 - setback
    cuts_x = np.append(np.arange(x0, x1 - 12.0, rng.uniform(12.0, 35.0)), x1)
    cuts_y = np.append(np.arange(y0, y1 - 12.0, rng.uniform(12.0, 35.0)), y1)
    for lot_x0, lot_x1 in zip(cuts_x[:-1], cuts_x[1:]):
        for lot_y0, lot_y1 in zip(cuts_y[:-1], cuts_y[1:]):
            gap = rng.uniform(0.4, 1.6)
            if rng.random() < 0.85:
                height = rng.choice([rng.uniform(3.5, 6.0), np.inf])       # low houses and tall blocks
                painter.building(lot_x0 + gap, lot_x1 - gap, lot_y0 + gap, lot_y1 - gap, height)
            else:
                painter.tree(rng, (lot_x0 + lot_x1) / 2, (lot_y0 + lot_y1) / 2, size=1.3)


def _park(painter, rng, x0, x1, y0, y1):
    """Grass with trees, bushes and a footpath."""
    middle = rng.uniform(x0 + 3.0, x1 - 3.0)
    painter.ground_rect(middle - 1.0, middle + 1.0, y0, y1, 'sidewalk')
    for _ in range(rng.poisson((x1 - x0) * (y1 - y0) / 120.0)):
        x, y = rng.uniform(x0 + 2.0, x1 - 2.0), rng.uniform(y0 + 2.0, y1 - 2.0)
        if abs(x - middle) > 3.5:
            painter.tree(rng, x, y, size=rng.uniform(0.8, 1.4))
    for _ in range(rng.poisson((x1 - x0) * (y1 - y0) / 300.0)):
        x, y = rng.uniform(x0 + 1.0, x1 - 1.0), rng.uniform(y0 + 1.0, y1 - 1.0)
        if abs(x - middle) > 2.5:
            painter.disc(x, y, rng.uniform(0.6, 1.5), 'vegetation', GROUND_SLAB + 1, _slab_end(1.0), layer=0)


def _parking_lot(painter, agents, rng, x0, x1, y0, y1):
    """other_flat with rows of parked cars (and a trailer or truck), fenced by barriers with an entrance gap."""
    painter.ground_rect(x0, x1, y0, y1, 'other_flat')
    painter.rect(x0, x1, y0, y0 + 0.5, 'barrier', 1.0)
    painter.rect(x0, x0 + 0.5, y0, y1 - 8.0, 'barrier', 1.0)
    for row_y in np.arange(y0 + 5.0, y1 - 3.0, 7.0):
        for slot_x in np.arange(x0 + 2.0, x1 - 2.0, 2.8):
            if rng.random() < 0.7:
                agents.add('car', slot_x, row_y, rng.choice([np.pi / 2, -np.pi / 2]) + rng.normal(0, 0.05))
    if x1 - x0 > 15.0:
        agents.add(rng.choice(['trailer', 'truck']), x0 + 7.0, y1 - 2.0, 0.0)


def _construction_site(painter, agents, rng, x0, x1, y0, y1):
    """Dug terrain behind a barrier fence, construction vehicles, cones and piles of material ('others')."""
    painter.ground_rect(x0, x1, y0, y1, 'other_flat')
    painter.ground_rect(x0 + 4.0, x1 - 4.0, y0 + 4.0, y1 - 4.0, 'terrain')
    for fence in ((x0, x1, y0, y0 + 0.5), (x0, x1, y1 - 0.5, y1), (x0, x0 + 0.5, y0, y1), (x1 - 0.5, x1, y0, y1)):
        painter.rect(*fence, 'barrier', 1.2)
    painter.clear(x0, x0 + 0.5, y0 + 4.0, y0 + 10.0)                         # the gate
    for _ in range(rng.integers(1, 4)):
        agents.add('construction_vehicle', rng.uniform(x0 + 8.0, x1 - 8.0), rng.uniform(y0 + 8.0, y1 - 8.0),
                   rng.uniform(-np.pi, np.pi))
    for _ in range(rng.integers(1, 4)):
        x, y = rng.uniform(x0 + 5.0, x1 - 5.0), rng.uniform(y0 + 5.0, y1 - 5.0)
        painter.rect(x - 1.5, x + 1.5, y - 1.0, y + 1.0, 'others', rng.uniform(0.8, 2.0))
    for y in np.arange(y0 + 2.0, y1 - 2.0, 2.0):
        painter.rect(x1 - 2.0, x1 - 1.6, y, y + 0.4, 'traffic_cone', 0.7)


def _block_sides(x0, x1, y0, y1):
    """The four sides of a block as (start point, unit direction, length, inward normal)."""
    return [((x0, y0), (1.0, 0.0), x1 - x0, (0.0, 1.0)), ((x0, y1), (1.0, 0.0), x1 - x0, (0.0, -1.0)),
            ((x0, y0), (0.0, 1.0), y1 - y0, (1.0, 0.0)), ((x1, y0), (0.0, 1.0), y1 - y0, (-1.0, 0.0))]


def _sidewalk_life(painter, agents, rng, x0, x1, y0, y1, sidewalk_width, duration):
    """Street trees, lamp posts, bins and parked bicycles near the kerb; pedestrians walking along the sidewalk,
    each staying on its side of the block for the whole scene."""
    for (sx, sy), (dx, dy), length, (nx, ny) in _block_sides(x0, x1, y0, y1):
        def at(along, inward):
            return sx + dx * along + nx * inward, sy + dy * along + ny * inward
        for along in np.arange(rng.uniform(4.0, 10.0), length - 4.0, rng.uniform(9.0, 20.0)):
            kind = rng.choice(['tree', 'post', 'bin', 'bicycle', 'none'], p=[0.45, 0.2, 0.1, 0.05, 0.2])
            x, y = at(along, 0.8)
            if kind == 'tree':
                painter.tree(rng, x, y)
            elif kind == 'post':
                painter.rect(x - 0.2, x + 0.2, y - 0.2, y + 0.2, 'manmade', np.inf)
            elif kind == 'bin':
                painter.rect(x - 0.3, x + 0.3, y - 0.3, y + 0.3, 'others', 1.0)
            elif kind == 'bicycle':
                agents.add('bicycle', x, y, np.arctan2(dy, dx))
        for _ in range(rng.poisson(length / 18.0)):
            speed = rng.choice([0.0, rng.uniform(0.9, 1.6)], p=[0.25, 0.75])
            walk = min(speed * duration, length - 4.0)
            start = rng.uniform(2.0, length - 2.0 - walk)
            forward = rng.random() < 0.5
            x, y = at(start if forward else start + walk, rng.uniform(1.6, max(1.7, sidewalk_width - 0.5)))
            heading = np.arctan2(dy, dx) + (0.0 if forward else np.pi)
            agents.add('pedestrian', x, y, heading, walk / duration)


def _blocks(painter, agents, rng, roads, duration):
    """Paint every block between two pairs of neighbouring roads (and the outer blocks up to the town edge)."""
    edges = []
    for axis in range(2):
        kerbs = [(p - roads.half_width(axis, i), p + roads.half_width(axis, i))
                 for i, p in enumerate(roads.position[axis])]
        starts = [-roads.half_size] + [hi for _, hi in kerbs]
        ends = [lo for lo, _ in kerbs] + [roads.half_size]
        edges.append(list(zip(starts, ends)))
    for x0, x1 in edges[0]:
        for y0, y1 in edges[1]:
            sidewalk_width = rng.uniform(2.5, 4.5)
            painter.ground_rect(x0, x1, y0, y1, 'sidewalk')
            inner = (x0 + sidewalk_width, x1 - sidewalk_width, y0 + sidewalk_width, y1 - sidewalk_width)
            painter.ground_rect(*inner, 'terrain')
            if inner[1] - inner[0] > 20.0 and inner[3] - inner[2] > 20.0:
                kind = rng.choice(['buildings', 'park', 'parking', 'construction'], p=[0.6, 0.2, 0.12, 0.08])
                if kind == 'buildings':
                    _buildings(painter, rng, *inner)
                elif kind == 'park':
                    _park(painter, rng, *inner)
                elif kind == 'parking':
                    _parking_lot(painter, agents, rng, *inner)
                else:
                    _construction_site(painter, agents, rng, *inner)
            _sidewalk_life(painter, agents, rng, x0, x1, y0, y1, sidewalk_width, duration)


def lane_pose(roads, axis, index, direction, offset, along):
    """World x, y, yaw of a point ``along`` metres on the lane ``offset`` metres right of road (axis, index),
    driving in ``direction`` (+1: north or east, -1: south or west)."""
    centre = roads.position[axis][index]
    if axis == 0:                      # north-south road: heading (0, direction), right of it is (direction, 0)
        return centre + direction * offset, along, direction * np.pi / 2
    return along, centre - direction * offset, 0.0 if direction > 0 else np.pi


def _roads_and_traffic(painter, agents, rng, roads, reserved, duration):
    """Paint the roads (medians, then parked cars along the kerbs) and fill every lane with traffic. A lane moves
    at one speed, so its vehicles never overlap; the ego's lanes (``reserved``: (axis, index, direction) of its
    inner lane) carry no traffic."""
    extent = roads.half_size
    for axis in range(2):
        for index, centre in enumerate(roads.position[axis]):
            half = roads.half_width(axis, index)
            span = (centre - half, centre + half, -extent, extent)
            painter.ground_rect(*(span if axis == 0 else span[2:] + span[:2]), 'driveable_surface')
            crossing = roads.position[1 - axis]
            for lo, hi in zip(crossing[:-1] + 15.0, crossing[1:] - 15.0):
                middle = (centre - MEDIAN_WIDTH / 2, centre + MEDIAN_WIDTH / 2, lo, hi)
                middle = middle if axis == 0 else middle[2:] + middle[:2]
                if roads.median[axis][index] == 'barrier':
                    painter.rect(*middle, 'barrier', 1.0)
                elif roads.median[axis][index] == 'island':
                    painter.ground_rect(*middle, 'other_flat')
                if roads.parking[axis][index]:
                    for side in (1, -1):
                        for along in np.arange(lo, hi, 6.5):
                            if rng.random() < 0.55:
                                x, y, yaw = lane_pose(roads, axis, index, side, half - PARKING_WIDTH / 2, along)
                                agents.add(rng.choice(['car', 'truck'], p=[0.92, 0.08]), x, y, yaw)
            for direction in (1, -1):
                lane_count = roads.lanes[axis][index]
                for lane in range(lane_count):
                    if lane == 0 and (axis, index, direction) in reserved:
                        continue
                    bikes = lane == lane_count - 1 and rng.random() < 0.25
                    mix = BIKE_LANE_MIX if bikes else TRAFFIC_MIX
                    speed = rng.uniform(3.0, 5.0) if bikes else rng.uniform(5.0, 12.0)
                    # start upstream far enough that the lane is still full at the end of the scene
                    along = -extent - speed * duration + rng.uniform(0.0, 30.0)
                    while along < extent:
                        name = rng.choice(list(mix), p=list(mix.values()))
                        offset = roads.lane_offset(axis, index, lane) + (0.8 if bikes else 0.0)
                        x, y, yaw = lane_pose(roads, axis, index, direction, offset, direction * along)
                        agents.add(name, x, y, yaw, speed)
                        along += AGENT_SIZES[name][0] + rng.exponential(40.0) + 6.0


def build_town(rng, roads, reserved, duration):
    """Paint the town of ``roads`` and place its agents for a scene of ``duration`` seconds.

    ``reserved``: set of (axis, road index, direction) whose inner lane the ego drives in (kept free of traffic).
    """
    painter, agents = _Painter(roads.half_size), _AgentList()
    _blocks(painter, agents, rng, roads, duration)
    _roads_and_traffic(painter, agents, rng, roads, reserved, duration)
    return Town(roads, painter.origin, painter.ground, painter.layers, agents.build())

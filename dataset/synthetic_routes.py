"""Ego routes of the synthetic world (dataset/synthetic.py): where each scene's ego starts, which way it goes at
every junction, and how fast it drives, as world poses at the 2 Hz keyframes. Cheap: nothing is painted here.

The ego keeps to the inner lane of its road, starts near the town centre before a junction, turns on quarter
circles (LEFT_TURN_RADIUS, RIGHT_TURN_RADIUS) and never faster than LATERAL_ACCEL allows, and brakes and speeds up
within MAX_DECEL and MAX_ACCEL. Two kinds of scene:

  plan_scene           scene i plays SCENARIOS[i % 4] at its first junction (a left turn, a right turn, a stop at
                       the stop line, or a start from rest there), then goes straight on (1/2), left or right (1/4
                       each) at every later junction.
  plan_counterfactual  for one road lattice and one start pose 1-6 m before the first junction's stop line, one
                       scene per manoeuvre of MANOEUVRES (straight on, left, right), made at the first junction and
                       at every later one (a 'straight' route turns only where the town ends). The scenes share
                       their town (same seeds, same traffic-free lanes), cruise speed and first frame, and the first
                       manoeuvre falls inside the first 8 frames.
"""
import dataclasses
import itertools

import numpy as np

from dataset.constants import KEYFRAME_HZ
from dataset.synthetic_town import TOWN_MARGIN, Roads, lane_pose, make_roads

SCENARIOS = ('left', 'right', 'stop', 'start')
MANOEUVRES = ('straight', 'left', 'right')     # the scenes of one counterfactual start, in this order
HEADINGS = np.array([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)])    # east, north, west, south
START_REGION = 60.0        # the first junction lies within this many metres of the town centre on both axes
ROUTE_BOUND = 200.0        # junctions of a route stay within this many metres of the centre on both axes
CRUISE_SPEED = (7.0, 12.0)                  # m/s
MAX_ACCEL, MAX_DECEL, LATERAL_ACCEL = 2.0, 3.0, 2.0    # m/s^2
LEFT_TURN_RADIUS, RIGHT_TURN_RADIUS = 10.0, 6.0        # metres, in the inner lane
STOP_LINE_GAP = 1.5        # metres between the stop line and the crossing road's kerb
# Metres from a scenario's start to the first stop line. A counterfactual start is close (the arc of a left turn
# begins up to 0.75 m before the stop line, so at least 1 m) so that its turn falls inside the first 8 frames.
STOP_DISTANCE = (15.0, 40.0)
COUNTERFACTUAL_STOP_DISTANCE = (1.0, 6.0)
PATH_STEP = 0.1            # metres between the samples of a route
SUBSTEPS = 10              # integration steps per keyframe interval


@dataclasses.dataclass
class ScenePlan:
    """One scene's road lattice and ego route: x, y, yaw (N,) world poses of the N keyframes; the seeds of its
    town and of its tokens; ``reserved`` = the (axis, road, direction) lanes kept free of traffic (the ego's, and
    for a counterfactual scene those of its siblings too, so that they share one town). ``scenario`` is one of
    SCENARIOS, or of MANOEUVRES for a counterfactual scene."""
    name: str
    scenario: str
    roads: Roads
    reserved: set
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    town_seed: np.random.SeedSequence
    token_seed: np.random.SeedSequence


def _road_of(heading):
    """(axis, direction) of the road driven with ``heading`` (index into HEADINGS); see synthetic_town.Roads."""
    return (1 if heading % 2 == 0 else 0), (1 if heading < 2 else -1)


def _next_junction(roads, axis, direction, along, bound):
    """The nearest crossing road ahead of ``along`` that is far enough to begin a turn and within ``bound``."""
    crossing = roads.position[1 - axis]
    ahead = direction * (crossing - along)
    room = np.array([roads.half_width(1 - axis, k) for k in range(len(crossing))]) + LEFT_TURN_RADIUS + 2.0
    usable = np.flatnonzero((ahead > room) & (np.abs(crossing) <= bound))
    return int(usable[np.argmin(ahead[usable])]) if len(usable) else None


class _Path:
    """A route sampled every PATH_STEP metres: x, y, yaw and turn radius (0 on straights) per sample."""

    def __init__(self, x, y, yaw):
        self.samples = [np.array([[x, y, yaw, 0.0]])]

    @property
    def end(self):
        return self.samples[-1][-1]

    def straight(self, length):
        x, y, yaw, _ = self.end
        along = np.linspace(0.0, length, max(2, int(np.ceil(length / PATH_STEP)) + 1))[1:]
        self.samples.append(np.stack([x + along * np.cos(yaw), y + along * np.sin(yaw),
                                      np.full_like(along, yaw), np.zeros_like(along)], 1))

    def quarter_turn(self, radius, turn):
        """90-degree arc to the left (turn = 1) or right (turn = -1)."""
        x, y, yaw, _ = self.end
        centre = np.array([x, y]) + turn * radius * np.array([-np.sin(yaw), np.cos(yaw)])
        swept = np.linspace(0.0, np.pi / 2, max(2, int(np.ceil(radius * np.pi / 2 / PATH_STEP)) + 1))[1:]
        angle = yaw - turn * np.pi / 2 + turn * swept                       # of the point seen from the centre
        self.samples.append(np.stack([centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle),
                                      yaw + turn * swept, np.full_like(swept, radius)], 1))

    def arrays(self):
        """(x, y, yaw, radius, s) each (M,), s = distance along the path."""
        x, y, yaw, radius = np.concatenate(self.samples).T
        return x, y, yaw, radius, np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])


def _start_lane(rng, roads):
    """(heading, road index, first junction) of a start: a road and a junction on it near the town centre."""
    heading = int(rng.integers(4))
    axis, _ = _road_of(heading)
    index = int(rng.choice(np.flatnonzero(np.abs(roads.position[axis]) <= START_REGION)))
    junction = int(rng.choice(np.flatnonzero(np.abs(roads.position[1 - axis]) <= START_REGION)))
    return heading, index, junction


def _random_wishes(rng, first):
    """The manoeuvre wished at each junction: ``first`` (None: drawn too), then straight on 1/2, left or right 1/4."""
    if first is not None:
        yield first
    while True:
        yield rng.choice(['straight', 'left', 'right'], p=[0.5, 0.25, 0.25])


def _route(roads, start, stop_distance, wishes, length):
    """Drive the inner lane from ``stop_distance`` metres before the stop line of the first junction of ``start``
    (heading, road index, junction) through junctions until the path is ``length`` metres long, making the next
    manoeuvre of ``wishes`` at each junction where it is feasible (else straight on, left or right).
    Returns the _Path, the lanes used and the manoeuvres made."""
    heading, index, junction = start
    axis, direction = _road_of(heading)
    approach = stop_distance + roads.half_width(1 - axis, junction) + STOP_LINE_GAP
    start_along = roads.position[1 - axis][junction] - direction * approach
    x, y, _ = lane_pose(roads, axis, index, direction, roads.lane_offset(axis, index, 0), start_along)
    path, reserved, made = _Path(x, y, heading * np.pi / 2), {(axis, index, direction)}, []
    while True:
        centre = np.empty(2)
        centre[1 - axis], centre[axis] = roads.position[1 - axis][junction], roads.position[axis][index]
        ahead = float(HEADINGS[heading] @ (centre - path.end[:2]))             # metres to the junction centre
        if sum(len(p) for p in path.samples) * PATH_STEP + ahead >= length:
            path.straight(ahead + 30.0)
            return path, reserved, made
        feasible = {'straight': _next_junction(roads, axis, direction, centre[1 - axis], ROUTE_BOUND)}
        for name, turn in (('left', 1), ('right', -1)):
            new_axis, new_direction = _road_of((heading + turn) % 4)
            feasible[name] = _next_junction(roads, new_axis, new_direction, centre[1 - new_axis], ROUTE_BOUND)
        wish = next(wishes)
        manoeuvre = next(m for m in (wish, 'straight', 'left', 'right') if feasible[m] is not None)
        made.append(manoeuvre)
        if manoeuvre == 'straight':
            junction = feasible['straight']
            continue
        turn = 1 if manoeuvre == 'left' else -1
        radius = LEFT_TURN_RADIUS if turn == 1 else RIGHT_TURN_RADIUS
        # the arc ends on the crossing road's inner lane (turn * lane offset from its centre line)
        arc_start = turn * roads.lane_offset(1 - axis, junction, 0) - radius
        path.straight(ahead + arc_start)
        path.quarter_turn(radius, turn)
        heading = (heading + turn) % 4
        axis, index, junction = 1 - axis, junction, feasible[manoeuvre]
        direction = _road_of(heading)[1]
        reserved.add((axis, index, direction))


def _braking_envelope(s, limit):
    """Highest speed (M,) at each path sample from which every later speed limit is reachable at MAX_DECEL:
    v(s)^2 = min over s' >= s of limit(s')^2 + 2 MAX_DECEL (s' - s)."""
    reach = np.minimum.accumulate((limit ** 2 + 2 * MAX_DECEL * s)[::-1])[::-1]
    return np.sqrt(np.maximum(reach - 2 * MAX_DECEL * s, 0.0))


def _drive(rng, s, radius, scenario, stop_distance, num_frames):
    """Distance travelled (num_frames,) at each keyframe: cruise, slow down for arcs, and for 'stop' halt at the
    first stop line for 4-8 keyframes; 'start' waits 1-3 keyframes at it, then accelerates."""
    cruise = rng.uniform(*CRUISE_SPEED)
    limit = np.minimum(cruise, np.where(radius > 0, np.sqrt(LATERAL_ACCEL * radius), np.inf))
    go = _braking_envelope(s, limit)
    halt = _braking_envelope(s, np.where(s >= stop_distance, 0.0, limit))
    hold_frames = int(rng.integers(4, 9) if scenario == 'stop' else rng.integers(1, 4))
    dt = 1.0 / (KEYFRAME_HZ * SUBSTEPS)
    stop_pending = scenario == 'stop'
    position, speed = 0.0, (0.0 if scenario == 'start' else (halt if stop_pending else go)[0])
    hold = hold_frames * SUBSTEPS if scenario == 'start' else 0
    travelled = np.zeros(num_frames)
    for frame in range(num_frames):
        travelled[frame] = position
        for _ in range(SUBSTEPS):
            if hold > 0:
                hold -= 1
                continue
            speed = min(speed + MAX_ACCEL * dt, float(np.interp(position, s, halt if stop_pending else go)))
            position += speed * dt
            if stop_pending and position >= stop_distance - 0.05:
                position, speed, stop_pending, hold = stop_distance, 0.0, False, hold_frames * SUBSTEPS
    return travelled


def _route_length(num_frames):
    """Metres of route that a scene of ``num_frames`` keyframes can need (at the top cruise speed, and 30 more)."""
    return CRUISE_SPEED[1] * (num_frames - 1) / KEYFRAME_HZ + 30.0


def _poses(path, travelled):
    """World x, y, yaw (N,) of the keyframes ``travelled`` (N,) metres along ``path``."""
    x, y, yaw, _, s = path.arrays()
    return np.interp(travelled, s, x), np.interp(travelled, s, y), np.interp(travelled, s, yaw)


def plan_scene(seed, scene_index, num_frames):
    """The road lattice and ego poses of scene ``scene_index`` of the world ``seed`` (module docstring)."""
    route_seed, town_seed, token_seed = np.random.SeedSequence([seed, scene_index]).spawn(3)
    rng = np.random.default_rng(route_seed)
    scenario = SCENARIOS[scene_index % len(SCENARIOS)]
    roads = make_roads(rng, ROUTE_BOUND + TOWN_MARGIN)
    start = _start_lane(rng, roads)
    stop_distance = 0.0 if scenario == 'start' else rng.uniform(*STOP_DISTANCE)
    first = {'left': 'left', 'right': 'right', 'start': 'straight'}.get(scenario)
    path, reserved, _ = _route(roads, start, stop_distance, _random_wishes(rng, first), _route_length(num_frames))
    _, _, _, radius, s = path.arrays()
    travelled = _drive(rng, s, radius, scenario, stop_distance, num_frames)
    return ScenePlan(f'scene-{scene_index:04d}', scenario, roads, reserved, *_poses(path, travelled),
                     town_seed, token_seed)


def plan_counterfactual(seed, scene_index, num_frames):
    """The counterfactual scenes of start ``scene_index`` of the world ``seed``: one ScenePlan per manoeuvre of
    MANOEUVRES, named 'scene-NNNN-<manoeuvre>' (module docstring). The road lattice and the start lane are those
    of plan_scene(seed, scene_index, ...)."""
    route_seed, town_seed, token_seed = np.random.SeedSequence([seed, scene_index]).spawn(3)
    rng = np.random.default_rng(route_seed)
    roads = make_roads(rng, ROUTE_BOUND + TOWN_MARGIN)
    start = _start_lane(rng, roads)
    stop_distance = rng.uniform(*COUNTERFACTUAL_STOP_DISTANCE)
    drive_seed = int(rng.integers(2 ** 63))            # one driver: the same cruise speed on every route
    routes = {}
    for manoeuvre in MANOEUVRES:
        path, reserved, made = _route(roads, start, stop_distance, itertools.repeat(manoeuvre),
                                      _route_length(num_frames))
        if made[:1] != [manoeuvre]:
            raise RuntimeError(f'seed {seed}, start {scene_index}: no room to go {manoeuvre} at the first junction '
                               f'(made {made})')
        routes[manoeuvre] = path, reserved
    shared_reserved = set().union(*(reserved for _, reserved in routes.values()))
    plans = []
    for (manoeuvre, (path, _)), scene_token_seed in zip(routes.items(), token_seed.spawn(len(MANOEUVRES))):
        _, _, _, radius, s = path.arrays()
        travelled = _drive(np.random.default_rng(drive_seed), s, radius, manoeuvre, stop_distance, num_frames)
        plans.append(ScenePlan(f'scene-{scene_index:04d}-{manoeuvre}', manoeuvre, roads, shared_reserved,
                               *_poses(path, travelled), town_seed, scene_token_seed))
    return plans

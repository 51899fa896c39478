"""Trajectory presets for sampling (`sample.py --traj straight|left|right|stop`), built as ego poses and turned
into conditions by the same functions the dataset's conditions follow (dataset/poses.py)."""
import numpy as np

from dataset.constants import KEYFRAME_HZ

PRESETS = ('straight', 'left', 'right', 'stop')
PRESET_SPEED = 6.0        # m/s, a typical urban nuScenes speed
TURN_FRACTION = 1 / 3     # the 90-degree turn takes the middle third of the clip ...
MAX_TURN_RATE = np.radians(26.0)   # ... at most 26 deg/s (radius 13 m at 6 m/s): a brisk urban turn


def preset_path(name, num_frames, speed=PRESET_SPEED, extra_frames=0):
    """Planar ego poses (x, y, yaw), each (num_frames + extra_frames,), of a preset manoeuvre starting at the
    origin heading +x.

    'left' / 'right' drive straight, turn 90 degrees at constant speed during the middle third of the
    num_frames, then go straight on; 'stop' stands still. Where a third is too short to turn at MAX_TURN_RATE
    (clips under 20 frames at 2 Hz), the turn takes as many frames as that rate needs, centred in the clip, or
    from frame 0 on and past the clip's end (into extra_frames) when the clip is shorter still: a third of an
    8-frame clip would be 30 degrees per frame, sharper than any turn of a driving log and more than the
    registration of evaluation/control.py follows between two frames."""
    if name not in PRESETS:
        raise ValueError(f'trajectory preset must be one of {PRESETS}, got {name!r}')
    step = 0.0 if name == 'stop' else speed / KEYFRAME_HZ                       # metres per frame
    turn_frames = max(1, round(num_frames * TURN_FRACTION), int(np.ceil(np.pi / 2 / MAX_TURN_RATE * KEYFRAME_HZ)))
    first_turn = max(0, (num_frames - turn_frames) // 2)
    yaw_rate = np.zeros(num_frames + extra_frames)
    if name in ('left', 'right'):
        yaw_rate[first_turn:first_turn + turn_frames] = (np.pi / 2) / turn_frames * (1 if name == 'left' else -1)
    yaw = np.concatenate([[0.0], np.cumsum(yaw_rate[:-1])])                       # heading when leaving each frame
    heading = yaw + yaw_rate / 2                                                  # mid-step heading (arc chord)
    x = np.concatenate([[0.0], np.cumsum(step * np.cos(heading[:-1]))])
    y = np.concatenate([[0.0], np.cumsum(step * np.sin(heading[:-1]))])
    return x, y, yaw


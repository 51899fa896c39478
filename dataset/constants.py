"""Facts about the Occ3D-nuScenes occupancy format, each written once.

Frames are in nuScenes' ego frame (x forward, y left, z up). ``semantics[i, j, k]`` is the voxel whose
centre is at ``POINT_CLOUD_RANGE[:3] + (i, j, k) * VOXEL_SIZE + VOXEL_SIZE / 2`` metres: axis 0 is x,
axis 1 is y, axis 2 is z (index 0 is the lowest slab). The ego origin lies on the corner shared by the
voxels (99, 99) and (100, 100) of every horizontal slab.
"""
import numpy as np

# Occ3D class ids (`labels_16` of upstream's label-mapping yaml, 17 = free space)
CLASS_NAMES = (
    'others', 'barrier', 'bicycle', 'bus', 'car', 'construction_vehicle', 'motorcycle', 'pedestrian',
    'traffic_cone', 'trailer', 'truck', 'driveable_surface', 'other_flat', 'sidewalk', 'terrain',
    'manmade', 'vegetation', 'free',
)
NUM_CLASSES = len(CLASS_NAMES)                    # 18, the size of the tokenizer's class table
FREE_CLASS = CLASS_NAMES.index('free')            # 17
SEMANTIC_CLASSES = tuple(range(FREE_CLASS))       # 0..16, the classes averaged by mIoU
CLASS_ID = {name: i for i, name in enumerate(CLASS_NAMES)}
# Classes that keep their world position, in groups of one kind (the BEV channels of evaluation/ego_motion.py); the
# rest of the semantic classes (vehicles, cyclists, pedestrians, 'others') can move
STATIC_CLASS_GROUPS = (('driveable_surface',), ('other_flat', 'sidewalk'), ('terrain',), ('manmade',),
                       ('vegetation',), ('barrier', 'traffic_cone'))
STATIC_CLASSES = tuple(CLASS_ID[name] for group in STATIC_CLASS_GROUPS for name in group)
MOVABLE_CLASSES = tuple(c for c in SEMANTIC_CLASSES if c not in STATIC_CLASSES)

# Grid: 200 x 200 x 16 voxels of 0.4 m over x, y in [-40, 40] m and z in [-1, 5.4] m
GRID_SHAPE = (200, 200, 16)
VOXEL_SIZE = 0.4
POINT_CLOUD_RANGE = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)   # x_min, y_min, z_min, x_max, y_max, z_max

# Keys of one Occ3D labels.npz, all (200, 200, 16) uint8
OCC3D_KEYS = ('semantics', 'mask_lidar', 'mask_camera')

# nuScenes keyframes come at 2 Hz
KEYFRAME_HZ = 2

# Upstream visualize_demo.py colour table (RGB) for classes 0..16; free space is never drawn
CLASS_COLORS = np.array([
    (0, 0, 0),          # others (never drawn upstream)
    (255, 120, 50),     # barrier
    (255, 192, 203),    # bicycle
    (255, 255, 0),      # bus
    (0, 150, 245),      # car
    (0, 255, 255),      # construction_vehicle
    (255, 127, 0),      # motorcycle
    (255, 0, 0),        # pedestrian
    (255, 240, 150),    # traffic_cone
    (135, 60, 0),       # trailer
    (160, 32, 240),     # truck
    (255, 0, 255),      # driveable_surface
    (139, 137, 137),    # other_flat
    (75, 0, 75),        # sidewalk
    (150, 240, 80),     # terrain
    (230, 230, 250),    # manmade
    (0, 175, 0),        # vegetation
], dtype=np.uint8)
# Upstream's colours for the ego car it burns into every rendered frame
EGO_CAR_COLORS = np.array([(0, 255, 127), (255, 99, 71), (0, 191, 255), (175, 0, 75)], dtype=np.uint8)


def voxel_centres(axis):
    """Metric centre of every voxel along grid axis 0 (x), 1 (y) or 2 (z): shape (GRID_SHAPE[axis],)."""
    return POINT_CLOUD_RANGE[axis] + (np.arange(GRID_SHAPE[axis]) + 0.5) * VOXEL_SIZE

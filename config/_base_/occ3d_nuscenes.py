# Occ3D-nuScenes as upstream lays it out (data/README.md): data/nuscenes/gts/<scene>/<token>/labels.npz and
# the two OccWorld info pickles in data/. Build the pickles with `python -m dataset.build_infos`.
# Grid facts live in dataset/constants.py; tests/test_configs.py checks that the numbers below agree with it.
data_root = 'data/'
num_frames = 32                  # keyframes per clip: 16 s at 2 Hz
num_classes = 18                 # dataset.constants.NUM_CLASSES (17 = free)
grid_height = 16                 # dataset.constants.GRID_SHAPE[2]

dataset = dict(
    train_pkl=data_root + 'nuscenes_infos_train_temporal_v3_scene.pkl',
    val_pkl=data_root + 'nuscenes_infos_val_temporal_v3_scene.pkl',
    # keyword arguments of dataset.clips.OccClipDataset shared by both splits
    common=dict(gts_root=data_root + 'nuscenes/gts', num_frames=num_frames, conditions=('traj_xy',),
                load_camera_mask=False),
    # upstream: 5 random windows per scene and epoch; the start is drawn from (seed, epoch, index)
    train=dict(mode='random', times=5),
    # upstream validated on 5 random windows per scene (redrawn every epoch); we use fixed sliding windows
    val=dict(mode='sliding', stride=8),
)

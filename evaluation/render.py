"""Offscreen mayavi rendering of occupancy frames with upstream's colours and voxel placement (upstream's
`visualize_demo.py`).

mayavi is imported inside `OccupancyRenderer` only: `ETS_TOOLKIT=null` and `mlab.options.offscreen` make VTK render
through EGL/OSMesa with no X server and no Qt binding. Array axis 0 (ego x, forward) is the plot's X axis, axis 1
(ego y, left) its Y axis, voxel centres at POINT_CLOUD_RANGE[:3] + (index + 0.5) * VOXEL_SIZE. Like upstream,
free space and class 0 ('others') are not drawn and an ego car is drawn at the origin.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

from dataset.constants import CLASS_COLORS, EGO_CAR_COLORS, FREE_CLASS, KEYFRAME_HZ, POINT_CLOUD_RANGE, VOXEL_SIZE

# upstream's ego car: voxels x, y in [94, 102), z in [3, 9) of the grid, in its stripes of colour
EGO_CAR_VOXELS = ((94, 102), (94, 102), (3, 9))
# a fixed camera behind and above the ego, looking forward (mlab.view arguments)
CAMERA = dict(azimuth=180.0, elevation=55.0, distance=140.0, focalpoint=(4.0, 0.0, 0.0))


def voxel_points(occupancy):
    """Centres (N, 3) metres and classes (N,) of the drawn voxels of one frame (X, Y, Z)."""
    drawn = (occupancy != FREE_CLASS) & (occupancy != 0)
    index = np.argwhere(drawn)                                                        # (N, 3)
    centres = np.asarray(POINT_CLOUD_RANGE[:3]) + (index + 0.5) * VOXEL_SIZE
    return centres, occupancy[drawn]


def ego_car_points():
    """Centres (N, 3) and colour rows (N,) into EGO_CAR_COLORS of upstream's striped ego car."""
    (x0, x1), (y0, y1), (z0, z1) = EGO_CAR_VOXELS
    index = np.stack(np.meshgrid(np.arange(x0, x1), np.arange(y0, y1), np.arange(z0, z1), indexing='ij'), -1)
    index = index.reshape(-1, 3)
    stripes = (index[:, 0] - x0) * len(EGO_CAR_COLORS) // (x1 - x0)                  # stripes along x
    return np.asarray(POINT_CLOUD_RANGE[:3]) + (index + 0.5) * VOXEL_SIZE, stripes


class OccupancyRenderer:
    """Renders (X, Y, Z) class grids to PNG files with one reusable offscreen figure."""

    def __init__(self, size=(800, 600)):
        os.environ.setdefault('ETS_TOOLKIT', 'null')
        from mayavi import mlab
        mlab.options.offscreen = True
        self.mlab = mlab
        self.figure = mlab.figure(size=size, bgcolor=(1, 1, 1))
        # mayavi's default 8-frame anti-aliasing more than doubles the time of a frame for little visible gain
        self.figure.scene.anti_aliasing_frames = 0

    def _cubes(self, centres, scalars, colors):
        """Draw cubes coloured through a lookup table ``colors`` (K, 3) uint8 indexed by the integer scalars."""
        glyphs = self.mlab.points3d(centres[:, 0], centres[:, 1], centres[:, 2], scalars.astype(float),
                                    mode='cube', scale_factor=VOXEL_SIZE, scale_mode='none', vmin=0,
                                    vmax=len(colors) - 1, figure=self.figure)
        lut = glyphs.module_manager.scalar_lut_manager.lut
        lut.number_of_colors = len(colors)
        lut.table = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
        glyphs.glyph.color_mode = 'color_by_scalar'

    def render(self, occupancy, path):
        """Write one frame (X, Y, Z) of classes to ``path`` (PNG)."""
        self.mlab.clf(self.figure)
        centres, classes = voxel_points(np.asarray(occupancy))
        if len(centres):
            self._cubes(centres, classes, CLASS_COLORS)
        car, stripes = ego_car_points()
        self._cubes(car, stripes, EGO_CAR_COLORS)
        self.mlab.view(figure=self.figure, **CAMERA)
        self.mlab.savefig(path, figure=self.figure)

    def close(self):
        self.mlab.close(self.figure)


def compose_panels(paths, titles, out_path):
    """Put the PNGs ``paths`` side by side with a title above each; write ``out_path``; return the image."""
    images = [Image.open(p).convert('RGB') for p in paths]
    title_height = 24
    width, height = sum(i.width for i in images), max(i.height for i in images) + title_height
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    left = 0
    for image, title in zip(images, titles):
        canvas.paste(image, (left, title_height))
        draw.text((left + 8, 6), title, fill='black')
        left += image.width
    canvas.save(out_path)
    return canvas


def write_gif(images, path, seconds_per_frame=1 / KEYFRAME_HZ):
    """Assemble PIL images into a looping GIF (keyframes play in real time by default)."""
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(seconds_per_frame * 1000), loop=0)

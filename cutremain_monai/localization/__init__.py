"""Weak localisation: class activation maps and their agreement with annotated regions."""

from cutremain_monai.localization.cam import cam, cam_grid, save_overlay
from cutremain_monai.localization.grad_cam import grad_cam, grad_cam_pp

__all__ = ["cam", "cam_grid", "grad_cam", "grad_cam_pp", "save_overlay"]

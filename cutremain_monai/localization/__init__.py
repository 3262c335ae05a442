"""Weak localisation: class activation maps and their agreement with annotated regions."""

from cutremain_monai.localization.cam import energy_in_box, grad_cam, save_overlay

__all__ = ["grad_cam", "energy_in_box", "save_overlay"]

"""cutremain_monai: box-supervised augmentation and weak localisation for X-ray classifiers on MONAI."""

__version__ = "0.1.0"

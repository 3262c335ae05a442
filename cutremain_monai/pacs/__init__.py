"""Exchange with the PACS and with research partners: de-identified export."""

from cutremain_monai.pacs.deidentify import DeidentifyReport, deidentify

__all__ = ["DeidentifyReport", "deidentify"]

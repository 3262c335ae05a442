from cutremain_monai.data.folder import folder_datalist  # noqa: F401

"""``load_xray`` / ``LoadXrayd`` on NIfTI / MHA / NRRD: the project's frame (row 0 on top, x = column), the
intensity rule that makes masks give the same lung mask as their PNG, 2-D only, no header fields passed on."""

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from PIL import Image

from cutremain_monai.io.loader import LoadXrayd, SimpleITKReader, is_dicom_path, is_volume_path, load_xray, split_readable
from cutremain_monai.transforms import LungMaskd
from tests.conftest import shared_data

SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nii.gz", ".nii")


def _asymmetric(h=5, w=7, dtype=np.uint8, top=255):
    """A non-square array with a distinct value in each corner, so a transpose or a flip shows."""
    a = np.zeros((h, w), dtype=dtype)
    a[0, 0], a[0, w - 1], a[h - 1, 0] = top, top // 3, top // 5
    a[1:3, 2:5] = top
    return a


def _sitk_write(a: np.ndarray, path, spacing=None):
    im = sitk.GetImageFromArray(a)
    if spacing is not None:
        im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))
    return str(path)


@pytest.mark.parametrize("suffix", SITK_SUFFIXES)
@pytest.mark.parametrize("dtype,top", [(np.uint8, 1), (np.uint8, 255), (np.uint16, 255), (np.int64, 255), (np.uint16, 4095)])
def test_simpleitk_round_trip_is_not_transposed(tmp_path, suffix, dtype, top):
    a = _asymmetric(dtype=dtype, top=top)
    path = _sitk_write(a, tmp_path / f"m{suffix}", spacing=(0.5, 0.25))  # x (column) 0.5, y (row) 0.25
    t = load_xray(path)
    assert isinstance(t, MetaTensor) and t.dtype == torch.float32 and tuple(t.shape) == (1, 5, 7)
    scale = 1.0 if top == 1 else 255.0 if top == 255 else 65535.0  # {0,1} kept; 8-/16-bit scaled as PNG is
    np.testing.assert_array_equal(t[0].numpy(), (a / scale).astype(np.float32))
    if top == 1:
        np.testing.assert_array_equal(t[0].numpy(), a)  # label masks come back as stored
    assert t.meta["filename_or_obj"] == path
    assert t.meta["pixel_spacing"] == [0.25, 0.5]  # (row, column), as for DICOM
    np.testing.assert_allclose(t.affine.numpy()[:2, :2], np.diag([0.25, 0.5]))


def test_nibabel_round_trip(tmp_path):
    a = _asymmetric(top=255)
    # nibabel arrays are [i, j] = [x, y] = [column, row]: a[row, col] is written as a.T
    nib.save(nib.Nifti1Image(a.T.copy(), np.diag([0.5, 0.25, 1.0, 1.0])), str(tmp_path / "n.nii"))
    t = load_xray(str(tmp_path / "n.nii"))
    np.testing.assert_array_equal(t[0].numpy(), (a / 255.0).astype(np.float32))
    assert t.meta["pixel_spacing"] == [0.25, 0.5]
    # the same convention as SimpleITK's files: nibabel sees a SimpleITK-written a[row, col] as a.T
    _sitk_write(a, tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "s.nii.gz")).dataobj), a.T)
    np.testing.assert_array_equal(load_xray(str(tmp_path / "s.nii.gz")).numpy(), t.numpy())


def test_one_slice_volume_is_2d_and_real_volume_raises(tmp_path):
    a = _asymmetric(top=1)
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        one = _sitk_write(a[None], tmp_path / f"one{suffix}")  # numpy (1, H, W) = ITK size (W, H, 1)
        np.testing.assert_array_equal(load_xray(one)[0].numpy(), a)
        vol = _sitk_write(np.stack([a, a, a]), tmp_path / f"vol{suffix}")
        with pytest.raises(ValueError, match=rf"vol{suffix}: a 3-D volume of size 7 x 5 x 3 .*only 2-D"):
            load_xray(vol)
        with pytest.raises(ValueError, match=rf"vol{suffix}: a 3-D volume"):
            LoadXrayd("lung_mask")({"lung_mask": vol})
    nib.save(nib.Nifti1Image(a.T[..., None].copy(), np.eye(4)), str(tmp_path / "one_nib.nii"))
    np.testing.assert_array_equal(load_xray(str(tmp_path / "one_nib.nii"))[0].numpy(), a)
    rgb = sitk.GetImageFromArray(np.zeros((5, 7, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.mha"))
    with pytest.raises(ValueError, match=r"rgb.mha: 3 components per pixel"):
        load_xray(str(tmp_path / "rgb.mha"))


def test_intensity_rule_for_float_and_signed_data(tmp_path):
    f = np.linspace(0, 1, 35, dtype=np.float32).reshape(5, 7)
    np.testing.assert_allclose(load_xray(_sitk_write(f, tmp_path / "f.mha"))[0].numpy(), f)  # already in [0, 1]
    g = (f * 1000 - 200).astype(np.float32)  # negative / fractional: min-max
    np.testing.assert_allclose(load_xray(_sitk_write(g, tmp_path / "g.nrrd"))[0].numpy(), f, atol=1e-6)
    w = (f * 255).round().astype(np.float32)  # whole numbers stored as float: scaled like an 8-bit PNG
    np.testing.assert_allclose(load_xray(_sitk_write(w, tmp_path / "w.nii.gz"))[0].numpy(), w / 255)


def test_header_fields_are_not_passed_on(tmp_path):
    a = _asymmetric(top=1)
    img = nib.Nifti1Image(a.T.copy(), np.eye(4))
    img.header["descrip"] = b"Doe^Jane 1970"
    img.header["db_name"] = b"PID12345"
    nib.save(img, str(tmp_path / "p.nii.gz"))
    im = sitk.GetImageFromArray(a)
    im.SetMetaData("PatientName", "Doe^Jane")
    im.SetMetaData("0010|0020", "PID12345")
    sitk.WriteImage(im, str(tmp_path / "p.nrrd"))
    for p in ("p.nii.gz", "p.nrrd"):
        t = load_xray(str(tmp_path / p))
        text = repr(dict(t.meta))
        assert "Doe" not in text and "PID12345" not in text, text
        assert set(t.meta) >= {"filename_or_obj", "pixel_spacing", "spatial_shape"}
    assert "Doe" in open(tmp_path / "p.nrrd", "rb").read(2000).decode("latin-1")  # the field was in the file


def test_lung_mask_route_equals_png_route(tmp_path):
    lung = np.zeros((40, 30), np.uint8)
    lung[5:35, 3:13] = 255
    lung[5:30, 17:27] = 255
    v7 = lung.copy()
    v7[0:3, 0:10] = 127  # V7 burned-in markup: not lung
    Image.fromarray(v7).save(tmp_path / "m.png")
    binariser = LungMaskd("lung_mask")
    loader = LoadXrayd("lung_mask")
    want = binariser(loader({"lung_mask": str(tmp_path / "m.png")}))["lung_mask"]
    assert want.sum() == (lung == 255).sum()
    cases = {
        "v01.nii.gz": (lung // 255).astype(np.uint8),  # {0, 1}
        "v255.mha": lung,  # {0, 255}
        "v7.nrrd": v7,  # {0, 127, 255}, as the PNG
        "v01i64.mha": (lung // 255).astype(np.int64),
        "v255u16.nii.gz": lung.astype(np.uint16),
    }
    for name, arr in cases.items():
        got = binariser(loader({"lung_mask": _sitk_write(arr, tmp_path / name)}))["lung_mask"]
        assert got.shape == want.shape and torch.equal(got.as_tensor(), want.as_tensor()), name
    nib.save(nib.Nifti1Image((lung // 255).T.copy(), np.eye(4)), str(tmp_path / "nib.nii"))
    got = binariser(loader({"lung_mask": str(tmp_path / "nib.nii")}))["lung_mask"]
    assert torch.equal(got.as_tensor(), want.as_tensor())


@pytest.mark.real_data
def test_real_v7_mask_as_nifti_equals_png():
    root = shared_data("covid", "lung_masks_v7labs")
    names = sorted(n for n in os.listdir(root) if n.endswith(".png"))[:3]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            png = os.path.join(root, n)
            stored = np.asarray(Image.open(png).convert("L"))
            want = LungMaskd("m")(LoadXrayd("m")({"m": png}))["m"]
            for suffix in (".nii.gz", ".mha"):
                path = _sitk_write(stored, os.path.join(tmp, n[:-4] + suffix))
                got = LungMaskd("m")(LoadXrayd("m")({"m": path}))["m"]
                assert torch.equal(got.as_tensor(), want.as_tensor()), (n, suffix)


def test_suffixes_are_not_dicom(tmp_path):
    for name in ("a.nii", "a.nii.gz", "A.NII.GZ", "a.mha", "a.mhd", "a.nrrd", "a.nhdr"):
        assert is_volume_path(name) and not is_dicom_path(name)  # decided by suffix: the file need not exist
    for name in ("a.png", "a.dcm", "IM000123", "a.gz"):
        assert not is_volume_path(name)
    assert is_dicom_path("a.dcm") and is_dicom_path("IM000123")


def test_unreadable_volumes_name_the_file(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "bad.mha").write_bytes(b"not a metaimage")
    for name in ("bad.nii.gz", "bad.mha"):
        path = str(tmp_path / name)
        with pytest.raises(OSError, match=rf"{name}: cannot read image"):
            LoadXrayd("image")({"image": path})
    good = _sitk_write(_asymmetric(), tmp_path / "good.mha")
    ok, bad = split_readable([{"image": good, "lung_mask": str(tmp_path / "bad.nii.gz")}, {"image": good}],
                             key=("image", "lung_mask"))
    assert ok == [{"image": good}]
    assert bad[0][0] == str(tmp_path / "bad.nii.gz") and bad[0][1].startswith(f"lung_mask of {good}: OSError")


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_simpleitk_reader_in_monai_load_image(tmp_path):
    from monai.transforms import LoadImage

    a = _asymmetric()
    path = _sitk_write(a, tmp_path / "x.mha", spacing=(0.5, 0.25))
    reader = SimpleITKReader()
    assert reader.verify_suffix(path) and not reader.verify_suffix(str(tmp_path / "x.png"))
    img = LoadImage(reader=reader, image_only=True)(path)
    np.testing.assert_array_equal(np.asarray(img), a.T)  # MONAI's (x, y) convention, as ITKReader gives
    np.testing.assert_array_equal(SimpleITKReader(reverse_indexing=True).get_data(reader.read(path))[0], a)


@pytest.mark.parametrize("codes", [(1, 1), (1, 0), (0, 1), (0, 0)])
@pytest.mark.parametrize("zooms", [(0.5, 0.25), (0.7, 0.3)])
def test_nifti_spacing_equals_monai_reader(tmp_path, codes, zooms):
    """The numpy decoder (nibabel directly) reports the spacing MONAI's ``NibabelReader`` reports, header
    mismatches included (MONAI rewrites a pixdim that disagrees with the affine and both forms)."""
    from monai.data import NibabelReader

    from cutremain_monai.io.decode import decode_xray

    img = nib.Nifti1Image(_asymmetric().T.copy(), np.diag([0.5, 0.25, 1.0, 1.0]))
    img.set_sform(img.affine, code=codes[0])
    img.set_qform(np.diag([0.6, 0.2, 1.0, 1.0]), code=codes[1])
    img.header.set_zooms(zooms)
    path = str(tmp_path / "s.nii")
    nib.save(img, path)
    reader = NibabelReader()
    want = np.asarray(reader.get_data(reader.read(path))[1]["pixdim"][1:3], dtype=np.float64)
    arr, meta = decode_xray(path)
    np.testing.assert_allclose(meta["pixel_spacing"], [want[1], want[0]], rtol=1e-6)
    np.testing.assert_array_equal(arr, load_xray(path).numpy())

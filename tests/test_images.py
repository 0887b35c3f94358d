"""medcli.images: the files a user brings to `predict`, read the way MedMNIST built its images."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from medcli import images
from medcli.errors import EXIT_FAILURE, UsageError
from medcli.images import BadFile, Target

from cli_helpers import as_nobody, shared_folder

GRAY, RGB = Target(28, 1), Target(28, 3)


@pytest.fixture(autouse=True)
def _fresh_notes():
    images.reset_notes()
    yield
    images.reset_notes()


def noise(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def save(path: Path, array_or_image, **kwargs) -> Path:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(path, **kwargs)
    return path


def only(path, target) -> np.ndarray:
    (name, array), = images.read(path, target)
    assert name == str(path)
    assert array.dtype == np.uint8 and array.shape == (target.size, target.size, target.channels)
    return array


# --- images at the dataset's size stay byte-identical ------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_rgb_at_size_is_byte_identical(tmp_path, suffix):
    pixels = noise((28, 28, 3))
    assert np.array_equal(only(save(tmp_path / f"x{suffix}", pixels), RGB), pixels)


def test_gray_at_size_is_byte_identical(tmp_path):
    pixels = noise((28, 28))
    assert np.array_equal(only(save(tmp_path / "x.png", pixels), GRAY), pixels[:, :, None])


def test_jpeg_is_what_pil_decodes(tmp_path):
    path = save(tmp_path / "x.jpg", noise((28, 28, 3)), quality=90)
    assert np.array_equal(only(path, RGB), np.asarray(Image.open(path).convert("RGB")))
    path = save(tmp_path / "y.jpeg", noise((28, 28)), quality=90)
    assert np.array_equal(only(path, GRAY)[:, :, 0], np.asarray(Image.open(path)))


# --- channels ----------------------------------------------------------------------------------


def test_gray_to_rgb_repeats_the_channel(tmp_path, capsys):
    pixels = noise((28, 28))
    out = only(save(tmp_path / "g.png", pixels), RGB)
    assert all(np.array_equal(out[:, :, c], pixels) for c in range(3))
    only(save(tmp_path / "h.png", pixels), RGB)
    err = capsys.readouterr().err
    assert err.count("repeating grayscale images into 3 channels") == 1  # said once per process


def test_rgb_to_gray_is_pil_luma(tmp_path, capsys):
    path = save(tmp_path / "c.png", noise((28, 28, 3)))
    out = only(path, GRAY)
    expected = np.asarray(Image.open(path).convert("L"))
    assert np.array_equal(out[:, :, 0], expected)
    assert not np.array_equal(out[:, :, 0], np.asarray(Image.open(path))[:, :, 0])
    assert "ITU-R 601-2 luma" in capsys.readouterr().err


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = noise((28, 28, 4))
    rgba[..., 3] = 0  # fully transparent: compositing would give the background
    assert np.array_equal(only(save(tmp_path / "a.png", rgba), RGB), rgba[..., :3])
    la = noise((28, 28, 2), seed=1)
    la[..., 1] = 0
    assert np.array_equal(only(save(tmp_path / "la.png", Image.fromarray(la, "LA")), GRAY)[:, :, 0], la[..., 0])


def test_palette_and_bilevel_images(tmp_path):
    palette = Image.fromarray(noise((28, 28, 3))).quantize(16)
    path = save(tmp_path / "p.png", palette)
    assert Image.open(path).mode == "P"
    assert np.array_equal(only(path, RGB), np.asarray(palette.convert("RGB")))
    assert np.array_equal(only(path, GRAY)[:, :, 0], np.asarray(palette.convert("RGB").convert("L")))
    bits = noise((28, 28)) > 127
    path = save(tmp_path / "one.png", Image.fromarray(bits))
    assert Image.open(path).mode == "1"
    assert np.array_equal(only(path, GRAY)[:, :, 0], np.where(bits, 255, 0))


# --- bit depth ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_uses_the_full_range_of_the_type(tmp_path, suffix):
    values = np.random.default_rng(2).integers(0, 20000, size=(28, 28)).astype(np.uint16)  # a dark image
    values[0, 0], values[0, 1] = 0, 257 * 100
    path = save(tmp_path / f"d{suffix}", values)
    assert Image.open(path).mode.startswith("I;16")
    out = only(path, GRAY)[:, :, 0]
    assert np.array_equal(out, np.rint(values.astype(float) * 255 / 65535).astype(np.uint8))
    assert out[0, 1] == 100 and out.max() == 100  # never stretched to 255


def test_32_bit_tiff_holding_16_bit_data_is_scaled_as_16_bit(tmp_path, capsys):
    values = np.zeros((28, 28), np.int32)  # what Pillow writes from an int32 array: 32 bits, signed
    values[0, 1], values[0, 2] = 65535, 257 * 100
    path = save(tmp_path / "i32.tif", values)
    with Image.open(path) as img:
        assert img.mode == "I" and img.tag_v2[258] in (32, (32,)) and img.tag_v2[339] in (2, (2,))
    out = only(path, GRAY)[:, :, 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 100 and out[5, 5] == 0
    assert "as 16-bit data" in capsys.readouterr().err
    assert only(save(tmp_path / "dark.tif", np.zeros((28, 28), np.int32)), GRAY).max() == 0  # dark stays dark
    values[0, 3] = 2**31 - 1  # beyond 16 bits: the full range of the type
    out = only(save(tmp_path / "wide.tif", values), GRAY)[:, :, 0]
    assert out[0, 3] == 255 and out[0, 0] == 128


def test_int_and_float_modes():
    path = Path("mem")
    ints = np.full((28, 28), 257 * 7, dtype=np.int32)  # mode 'I' holding 16-bit data
    assert np.all(images._fit(Image.fromarray(ints), GRAY, path) == 7)
    floats = np.full((28, 28), 0.25, dtype=np.float32)
    floats[0, 0], floats[0, 1] = 2.0, -1.0
    out = images._fit(Image.fromarray(floats), GRAY, path)[:, :, 0]
    assert out[1, 1] == 64 and out[0, 0] == 255 and out[0, 1] == 0


def test_float_tiff(tmp_path):
    values = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28)
    path = save(tmp_path / "f.tif", values)
    assert Image.open(path).mode == "F"
    assert np.array_equal(only(path, GRAY)[:, :, 0], np.rint(values * 255).astype(np.uint8))


def test_tiff_stack_gives_one_image_per_frame(tmp_path):
    frames = [noise((28, 28), seed=s) for s in (3, 4)]
    path = tmp_path / "stack.tif"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(frames[1])])
    out = images.read(path, GRAY)
    assert [name for name, _ in out] == [f"{path}[frame 0]", f"{path}[frame 1]"]
    assert all(np.array_equal(a[:, :, 0], f) for (_, a), f in zip(out, frames))


def test_exif_orientation_is_applied(tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the phone was turned, rotate 90 degrees clockwise to view
    path = save(tmp_path / "phone.jpg", noise((36, 28)), exif=exif, quality=95)
    with Image.open(path) as img:
        stored = np.asarray(img)  # as decoded, unrotated: 36 rows, 28 columns
    assert np.array_equal(only(path, GRAY)[:, :, 0], np.rot90(stored, -1)[:, 4:32])  # turned, then centre-cropped
    assert "EXIF orientation" in capsys.readouterr().err


def test_mpo_gives_its_first_frame_only(tmp_path, capsys):
    path = tmp_path / "phone.jpg"
    first, preview = Image.fromarray(noise((28, 28, 3))), Image.fromarray(noise((28, 28, 3), seed=1))
    first.save(path, "MPO", save_all=True, append_images=[preview], quality=95)
    with Image.open(path) as img:
        assert img.format == "MPO" and img.n_frames == 2
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(only(path, RGB), expected)  # one image, named by its path alone
    assert "MPO" in capsys.readouterr().err


# --- size: centre crop, then bicubic -----------------------------------------------------------


@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (64, 64)])
def test_crop_then_bicubic_resize_equals_pil(tmp_path, width, height, capsys):
    img = Image.fromarray(noise((height, width, 3)))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    expected = np.asarray(img.crop((left, top, left + side, top + side)).resize((28, 28), Image.BICUBIC))
    assert np.array_equal(only(save(tmp_path / "big.png", img), RGB), expected)
    assert "bicubic" in capsys.readouterr().err


def test_crop_alone_when_the_short_side_fits(tmp_path):
    pixels = noise((36, 28))
    assert np.array_equal(only(save(tmp_path / "tall.png", pixels), GRAY)[:, :, 0], pixels[4:32])


# --- arrays ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,target,stack", [
    ((5, 28, 28), GRAY, True), ((5, 28, 28, 3), RGB, True), ((28, 28), GRAY, False), ((28, 28, 3), RGB, False),
])
def test_npy_layouts(tmp_path, shape, target, stack):
    array = noise(shape)
    path = tmp_path / "a.npy"
    np.save(path, array)
    out = images.read(path, target)
    stacked = array if stack else array[None]
    assert [name for name, _ in out] == ([f"{path}[{i}]" for i in range(len(stacked))] if stack else [str(path)])
    assert all(np.array_equal(a, s.reshape(28, 28, -1)) for (_, a), s in zip(out, stacked))


@pytest.mark.parametrize("shape", [(28, 28, 4), (40, 60, 4), (28, 28, 2), (3, 28, 28, 4)])
def test_an_npy_with_alpha_is_read_as_its_images_alpha_dropped(tmp_path, shape, capsys):
    """Review: an RGBA (H, W, 4) or gray+alpha (H, W, 2) array was read as H strip-shaped
    grayscale images (40 rows of predictions for one image, exit 0). Its alpha is dropped, as a
    PNG's is, and it is the same image as its PNG without alpha."""
    array = noise(shape)
    np.save(tmp_path / "a.npy", array)
    target = RGB if shape[-1] == 4 else GRAY
    out = images.read(tmp_path / "a.npy", target)
    stacked = array if len(shape) == 4 else array[None]
    assert len(out) == len(stacked)
    for (_, got), image in zip(out, stacked):
        plain = save(tmp_path / "plain.png", image[:, :, 0] if shape[-1] == 2 else image[:, :, :3])
        assert np.array_equal(got, only(plain, target))
    assert "dropping the alpha channel" in capsys.readouterr().err


def test_npy_is_converted_like_an_image(tmp_path):
    array = noise((2, 40, 30, 3))
    np.save(tmp_path / "a.npy", array)
    out = images.read(tmp_path / "a.npy", GRAY)
    expected = np.asarray(Image.fromarray(array[1]).convert("L").crop((0, 5, 30, 35)).resize((28, 28), Image.BICUBIC))
    assert np.array_equal(out[1][1][:, :, 0], expected)


def test_npz_medmnist_keys_in_split_order(tmp_path):
    arrays = {k: noise((n, 28, 28, 3), seed=n) for k, n in
              [("test_images", 1), ("val_images", 2), ("train_images", 3), ("extra_images", 4)]}
    path = tmp_path / "blood.npz"
    np.savez_compressed(path, **arrays, train_labels=np.zeros((3, 1), np.int64))
    out = images.read(path, RGB)
    keys = ["train_images"] * 3 + ["val_images"] * 2 + ["test_images"] + ["extra_images"] * 4
    index = [0, 1, 2, 0, 1, 0, 0, 1, 2, 3]
    assert [name for name, _ in out] == [f"{path}:{k}[{i}]" for k, i in zip(keys, index)]
    assert all(np.array_equal(a, arrays[k][i]) for (_, a), k, i in zip(out, keys, index))


def test_npz_without_medmnist_keys_takes_image_shaped_arrays(tmp_path):
    x = noise((3, 28, 28))
    np.savez(tmp_path / "x.npz", x=x, y=np.arange(3))
    out = images.read(tmp_path / "x.npz", GRAY)
    assert [n for n, _ in out] == [f"{tmp_path / 'x.npz'}:x[{i}]" for i in range(3)]
    assert np.array_equal(np.stack([a for _, a in out])[..., 0], x)


def test_big_npz_streams_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_CHUNK", 2)
    x = noise((7, 28, 28))
    np.savez(tmp_path / "big.npz", train_images=x)
    seen = [(names, batch) for names, batch, _ in images.batches([tmp_path / "big.npz"], GRAY, 3)]
    assert [len(names) for names, _ in seen] == [3, 3, 1]
    assert np.array_equal(np.concatenate([b for _, b in seen])[..., 0], x)


# --- DICOM -------------------------------------------------------------------------------------


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", **elements) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    except TypeError:  # pydicom 2
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def test_dicom_window_maps_to_0_255(tmp_path):
    pixels = np.random.default_rng(5).integers(800, 1200, size=(28, 28)).astype(np.uint16)
    pixels[0, :3] = 0, 4095, 1000
    path = write_dicom(tmp_path / "ct.dcm", pixels, WindowCenter=1000, WindowWidth=200,
                       RescaleSlope=1, RescaleIntercept=0)
    out = only(path, GRAY)[:, :, 0].astype(int)
    expected = np.rint(np.clip((pixels - 999.5) / 199 + 0.5, 0, 1) * 255)  # DICOM's LINEAR window
    assert np.abs(out - expected).max() <= 1
    assert out[0, 0] == 0 and out[0, 1] == 255 and abs(out[0, 2] - 128) <= 1


def test_dicom_window_is_a_fixed_range_not_a_stretch(tmp_path):
    pixels = np.random.default_rng(6).integers(950, 1050, size=(28, 28)).astype(np.uint16)  # inside the window
    path = write_dicom(tmp_path / "soft.dcm", pixels, WindowCenter=1000, WindowWidth=401)
    out = only(path, GRAY)[:, :, 0].astype(int)
    expected = np.rint(np.clip((pixels - 999.5) / 400 + 0.5, 0, 1) * 255)
    assert np.abs(out - expected).max() <= 1 and 80 < out.min() and out.max() < 175


def test_dicom_monochrome1_is_inverted_and_found_by_magic(tmp_path):
    pixels = np.tile(np.arange(28, dtype=np.uint16) * 100, (28, 1))
    path = write_dicom(tmp_path / "scan", pixels, photometric="MONOCHROME1")  # no suffix: the DICM magic
    out = only(path, RGB)
    assert out[0, 0, 0] == 255 and out[0, -1, 0] == 0  # min..max stretched, then inverted
    assert np.array_equal(out[..., 0], np.rint(255 - pixels.astype(float) * 255 / 2700).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_dicom_frames(tmp_path):
    pixels = np.stack([np.full((28, 28), 100, np.uint16), np.full((28, 28), 300, np.uint16)])
    pixels[:, 0, 0] = 0
    path = write_dicom(tmp_path / "multi.dcm", pixels)
    out = images.read(path, GRAY)
    assert [n for n, _ in out] == [f"{path}[frame 0]", f"{path}[frame 1]"]
    assert out[0][1][5, 5, 0] == 85 and out[1][1][5, 5, 0] == 255  # one range for the whole file


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(BadFile, match=r"pip install 'medcli\[dicom\]'") as caught:
        images.read(path, GRAY)
    assert caught.value.missing_extra and caught.value.exit_code == EXIT_FAILURE
    assert str(path) in str(caught.value)
    with pytest.raises(BadFile, match=r"medcli\[dicom\]"):  # not one more failed file: the whole read stops
        list(images.batches([path], GRAY, 4))


# --- bad files ---------------------------------------------------------------------------------


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make", [
    lambda p: (p / "empty.png").write_bytes(b"") and None or p / "empty.png",
    lambda p: (p / "text.png").write_text("not an image\n") and None or p / "text.png",
    lambda p: _truncated(save(p / "cut.png", noise((64, 64, 3)))),
    lambda p: _truncated(save(p / "cut.jpg", noise((64, 64, 3)))),
    lambda p: np.save(p / "f.npy", np.zeros((2, 28, 28), np.float32)) or p / "f.npy",
    lambda p: np.save(p / "c5.npy", noise((2, 28, 28, 5))) or p / "c5.npy",
    lambda p: (p / "z.npz").write_bytes(b"PK\x03\x04 broken") and None or p / "z.npz",
    lambda p: np.savez(p / "l.npz", labels=np.arange(3)) or p / "l.npz",
    lambda p: np.savez(p / "fl.npz", train_images=np.zeros((2, 28, 28), np.float64)) or p / "fl.npz",
], ids=["empty", "text", "truncated-png", "truncated-jpeg", "float-npy", "5-channels", "bad-zip", "no-images",
        "float-npz"])
def test_bad_files_name_the_file_in_one_line(tmp_path, make, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's setting must not hide it
    path = make(tmp_path)
    with pytest.raises(BadFile) as caught:
        images.read(path, GRAY)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and not caught.value.missing_extra
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_an_unreadable_file_says_so_not_damaged(tmp_path):
    """(Checked as another user when this runs as root, who reads any file.)"""
    if os.geteuid() != 0:
        path = save(tmp_path / "locked.png", noise((28, 28)))
        path.chmod(0)
        try:
            with pytest.raises(BadFile, match=r"cannot read it \(Permission denied\)") as caught:
                images.read(path, GRAY)
            assert "damaged" not in str(caught.value)
        finally:
            path.chmod(0o644)
        return
    with shared_folder() as folder:
        path = save(folder / "locked.png", noise((28, 28)))
        path.chmod(0)
        nobody = as_nobody("from medcli import images\n"
                           f"try:\n    images.read({str(path)!r}, images.Target(28, 1))\n"
                           "except images.BadFile as exc:\n    print(exc)")
        assert nobody.returncode == 0, nobody.stderr
        assert f"{path}: cannot read it (Permission denied)" in nobody.stdout and "damaged" not in nobody.stdout


def test_an_image_above_pillows_limit_says_so(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", noise((64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadFile, match=r"larger than Pillow's safety limit \(2000 pixels\); downscale it") as caught:
        images.read(path, GRAY)
    assert "damaged" not in str(caught.value)


def test_float_npy_says_what_it_got(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 28, 28), np.float32))
    with pytest.raises(BadFile, match="expected uint8 images \\(MedMNIST layout\\), got float32"):
        images.read(tmp_path / "f.npy", GRAY)


# --- expand ------------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = tmp_path / "in"
    for rel in ["b/2.png", "a.png", "b/10.png", "B.PNG", "c/d/e.npy", ".hidden.png", ".git/x.png", "notes.txt"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    return root


def test_folder_is_walked_in_a_stable_order(tree):
    found = [p.relative_to(tree).as_posix() for p in images.expand([str(tree)])]
    assert found == ["B.PNG", "a.png", "b/10.png", "b/2.png", "c/d/e.npy"]


def test_files_folders_and_globs_in_argument_order(tree, capsys):
    found = images.expand([str(tree / "notes.txt"), str(tree / "b"), str(tree / "**" / "*.png")])
    rel = [p.relative_to(tree).as_posix() for p in found]
    assert rel == ["notes.txt", "b/10.png", "b/2.png", "a.png"]  # the glob's b/*.png were given already
    assert capsys.readouterr().err.count("warning") == 1


def test_missing_paths_and_empty_matches_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="nothere.png: no such file or folder"):
        images.expand([str(tmp_path / "nothere.png")])
    with pytest.raises(UsageError, match=r"no file matches .*\*\.tif"):
        images.expand([str(tmp_path / "*.tif")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UsageError, match="empty: no image files"):
        images.expand([str(tmp_path / "empty")])


# --- batches -----------------------------------------------------------------------------------


def test_batches_stream_and_survive_a_bad_file(tmp_path):
    stack = noise((4, 28, 28))
    np.save(tmp_path / "a.npy", stack)
    single = save(tmp_path / "b.png", noise((28, 28), seed=9))
    (tmp_path / "bad.png").write_text("no")
    late = tmp_path / "c.npz"
    paths = [tmp_path / "a.npy", single, tmp_path / "bad.png", late]
    stream = images.batches(paths, GRAY, 3)
    names, batch, failures = next(stream)
    assert names == [f"{tmp_path / 'a.npy'}[{i}]" for i in range(3)] and failures == []
    assert batch.shape == (3, 28, 28, 1) and np.array_equal(batch[..., 0], stack[:3])
    np.savez(late, train_images=noise((2, 28, 28), seed=3))  # written only now: nothing was read ahead
    rest = list(stream)
    assert [len(n) for n, _, _ in rest] == [3, 1]
    assert rest[0][0] == [f"{tmp_path / 'a.npy'}[3]", str(single), f"{late}:train_images[0]"]
    assert len(rest[0][2]) == 1 and rest[0][2][0][0] == str(tmp_path / "bad.png")
    assert rest[1][0] == [f"{late}:train_images[1]"] and rest[1][2] == []
    assert np.array_equal(rest[0][1][1, :, :, 0], np.asarray(Image.open(single)))


def test_a_failure_at_the_end_comes_with_no_images(tmp_path):
    save(tmp_path / "a.png", noise((28, 28)))
    (tmp_path / "z.png").write_bytes(b"")
    out = list(images.batches([tmp_path / "a.png", tmp_path / "z.png"], GRAY, 1))
    assert [len(n) for n, _, _ in out] == [1, 0]
    assert out[1][1].shape == (0, 28, 28, 1) and out[1][2] == [(str(tmp_path / "z.png"), "empty file (0 bytes)")]


# --- review: files a researcher brings --------------------------------------------------------


def test_a_dicom_pydicom_cannot_window_fails_alone_and_a_palette_one_is_rgb(tmp_path):
    """Review: a DICOM with WindowWidth 0 (or a PALETTE COLOR one with a window) raised pydicom's
    ValueError outside the per-file guard: "unexpected ValueError", exit 1, no CSV, and the good
    files of the batch lost. It fails alone; a palette image is read through its colour table."""
    good = save(tmp_path / "a.png", noise((28, 28)))
    bad = write_dicom(tmp_path / "w0.dcm", np.full((28, 28), 900, np.uint16), WindowCenter=1000, WindowWidth=0)
    names = [name for batch_names, _, _ in images.batches([good, bad, good.with_name("b.png")], GRAY, 8)
             for name in batch_names]
    failures = [f for _, _, fails in images.batches([bad], GRAY, 8) for f in fails]
    assert names == [str(good)] and failures[0][0] == str(bad) and "not supported" in failures[0][1]
    index = np.tile(np.arange(28, dtype=np.uint16) % 4, (28, 1))
    table = [0, 65535, 0, 32768]  # 16-bit entries: black, white, black, mid
    palette = write_dicom(tmp_path / "us.dcm", index, photometric="PALETTE COLOR",
                          RedPaletteColorLookupTableDescriptor=[4, 0, 16],
                          GreenPaletteColorLookupTableDescriptor=[4, 0, 16],
                          BluePaletteColorLookupTableDescriptor=[4, 0, 16],
                          RedPaletteColorLookupTableData=np.array(table, "<u2").tobytes(),
                          GreenPaletteColorLookupTableData=np.array(table, "<u2").tobytes(),
                          BluePaletteColorLookupTableData=np.array(table, "<u2").tobytes())
    out = only(palette, RGB)
    assert out[0, :4, 0].tolist() == [0, 255, 0, 128]


def test_folders_follow_links_find_dicom_without_a_suffix_and_say_what_they_leave_out(tmp_path, capsys):
    """Review: a linked folder's images were skipped without a word (os.walk does not follow
    links), as were .webp/.gif files and a scanner's series of DICOM files without a suffix
    ("no image files")."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save(elsewhere / "x.png", noise((28, 28)))
    top = tmp_path / "top"
    (top / "series").mkdir(parents=True)
    save(top / "a.png", noise((28, 28)))
    (top / "linked").symlink_to(elsewhere)
    (top / "loop").symlink_to(top)  # a link back up the tree is walked once
    write_dicom(top / "series" / "IM0001", np.full((28, 28), 5, np.uint16))
    (top / "b.webp").write_bytes(b"x")
    (top / "c.gif").write_bytes(b"x")
    found = [p.relative_to(top).as_posix() for p in images.expand([str(top)])]
    assert found == ["a.png", "linked/x.png", "series/IM0001"]
    assert "left out 2 files of other types (1 .gif, 1 .webp)" in " ".join(capsys.readouterr().err.split())


def test_unsigned_32_bit_tiff_keeps_its_bright_pixels_and_flat_data_is_named(tmp_path, capsys):
    """Review: PIL holds uint32 TIFF data as int32, so every value from 2**31 wrapped negative and
    turned black; 12-bit data in a 16-bit PNG read as a nearly black image without a word."""
    tifffile = pytest.importorskip("tifffile")
    gray = noise((28, 28), seed=4)
    tifffile.imwrite(tmp_path / "u32.tif", gray.astype(np.uint32) * 16843009)  # 0..255 -> 0..2**32-1
    assert np.abs(only(tmp_path / "u32.tif", GRAY)[:, :, 0].astype(int) - gray).max() <= 1
    assert "nearly flat" not in capsys.readouterr().err
    save(tmp_path / "twelve.png", (gray.astype(np.uint16) * 16).astype(np.uint16))  # 0..4080 in 16 bits
    only(tmp_path / "twelve.png", GRAY)
    assert "twelve.png: its values span" in " ".join(capsys.readouterr().err.split())


def test_a_single_2d_image_in_an_npz_and_a_channel_first_array_is_named(tmp_path, capsys):
    """Review: an npz holding one (H, W) image was refused although the message lists (H, W); a
    (3, H, W) .npy (one channel-first RGB image) became 3 gray images without a word."""
    gray = noise((28, 28))
    np.savez(tmp_path / "one.npz", img=gray)
    assert np.array_equal(images.read(tmp_path / "one.npz", GRAY)[0][1][:, :, 0], gray)
    np.save(tmp_path / "chw.npy", noise((3, 28, 28)))
    assert len(images.read(tmp_path / "chw.npy", GRAY)) == 3
    assert "channel-first image must be saved as (H, W, 3)" in " ".join(capsys.readouterr().err.split())


def test_an_image_of_five_to_seven_channels_is_refused_not_read_as_strips(tmp_path):
    """Review: a (64, 64, 6) .npy (a 6-channel image) was read as 64 images 6 px wide, each
    blown up to 28 x 28 and predicted, without a word. A stack of images 8 px wide or more, and
    (H, W, 1..4) images, read as before."""
    np.save(tmp_path / "six.npy", noise((64, 64, 6)))
    with pytest.raises(BadFile, match=r"shape \(64, 64, 6\): a last axis of 6 is neither an image's channels"):
        images.read(tmp_path / "six.npy", GRAY)
    np.save(tmp_path / "stack.npy", noise((5, 28, 8)))
    assert len(images.read(tmp_path / "stack.npy", GRAY)) == 5


def test_an_npz_of_images_and_labels_reads_the_images_once_in_a_fixed_order(tmp_path, capsys):
    """Review of the fixes above: with 2-D arrays allowed, an npz pairing images with an (N, 1)
    label array failed whole ("y: expected uint8 images"); a channel-first array's warning came
    twice; which path a linked folder's files got followed the disk's order."""
    np.savez(tmp_path / "xy.npz", x=noise((4, 28, 28)), y=np.arange(4, dtype=np.int64)[:, None])
    np.savez(tmp_path / "xy8.npz", x=noise((4, 28, 28)), y=np.arange(4, dtype=np.uint8)[:, None])
    for name in ("xy.npz", "xy8.npz"):
        assert [n for n, _ in images.read(tmp_path / name, GRAY)] == [f"{tmp_path / name}:x[{i}]" for i in range(4)]
    np.savez(tmp_path / "cf.npz", img=noise((3, 28, 28)))
    images.read(tmp_path / "cf.npz", GRAY)
    assert capsys.readouterr().err.count("channel-first") == 1
    tree = tmp_path / "tree"
    for i in range(6):
        (tree / f"real{i}").mkdir(parents=True)
        save(tree / f"real{i}" / "x.png", noise((28, 28)))
        (tree / f"link{i}").symlink_to(tree / f"real{i}")
    assert [p.parent.name for p in images.expand([str(tree)])] == [f"link{i}" for i in range(6)]

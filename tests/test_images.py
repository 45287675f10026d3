"""Reading user images as displayed (EXIF orientation applied, as cv2.imread does) and numbering outputs."""

import cv2
import numpy as np
import pytest
from PIL import Image

from genmask_jax.infer import images


def write_rotated_jpeg(path, height: int, width: int) -> np.ndarray:
    """Stores a `(height, width)` JPEG tagged Orientation 6 (shown rotated 90 degrees clockwise); returns
    the stored pixels: a bright left third, the rest dark."""
    stored = np.full((height, width, 3), 30, np.uint8)
    stored[:, : width // 3] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return stored


def test_read_image_applies_exif_orientation(tmp_path):
    path = tmp_path / "phone.jpg"
    stored = write_rotated_jpeg(path, 20, 42)
    image = images.read_image(path)
    assert image.shape == (42, 20, 3)  # as displayed, and as LISA's cv2.imread reads it
    reference = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.abs(image.astype(int) - reference).max() <= 8
    # the stored left third is the displayed top third
    np.testing.assert_allclose(image[:13].mean(), 220, atol=8)
    np.testing.assert_allclose(image[15:].mean(), 30, atol=8)
    np.testing.assert_allclose(np.rot90(stored, k=-1).mean(axis=(1, 2)), image.mean(axis=(1, 2)), atol=12)


def test_read_image_without_orientation_and_errors(tmp_path):
    path = tmp_path / "plain.png"
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(images.read_image(path), pixels)
    with pytest.raises(images.InputError, match="does not exist"):
        images.read_image(tmp_path / "missing.jpg")


def test_an_output_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A rerun of the evaluation job rewrote a finished example's PNG in place: a kill mid-write left an
    empty file behind a committed record."""
    path = tmp_path / "masks" / "000000000.png"
    images.write_mask(np.eye(4, dtype=bool), path)

    def killed(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        images.write_mask(np.ones((4, 4), bool), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(Image.open(path)) > 0, np.eye(4, dtype=bool))


def test_an_image_too_large_for_pil_is_an_input_error(tmp_path, monkeypatch):
    """PIL's DecompressionBombError (over 2 x MAX_IMAGE_PIXELS, 179 MP) is no OSError: it was a traceback."""
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(images.InputError, match=f"cannot read image {path}: Image size"):
        images.read_image(path)


@pytest.mark.parametrize(
    "path, i, n, expected",
    [
        ("m.png", 0, 1, "m.png"),
        ("m.png", 2, 3, "m_2.png"),
        ("masks/m", 1, 2, "masks/m_1.png"),
        ("out/{i}.png", 1, 3, "out/1.png"),
        ("out/{i}.png", 0, 1, "out/0.png"),  # one output: the pattern is still filled in
        ("run{i}/m{i}.png", 4, 5, "run4/m4.png"),
        ("{date}/m_{i}.png", 2, 3, "{date}/m_2.png"),  # other braces are kept, not a KeyError
        ("{date}/m.png", 1, 2, "{date}/m_1.png"),
        ("{date}/m.png", 0, 1, "{date}/m.png"),
        ("m_{0}.png", 1, 2, "m_{0}_1.png"),
    ],
)
def test_numbered(path, i, n, expected):
    assert images.numbered(path, i, n) == expected


def test_read_image_scales_16_bit_greyscale_to_8_bits(tmp_path):
    """PIL opens a 16-bit PNG as "I;16", whose convert("RGB") clips every value above 255 to white;
    cv2.imread keeps the high byte."""
    path = tmp_path / "depth.png"
    grey = (np.arange(4 * 6, dtype=np.uint16) * 2800).reshape(4, 6)
    Image.fromarray(grey).save(path)
    image = images.read_image(path)
    assert image.shape == (4, 6, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))
    np.testing.assert_array_equal(image, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))


def test_read_image_refuses_floating_point_and_signed_pixels(tmp_path):
    """A float TIFF (mode "F", values in [0, 1]) and signed 32-bit pixels were read as a black image; the
    array API refuses float images for this reason. 16-bit unsigned PNGs keep working (above)."""
    floats = tmp_path / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((6, 8)).astype(np.float32), "F").save(floats)
    with pytest.raises(images.InputError, match=r"float.tif: an image of floating-point pixels \(mode F\)"):
        images.read_image(floats)
    signed = tmp_path / "signed.tif"
    Image.fromarray(np.array([[-300, -1, 0, 100]], np.int32), "I").save(signed)
    with pytest.raises(images.InputError, match=r"32-bit pixels from -300 to 100 \(mode I\)"):
        images.read_image(signed)


@pytest.mark.parametrize("name, image_format", [("a.png", "PNG"), ("a", "PNG"), ("a.jpg", "JPEG"),
                                                ("a.JPEG", "JPEG"), ("a.webp", "WEBP"), ("a.bmp", "BMP"),
                                                ("a.tiff", "TIFF")])
def test_an_image_is_written_in_the_format_of_its_extension(tmp_path, name, image_format):
    """Every output was PNG bytes whatever its name (a.jpg held a PNG)."""
    image = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    images.write_image(image, tmp_path / name)
    with Image.open(tmp_path / name) as written:
        assert written.format == image_format and written.size == (10, 8)
        if image_format not in images.LOSSY_FORMATS:
            np.testing.assert_array_equal(np.asarray(written), image)


@pytest.mark.parametrize("name", ["m.png", "m.bmp", "m.tif", "m"])
def test_a_mask_is_written_losslessly_in_the_format_of_its_extension(tmp_path, name):
    mask = np.random.default_rng(0).random((8, 10)) > 0.5
    images.write_mask(mask, tmp_path / name)
    with Image.open(tmp_path / name) as written:
        np.testing.assert_array_equal(np.asarray(written), mask.astype(np.uint8) * 255)


@pytest.mark.parametrize(
    "name, lossless, message",
    [
        ("m.jpg", True, r"cannot write a mask to .*m.jpg: '.jpg' is a lossy .*; use .png, .bmp, .tif$"),
        ("m.jpeg", True, "'.jpeg' is a lossy format"),
        ("m.webp", True, "'.webp' is a lossy format"),
        ("m.gif", False, r"cannot write an image to .*m.gif: '.gif' is not offered; use .png, .bmp, .tif, "),
        ("m.pdf", True, "'.pdf' is not offered"),
    ],
)
def test_outputs_of_lossy_or_other_formats_are_refused(tmp_path, name, lossless, message):
    with pytest.raises(images.InputError, match=message):
        images.output_format(tmp_path / name, lossless)
    write = images.write_mask if lossless else images.write_image
    with pytest.raises(images.InputError, match=message):
        write(np.zeros((4, 4, 3) if not lossless else (4, 4), np.uint8), tmp_path / name)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["frame.0001", "mask_thr0.5", "m.xyz"])
def test_a_suffix_that_is_no_image_extension_is_part_of_the_name_and_written_as_png(tmp_path, name):
    images.write_mask(np.ones((4, 4), bool), tmp_path / name)
    with Image.open(tmp_path / name) as written:
        assert written.format == "PNG"


def test_check_writable_refuses_paths_under_a_file_and_folders_but_creates_nothing(tmp_path):
    (tmp_path / "image.png").write_bytes(b"")
    with pytest.raises(images.InputError, match=r"image.png/deeper/m.png: .*image.png is a file, not a"):
        images.check_writable(tmp_path / "image.png" / "deeper" / "m.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(images.InputError, match="folder.png: it is a folder"):
        images.check_writable(tmp_path / "folder.png")
    images.check_writable(tmp_path / "new" / "deeper" / "m.png")
    assert not (tmp_path / "new").exists()
    assert images.output_paths(str(tmp_path / "new" / "{i}.png"), 2) == [str(tmp_path / "new" / f"{i}.png")
                                                                         for i in range(2)]


def test_an_existing_writable_file_is_writable_in_a_folder_that_is_not(tmp_path, monkeypatch):
    """/dev/stdout, or a file kept writable in a read-only folder: the old writer wrote them, and only
    the file's own permission matters (os.access is faked: as root every test passes)."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "mask.png").write_bytes(b"")
    writable = {str(tmp_path / "ro" / "mask.png")}
    monkeypatch.setattr(images.os, "access", lambda path, mode: str(path) in writable)
    images.check_writable(tmp_path / "ro" / "mask.png")
    with pytest.raises(images.InputError, match="no permission to write in .*ro$"):
        images.check_writable(tmp_path / "ro" / "new.png")
    writable.clear()
    with pytest.raises(images.InputError, match="mask.png: no permission to write it"):
        images.check_writable(tmp_path / "ro" / "mask.png")


def test_outputs_are_checked_on_the_writing_process_and_a_failure_stops_all(monkeypatch):
    """Only process 0 writes, and other hosts may not see its disks: they skip the check, and learn of
    its failure through one gather, so that no process waits alone in a collective."""
    import jax
    from jax.experimental import multihost_utils

    from genmask_jax.infer import cli

    checked = []

    def check(path):
        checked.append(path)
        raise images.InputError(f"cannot write {path}: no permission to write in /mnt")

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([1, 0], np.int32))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(images.InputError, match="process 0 cannot write the outputs"):
        cli.check_on_writer(check, ["/mnt/x.png"])
    assert not checked
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(images.InputError, match="no permission to write in /mnt"):
        cli.check_on_writer(check, ["/mnt/x.png"])
    assert checked
    # Any error of process 0's, not only an InputError (a gs:// out whose credentials fail): the others
    # must still hear of it, not wait for process 0 in the next collective.
    sent = []
    gather = lambda x: sent.append(int(x)) or np.array([1, 0])  # noqa: E731
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)

    def refused(path):
        raise PermissionError(403, "Forbidden", path)

    with pytest.raises(PermissionError, match="Forbidden"):
        cli.check_on_writer(refused, ["gs://bucket/x.png"])
    assert sent == [1]

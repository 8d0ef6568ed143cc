"""Volumes with real retinal content, built from the bundled real B-scans, in each format.

The B-scans are Kermany et al.'s (``assets/test-scans``, CC BY 4.0), 384x372 JPEGs. Each
builder writes a file the way the device software does, with the format's own structures:

* ``.vol``: eyepy's ``construct`` definition of the format (``vol_format``), the intensities
  written with eyepy's inverse display transform (``to_vol_intensity``), which the reader's
  transform maps back to the very same 8-bit values (checked by the tests);
* DICOM Ophthalmic Tomography: :func:`mirage_demo.volume_dicom.write_opt` (pydicom), frames
  uncompressed or as the original JPEG files;
* Heidelberg XML export: an XML in the layout of eyepy's test export, one PNG per B-scan and a
  localizer PNG (a folder or a zip);
* ``.e2e``: eyepy's ``construct`` definitions of the file, chunk, folder and container headers;
  B-scan intensities as the format's 16-bit floats, chosen so that eyepy's display transform
  gives back the 8-bit values.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TEST_SCANS = ROOT / "assets" / "test-scans" / "images"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "volumes"
EYEPY_TEST_VOLUME = FIXTURES / "test_volume.vol"
SIZE = (384, 372)  # (width, height) of the bundled B-scans used


def real_bscans(classes: Sequence[str]) -> list[Path]:
    """Bundled real B-scans of :data:`SIZE`, one per entry of ``classes`` (each class's scans
    taken in name order: the n-th "DME" is its n-th scan)."""
    taken: dict[str, int] = {}
    paths = []
    for name in classes:
        scans = _scans_of(name)
        paths.append(scans[taken.get(name, 0)])
        taken[name] = taken.get(name, 0) + 1
    return paths


@lru_cache(maxsize=8)
def _scans_of(name: str) -> list[Path]:
    found = []
    for path in sorted((TEST_SCANS / name).iterdir()):
        with Image.open(path) as image:
            if image.size == SIZE:
                found.append(path)
    return found


def gray(path: Path) -> np.ndarray:
    """A B-scan as the uint8 array its file decodes to."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def localizer_image(size: int = 96) -> np.ndarray:
    """A stand-in en-face localizer (a bright disc on a dark field), uint8."""
    yy, xx = np.mgrid[:size, :size]
    disc = np.hypot(yy - size / 2, xx - size / 2) < size / 3
    return (40 + 160 * disc).astype(np.uint8)


def write_vol(
    path: Path,
    bscans: Sequence[np.ndarray],
    *,
    laterality: str = "OD",
    localizer: np.ndarray | None = None,
    n_bscans: int | None = None,
) -> Path:
    """A Heidelberg ``.vol`` built with eyepy's format definition; ``n_bscans`` overrides the
    count the header declares (for hostile files)."""
    import construct as cs
    from eyepy.io.he.vol_reader import vol_format

    # eyepy's own date adapter builds exam_time as a float, which its Int64 refuses: raw here
    fields = [
        ("exam_time" / cs.Int64ul) if f.name == "exam_time" else f for f in vol_format.subcons
    ]
    localizer = localizer_image() if localizer is None else localizer
    height, width = bscans[0].shape
    scale_slo = 0.03  # mm per localizer pixel
    when = "2020-01-01T00:00:00"
    data = cs.Struct(*fields).build(
        dict(
            size_x=width,
            n_bscans=len(bscans),
            size_y=height,
            scale_x=0.0118,
            distance=0.12,
            scale_y=0.0039,
            size_x_slo=localizer.shape[1],
            size_y_slo=localizer.shape[0],
            scale_x_slo=scale_slo,
            scale_y_slo=scale_slo,
            scan_position=laterality,
            exam_time=0,
            id="1",
            reference_id="",
            dob=when,
            visit_date=when,
            grid_type=0,
            grid_offset=0,
            grid_type1=0,
            grid_offset1=0,
            prog_id="",
            localizer=localizer,
            bscans=[
                _vol_bscan(b, i, len(bscans), localizer, scale_slo) for i, b in enumerate(bscans)
            ],
        )
    )
    if n_bscans is not None:  # the count after the 12-byte version and the width
        data = data[:16] + struct.pack("<I", n_bscans) + data[20:]
    path.write_bytes(data)
    return path


def _vol_bscan(bscan: np.ndarray, index: int, count: int, localizer: np.ndarray, scale: float):
    from eyepy.core.utils import to_vol_intensity

    side = localizer.shape[0] * scale
    y = side * (0.2 + 0.6 * index / max(1, count - 1))
    return dict(
        bscan_hdr_size=256,
        start_x=side * 0.15,
        start_y=y,
        end_x=side * 0.85,
        end_y=y,
        num_seg=0,
        quality=30.0,
        shift=0,
        iv_transformation=[0.0] * 6,
        layer_segmentations=np.zeros((0, bscan.shape[1]), np.float32),
        data=to_vol_intensity(bscan).astype(np.float32),
    )


XML_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<HEDX>
  <BODY>
    <SWVersion><Name>Spectralis Viewing Module</Name><Version>6.9.53.0</Version></SWVersion>
    <Patient>
      <ID>1</ID><PatientID>Study-01</PatientID><LastName>Doe</LastName><FirstNames>J</FirstNames>
      <Birthdate><Date><Year>2000</Year><Month>01</Month><Day>01</Day></Date></Birthdate>
      <Study>
        <ID>1</ID>
        <StudyDate><Date><Year>2020</Year><Month>01</Month><Day>01</Day></Date></StudyDate>
        <Series>
          <ID>2</ID><Modality>OCT</Modality><Type>Volume</Type>
          <Laterality>{laterality}</Laterality>
          <ReferenceSeries><ID>2</ID>
            <ExamDate><Date><Year>2020</Year><Month>01</Month><Day>01</Day></Date></ExamDate>
          </ReferenceSeries>
          <NumImages>{images}</NumImages>
          <Image>
            <ID>0</ID><ImageNumber>0</ImageNumber>
            <ImageType><Type>LOCALIZER</Type><LightSource>IR</LightSource></ImageType>
            <OphthalmicAcquisitionContext>
              <Width>{slo}</Width><Height>{slo}</Height><ScaleX>0.03</ScaleX><ScaleY>0.03</ScaleY>
              <Angle>30</Angle><Focus>0.0</Focus>
            </OphthalmicAcquisitionContext>
            <ImageData><Extension>PNG</Extension>
              <ExamURL>file:///\\\\host\\export\\{localizer}</ExamURL></ImageData>
          </Image>
{bscans}
        </Series>
      </Study>
    </Patient>
  </BODY>
</HEDX>
"""
XML_BSCAN = """          <Image>
            <ID>{number}</ID><ImageNumber>{number}</ImageNumber>
            <ImageType><Type>OCT</Type></ImageType>
            <OphthalmicAcquisitionContext>
              <Width>{width}</Width><Height>{height}</Height>
              <ScaleX>0.0118</ScaleX><ScaleY>0.0039</ScaleY><ImageQuality>30</ImageQuality>
              <Start><Coord><X>0.45</X><Y>{y:.4f}</Y></Coord></Start>
              <End><Coord><X>2.45</X><Y>{y:.4f}</Y></Coord></End>
            </OphthalmicAcquisitionContext>
            <ImageData><Extension>PNG</Extension>
              <ExamURL>file:///\\\\host\\export\\{name}</ExamURL></ImageData>
          </Image>"""


def write_xml_export(
    folder: Path,
    bscans: Sequence[np.ndarray],
    *,
    laterality: str = "L",
    names: Sequence[str] | None = None,
) -> Path:
    """A Heidelberg XML export: ``export.xml``, ``B1.png``... and ``NIR.png``; ``names``
    overrides the B-scan file names the XML gives (for hostile exports)."""
    folder.mkdir(parents=True, exist_ok=True)
    localizer = localizer_image()
    Image.fromarray(localizer).save(folder / "NIR.png")
    height, width = bscans[0].shape
    entries = []
    for i, bscan in enumerate(bscans):
        name = names[i] if names is not None else f"B{i + 1}.png"
        Image.fromarray(bscan).save(folder / f"B{i + 1}.png")
        y = 0.6 + 1.6 * i / max(1, len(bscans) - 1)
        entries.append(XML_BSCAN.format(number=i + 1, width=width, height=height, y=y, name=name))
    text = XML_TEMPLATE.format(
        laterality=laterality,
        images=len(bscans) + 1,
        slo=localizer.shape[0],
        localizer="NIR.png",
        bscans="\n".join(entries),
    )
    (folder / "export.xml").write_text(text)
    return folder


def zip_folder(folder: Path, path: Path, prefix: str = "") -> Path:
    """The folder's files in a zip (under ``prefix/`` if given)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{prefix}{file.name}")
    return path


# --------------------------------------------------------------------------------------------
# .e2e


@lru_cache(maxsize=1)
def _e2e_codes() -> np.ndarray:
    """For each 8-bit value, a 16-bit float code that eyepy's E2E reading maps back to it."""
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he.e2e_format import Bscan

    shown = from_e2e_intensity(Bscan.LUT.astype(np.float32).copy())
    codes = np.zeros(256, np.uint16)
    for value in range(256):
        found = np.flatnonzero(shown == value)
        assert found.size, f"no E2E code shows as {value}"
        codes[value] = found[found.size // 2]
    return codes


def write_e2e(path: Path, bscans: Sequence[np.ndarray], *, laterality: str = "OD") -> Path:
    """A minimal ``.e2e`` (one patient, study and series: its laterality, a localizer and one
    image folder per B-scan), laid out with eyepy's format definitions."""
    from eyepy.io.he.e2e_format import (
        ContainerHeader,
        FolderHeader,
        Header,
        TypesEnum,
        Version,
        containerheader_format,
        folderheader_format,
        header_format,
        version_format,
    )

    localizer = localizer_image()
    eye = bytes([82 if laterality == "OD" else 76])  # "R" or "L"
    items = [(TypesEnum.laterality, -1, b"\x00" * 14 + eye + b"\x00" * 12)]
    image = TypesEnum.image
    items.append((image, -1, _e2e_image(33620481, localizer.tobytes(), localizer.shape)))
    codes = _e2e_codes()
    for i, bscan in enumerate(bscans):
        pixels = codes[bscan].astype("<u2").tobytes()
        items.append((image, 2 * i, _e2e_image(35652097, pixels, bscan.shape)))
    start = version_format.sizeof() + 2 * header_format.sizeof() + 44 * len(items)
    folders, containers = [], []
    for kind, slice_id, item in items:
        ids = dict(patient_id=1, study_id=1, series_id=1, slice_id=slice_id, type=kind)
        folder = FolderHeader(
            pos=0, start=start, size=len(item), unknown0=0, ind=1, unknown1=0, unknown3=0, **ids
        )
        folders.append(folderheader_format.build(folder))
        header = ContainerHeader(
            magic3="MDbData",
            unknown0=0,
            header_pos=0,
            pos=start,
            size=len(item),
            unknown1=0,
            ind=1,
            unknown2=0,
            unknown3=0,
            **ids,
        )
        containers.append(containerheader_format.build(header) + item)
        start += containerheader_format.sizeof() + len(item)

    def chunk_header(entries: int) -> bytes:
        return header_format.build(
            Header(
                magic2="MDbMDir",
                version=0x64,
                unknown0=[0] * 10,
                num_entries=entries,
                current=0,
                prev=0,
                unknown1=0,
            )
        )

    path.write_bytes(
        version_format.build(Version(name="CMDb", version=0x64, unknown0=[0] * 10))
        + chunk_header(0)  # the file's main header
        + chunk_header(len(items))
        + b"".join(folders)
        + b"".join(containers)
    )
    return path


def _e2e_image(kind: int, pixels: bytes, shape: tuple[int, int]) -> bytes:
    height, width = shape
    return struct.pack("<5I", len(pixels), kind, height * width, height, width) + pixels

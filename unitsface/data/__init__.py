"""Face data without MXNet: RecordIO datasets, verification `.bin` files, image codecs.

- `recordio`: `.rec`/`.idx` reading and writing, `IRHeader`, insightface's dataset layout
  (`scan_dataset`, `write_face_dataset`).
- `bins`: `.bin` verification sets through a restricted unpickler (`load_bin`, `save_bin`).
- `images`: JPEG/PNG/PGM decoding to RGB, face-sized resizing.
- `dataset`: torch datasets and the loader (imports torch; not imported here).
- `masks`: face masks rendered on aligned faces (MFR probes, mask augmentation).
- `tools`: back ends of `unitsface data ...`.
"""

from unitsface.data.bins import load_bin, save_bin
from unitsface.data.images import decode, encode_jpeg, encode_png, to_face_image
from unitsface.data.recordio import IndexedRecordIO, IRHeader, RecordIndex, scan_dataset, write_face_dataset

__all__ = [
    "IRHeader",
    "IndexedRecordIO",
    "RecordIndex",
    "decode",
    "encode_jpeg",
    "encode_png",
    "load_bin",
    "save_bin",
    "scan_dataset",
    "to_face_image",
    "write_face_dataset",
]

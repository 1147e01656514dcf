"""unitsface: face recognition with unified-threshold losses (UniTSFace, UniFace, EPL, UNPG).

The public entry points are `unitsface.models.build`, `unitsface.heads.build`,
`unitsface.losses.functional`, the trainer in `unitsface.training`, the protocols in
`unitsface.evaluation`, and `unitsface.FaceVerifier` for deployment.
"""

from __future__ import annotations

__version__ = "0.1.0"

from unitsface.errors import UnitsfaceError

__all__ = ["UnitsfaceError", "FaceVerifier", "__version__"]


def __getattr__(name: str):
    # FaceVerifier pulls in onnxruntime; import it only when asked for.
    if name == "FaceVerifier":
        from unitsface.verifier import FaceVerifier

        return FaceVerifier
    raise AttributeError(name)

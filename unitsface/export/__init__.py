"""Deployable forms of a trained backbone: ONNX and TorchScript, each checked against PyTorch.

`export_onnx` / `export_torchscript` write the backbone alone (no classification head), with
the input contract, embedding size, learned threshold, training head and source checkpoint
sha256 as metadata. `load_onnx` is the ONNX loader shared by every unitsface tool;
`mfr_rules.check_mfr_rules` says which MFR submission rules any ONNX file meets.
"""

from unitsface.export.common import TOLERANCE, ExportReport, FlipSum
from unitsface.export.onnx import OnnxModel, export_onnx, load_onnx, read_metadata
from unitsface.export.torchscript import export_torchscript

__all__ = ["TOLERANCE", "ExportReport", "FlipSum", "OnnxModel", "export_onnx", "export_torchscript", "load_onnx",
           "read_metadata"]

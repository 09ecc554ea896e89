"""Export a discrete network to ONNX and verify the file: onnx.checker plus onnxruntime vs PyTorch."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = OPSET) -> Path:
    """Write `model` (eval mode, dynamic batch axis) to `path` atomically and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(*input_shape)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter handles these plain nn graphs in ~0.1 s, far faster than dynamo.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (example,), tmp, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...], opset: int = OPSET) -> bytes:
    """The ONNX file `export_onnx` would write, as bytes (what the profiler times, no disk round trip)."""
    import io

    buf = io.BytesIO()
    threads = torch.get_num_threads()
    # Tracing these small graphs gains nothing from threads; on a busy CPU one thread exports ~3x faster.
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Deprecation and constant-folding notices are about the exporter, not the model; the profiler exports hundreds.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                model.eval(), (torch.zeros(*input_shape),), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        torch.set_num_threads(threads)
    return buf.getvalue()


def verify_onnx(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Run onnx.checker, then return max |onnxruntime(x) - model(x)| (eval mode)."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().numpy().astype(np.float32)})[0]
    with torch.no_grad():
        want = model.eval()(x).cpu().numpy()
    return float(np.max(np.abs(got - want)))

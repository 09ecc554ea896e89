"""`hwnas info`: the extension field that benchmarks/cuda_build.sh checks."""
from __future__ import annotations

import json

import pytest

from hwnas.cli import main


def test_info_reports_the_extension_build(capsys):
    _C = pytest.importorskip("hwnas._C", reason="hwnas._C is not built")
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"] == {"built": True, "with_cuda": bool(_C.with_cuda)}
    assert "cpu" in info["kernel_backends"]

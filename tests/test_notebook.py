"""notebooks/inspect_predictions.ipynb runs top to bottom on a tiny checkpoint; stored without outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from conftest import TINY_SEG

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_predictions.ipynb"


def test_stored_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"strip the outputs of: {cell.source[:60]!r}"
        )
    assert "parameters" in code[0].metadata.get("tags", [])


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    # ipykernel's own "python3" spec runs the current interpreter (jupyter_client swaps "python" for
    # sys.executable); nothing is installed into the user's kernel folder
    assert "python3" in KernelSpecManager().find_kernel_specs(), "ipykernel's python3 kernel spec is missing"

    run = (
        tmp_path / "run"
    )  # a real run folder (.hydra/config.yaml + checkpoints/last.ckpt) from the entry point
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mic_uda.train",
            f"hydra.run.dir={run}",
            *TINY_SEG,
            "method=mic",
            "test=false",
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / ".hydra" / "config.yaml").is_file()

    monkeypatch.setenv("MIC_UDA_RUN_DIR", str(run))
    monkeypatch.setenv("MIC_UDA_NUM_IMAGES", "2")
    monkeypatch.setenv("MIC_UDA_DEVICE", "cpu")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SegUDAModule, method mic" in text and "mIoU" in text and "sidewalk" in text
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 6  # samples, prediction panels, confidence maps, masks, ...

"""Third-party steps: a tiny plugin package, installed with pip (into a target folder put on the
path of the CLI process, so the test venv stays as it was), registers a step through the
``weightsmith.steps`` entry-point group and runs end to end through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

PLUGIN = '''
"""A toy pruner: zero the rows of each layer whose L2 norm is smallest (a whole-row structured prune)."""
from typing import Literal

import torch
from pydantic import Field

from weightsmith.config import Strict
from weightsmith.encodings import Sparsity
from weightsmith.quant.registry import register


class RowPruneConfig(Strict):
    name: Literal["toy_rowprune"] = "toy_rowprune"
    rows: float = Field(0.25, ge=0.0, lt=1.0, description="fraction of the output rows set to zero")


def prune(state, cfg, ctx):
    """Toy: zero the output rows of smallest norm."""
    k = int(state.W.shape[0] * cfg.rows)
    order = state.W.norm(dim=1).argsort()
    mask = torch.ones_like(state.W, dtype=torch.bool)
    mask[order[:k]] = False
    state.add(Sparsity(mask, "unstructured"), state.W * mask, {"toy_rows": k})


register("toy_rowprune", RowPruneConfig, kind="pruner", produces=("sparsity",))(prune)
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "src"
    (pkg / "ws_toy_plugin").mkdir(parents=True)
    (pkg / "ws_toy_plugin" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "ws-toy-plugin"
        version = "0.0.1"

        [project.entry-points."weightsmith.steps"]
        toy_rowprune = "ws_toy_plugin"

        [tool.setuptools]
        packages = ["ws_toy_plugin"]
    """))
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(pkg)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"pip could not install the toy plugin: {r.stderr[-2000:]}")
    assert list(target.glob("ws_toy_plugin*.dist-info/entry_points.txt"))
    return target


def test_plugin_step_runs_through_the_cli(plugin_path, pico, tmp_path):
    src = pico()
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "weightsmith", "quantize", str(src), str(out), "--quiet", "--method", "toy_rowprune:rows=0.5,rtn",
           "--bits", "4", "--group-size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in rep["config"]["steps"]] == ["toy_rowprune", "rtn"] and rep["config"]["steps"][0]["rows"] == 0.5
    row = next(x for x in rep["layers"] if x["name"].endswith("layers.0.mlp.down_proj"))
    assert row["toy_rows"] == 32 and row["steps"] == ["toy_rowprune", "rtn"]
    w = load_file(out / "model-00001-of-00003.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert int((w.abs().sum(1) == 0).sum()) == 32  # half of the 64 rows pruned, the rest on the grid
    # its options are flags generated from its config, with its Field description as help
    h = subprocess.run([sys.executable, "-m", "weightsmith", "quantize", "--help"], capture_output=True, text=True, env=env)
    assert "--toy-rowprune-rows" not in h.stdout and "--rows" in h.stdout and "fraction of the output rows" in h.stdout.replace("\n", " ")
    # without the plugin on the path the step is unknown
    r = subprocess.run(cmd[:-4] + ["--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown step 'toy_rowprune'" in r.stderr
    assert torch.is_tensor(w)

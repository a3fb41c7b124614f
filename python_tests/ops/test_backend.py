"""How the kernels are found: compiled library, JIT build, or the reference fallback."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import revgn_ext
from conftest import HAS_KERNELS, requires_kernels

pytestmark = pytest.mark.slow  # spawns processes

PKG = Path(revgn_ext.__file__).resolve().parent


def run_python(code: str, env_extra: dict, cwd: Path, pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVGN_")}
    env.update(env_extra)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-P", "-W", "always::RuntimeWarning", "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def package_without_library(tmp_path):
    """A copy of the package with no compiled library, as after REVGN_NO_EXT=1."""
    dst = tmp_path / "site" / "revgn_ext"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if not (dst / "_csrc").exists():  # a source tree: lay the kernels out as an install does
        shutil.copytree(PKG.parent / "csrc", dst / "_csrc")
    return dst.parent


def test_backend_names_a_known_path():
    assert revgn_ext.ops.backend() in ("cuda", "cpp", "reference")
    assert revgn_ext.ops.build_info()["load_path"] in ("compiled", "jit", "reference")


@requires_kernels
def test_compiled_library_is_used_by_default():
    assert revgn_ext.ops.build_info()["load_path"] in ("compiled", "jit")
    assert revgn_ext.ops.backend() == ("cuda" if revgn_ext.ops.build_info()["cuda_kernels"] and
                                       __import__("torch").cuda.is_available() else "cpp")


def test_forced_reference_is_silent(tmp_path):
    res = run_python("import revgn_ext; print(revgn_ext.ops.backend())", {"REVGN_BACKEND": "reference"}, tmp_path,
                     PKG.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"
    assert "RuntimeWarning" not in res.stderr


def test_pure_python_install_is_silent(package_without_library, tmp_path):
    """A build without kernels (REVGN_NO_EXT=1) carries a marker: the references load without a warning,
    and build_info says why."""
    (package_without_library / "revgn_ext" / "_pure_python").write_text("pure\n")
    code = ("import revgn_ext\nfrom revgn_ext import ops\n"
            "print(ops.backend()); print(ops.build_info()['error'])")
    res = run_python(code, {}, tmp_path, package_without_library)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == "reference" and "pure-Python package" in res.stdout
    assert "RuntimeWarning" not in res.stderr


def test_missing_library_falls_back_with_one_warning(package_without_library, tmp_path):
    code = ("import revgn_ext, torch\n"
            "from revgn_ext import ops\n"
            "A = torch.randn(2, 3, 4); ops.gram_cholesky_solve(A, torch.randn(2, 3, 1), 0.1)\n"
            "ops.gram_cholesky_solve(A, torch.randn(2, 3, 1), 0.1)\n"
            "print(ops.backend())")
    res = run_python(code, {}, tmp_path, package_without_library)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "reference"
    assert res.stderr.count("compiled kernels unavailable") == 1, res.stderr


def test_forced_compiled_without_library_raises(package_without_library, tmp_path):
    res = run_python("import revgn_ext", {"REVGN_BACKEND": "compiled"}, tmp_path, package_without_library)
    assert res.returncode != 0 and "no compiled revgn_ext/_C" in res.stderr


def test_unknown_backend_is_rejected(tmp_path):
    res = run_python("import revgn_ext", {"REVGN_BACKEND": "fastest"}, tmp_path, PKG.parent)
    assert res.returncode != 0 and "REVGN_BACKEND must be one of" in res.stderr


@pytest.mark.skipif(not HAS_KERNELS or shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists(),
                    reason="the JIT path is checked where the ahead-of-time build works")
def test_jit_build_matches_reference(package_without_library, tmp_path):
    # The JIT path compiles the same sources with ninja into a private directory.
    code = ("import revgn_ext, torch\n"
            "from revgn_ext import ops\n"
            "from revgn_ext.ops.gram import gram_cholesky_solve_reference\n"
            "assert ops.build_info()['load_path'] == 'jit', ops.build_info()\n"
            "A = torch.randn(3, 5, 7, dtype=torch.float64); R = torch.randn(3, 5, 2, dtype=torch.float64)\n"
            "lam = torch.full((3,), 0.1, dtype=torch.float64)\n"
            "got = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)[0]\n"
            "want = gram_cholesky_solve_reference(A, R, lam, True)[0]\n"
            "assert (got - want).abs().max() < 1e-12\n"
            "print(ops.backend())")
    env = {"REVGN_JIT": "1", "REVGN_JIT_DIR": str(tmp_path / "jit"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    for key in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS"):
        if key in os.environ:
            env[key] = os.environ[key]
    res = run_python(code, env, tmp_path, package_without_library)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] in ("cpp", "cuda")

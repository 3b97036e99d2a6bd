"""setuptools' part of `pip install .`: package what tools/pep517_backend.py built.

The backend stages the libraries, the cffi extension and the pinned sdist's
pieces, and names the staging tree in PYLLAMA_SSM_WHEEL_STAGE; the wheel is
then a platform wheel holding them.  Without it (sdist, editable installs for
the `make build` workflow) this is a plain setup() from pyproject.toml.
"""

import os
import shutil
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

STAGE = os.environ.get("PYLLAMA_SSM_WHEEL_STAGE")


class BinaryDistribution(Distribution):
    def has_ext_modules(self):  # a compiled extension and libllama inside: cp3XX-...-linux_x86_64
        return True


class BuildPy(build_py):
    def run(self):
        super().run()
        pkg = Path(self.build_lib) / "pyllama_ssm"
        # an earlier build's files (another CMAKE_ARGS: libggml-cuda) must not ride along
        shutil.rmtree(pkg / "_lib", ignore_errors=True)
        shutil.rmtree(pkg / "_stock", ignore_errors=True)
        for stale in pkg.glob("_llama_*"):
            stale.unlink()
        shutil.copytree(Path(STAGE) / "pyllama_ssm", pkg, dirs_exist_ok=True)


setup(**({"distclass": BinaryDistribution, "cmdclass": {"build_py": BuildPy}} if STAGE else {}))

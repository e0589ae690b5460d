"""
The build backend pyproject.toml names (PEP 517, found through backend-path): setuptools, run on a
copy of the checkout's top-level files in a temporary folder. setuptools writes build/ and
*.egg-info/ into the folder it builds in, and pip builds in the source folder itself since 21.3,
so `pip install .` or `pip wheel .` in a clone would leave both behind; setup.cfg could move them
only to a fixed path. The copy holds pyproject.toml and the modules it installs (top-level files
only: data/ and out*/ can be large). Editable installs (pip install -e .) must point at the
checkout itself and are built there, as setuptools builds them.
"""

import functools
import os
import shutil
import tempfile

from setuptools import build_meta as _setuptools


def _in_a_copy(hook):
    @functools.wraps(hook)
    def run(*args, **kwargs):
        # the directories pip passes may be relative to the checkout: make them absolute first
        args = [os.path.abspath(a) if isinstance(a, str) else a for a in args]
        kwargs = {k: os.path.abspath(v) if k.endswith("_directory") and isinstance(v, str) else v
                  for k, v in kwargs.items()}
        source = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="sophia-build-") as copy:
            for name in os.listdir(source):
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copy2(os.path.join(source, name), copy)
            os.chdir(copy)
            try:
                return hook(*args, **kwargs)
            finally:
                os.chdir(source)
    return run


get_requires_for_build_wheel = _in_a_copy(_setuptools.get_requires_for_build_wheel)
prepare_metadata_for_build_wheel = _in_a_copy(_setuptools.prepare_metadata_for_build_wheel)
build_wheel = _in_a_copy(_setuptools.build_wheel)
get_requires_for_build_sdist = _in_a_copy(_setuptools.get_requires_for_build_sdist)
build_sdist = _in_a_copy(_setuptools.build_sdist)
get_requires_for_build_editable = _setuptools.get_requires_for_build_editable
prepare_metadata_for_build_editable = _setuptools.prepare_metadata_for_build_editable
build_editable = _setuptools.build_editable

"""Builds the compiled core (src/meterd/_fastpath.pyx); metadata is in pyproject.toml.

The extension is one module, meterd._fastpath, whose source is split by concern:
_fastpath.pyx includes the .pxi files next to it and _fastpath.pxd includes
their .pxd files (see _fastpath.pxd); it cimports meterd/corespec.pxd, found
through the include path "src". cythonize follows the includes and cimports,
so a change to any of them rebuilds the module.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "meterd._fastpath",
        ["src/meterd/_fastpath.pyx"],
        extra_compile_args=["-O2"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={"language_level": "3"},
        annotate=False,
    ),
)

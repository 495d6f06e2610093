"""Build the Cython extensions in ext/ into the corral package.

Set CORRAL_DEBUG=1 at build time for the debug flavour: expensive invariant
checks compiled in (the CORRAL_DEBUG compile-time constant), bounds checks
and line tracing on.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CORRAL_DEBUG", "") not in ("", "0")

EXTENSIONS = [
    # (module name, sources)
    ("corral.totem._core", ["ext/totem/_core.pyx"]),
    ("corral.cfs._tree", ["ext/cfs/_tree.pyx"]),
]


def extensions() -> list:
    macros = [("CYTHON_TRACE", "1")] if DEBUG else []
    exts = [
        Extension(
            name,
            sources,
            define_macros=macros,
            extra_compile_args=["-O2", "-Wno-unused-function"] + ([] if DEBUG else ["-DNDEBUG"]),
        )
        for name, sources in EXTENSIONS
    ]
    directives = {
        "language_level": 3,
        "boundscheck": DEBUG,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": DEBUG,
        "embedsignature": True,
        "linetrace": DEBUG,
    }
    return cythonize(
        exts,
        compiler_directives=directives,
        compile_time_env={"CORRAL_DEBUG": DEBUG},
        include_path=["ext"],
        annotate=DEBUG,
    )


setup(ext_modules=extensions())

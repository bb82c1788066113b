"""The one compiled part of the API: the validator's C line scanner (``validation/native``).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler
and Python's headers the install still succeeds, and validation takes the msgspec path, which
gives the same reports more slowly (``tuneforge_api.validation.fast.NATIVE`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tuneforge_api.validation._linescan",
            sources=["tuneforge_api/validation/native/linescan.c"],
            depends=["tuneforge_api/validation/native/xxhash.h"],
            include_dirs=["tuneforge_api/validation/native"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)

"""The native multiply-accumulate kernel (heserve/he/_mac.c), built by `pip install`.

Everything else about the package is in pyproject.toml. Plain -O3 and no -march:
the AVX-512 IFMA path is compiled through a per-function target attribute and
chosen at run time, so one build runs on any x86-64 (and the scalar path on any
64-bit GCC or Clang target with unsigned __int128).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "heserve.he._mac",
            sources=["heserve/he/_mac.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra"],
        )
    ]
)

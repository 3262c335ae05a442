"""Build hook for the optional C kernel; everything else is declared in setup.cfg.

``cutremain_monai.networks._zone_pool`` (fused lung-zone max pooling on CPU) is optional: without a C compiler
the install still succeeds and ``LungZoneMaxPool`` uses ``scatter_reduce`` instead.
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":  # Apple clang has no -fopenmp: the kernel runs on one thread there
    compile_args, link_args = ["-O3"], []
else:
    compile_args, link_args = ["-O3", "-fopenmp"], ["-fopenmp"]

setup(
    ext_modules=[
        Extension(
            "cutremain_monai.networks._zone_pool",
            sources=["cutremain_monai/networks/_zone_pool.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)

"""The build of the package's wheel: the decision path's modules compiled with mypyc.

Everything about the package is in pyproject.toml; this file only adds the compiled extensions,
which pyproject.toml cannot declare. A wheel built from here (`pip install .`, `pip wheel .`, the
Docker image) holds a C extension for each module in COMPILED beside its .py file; Python imports
the extension first. An editable install (`pip install -e .`) compiles nothing: its modules are
the .py files of the checkout, so an edit takes effect at once (an extension built into the
source tree would shadow the edited .py file). `G0129_COMPILE=0` builds a pure-Python wheel
(a platform with no C compiler).
"""

from __future__ import annotations

import os

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

# The replay's decision path, where one worker's CPU goes (profiled over a 10k-encounter replay):
# case building, the rules, the annotation and its validation, the review rows, the rule tables'
# lookups, the routing and spilling of resources by patient, and the modules they call for every
# resource. mypyc compiles strictly typed code as it is (the package is mypy --strict clean).
# Left as Python:
# - adapter/decimals.py: FhirDecimal subclasses float, which mypyc cannot compile (it is kept
#   apart from jsonio, whose loads and dumps run for every resource, so that jsonio compiles).
# - adapter/tables.py: pydantic models (mypyc's C for pydantic.main does not build).
# - the I/O edges (HTTP, the queue, the CLI): their time goes to the network and the disk.
COMPILED = [
    "adapter/annotate.py",
    "adapter/case.py",
    "adapter/compartment.py",
    "adapter/decision.py",
    "adapter/fhir_models.py",
    "adapter/ingest.py",
    "adapter/jsonio.py",
    "adapter/pipeline.py",
    "adapter/replay.py",
    "adapter/review.py",
    "adapter/rules.py",
    "adapter/ruleset.py",
    "adapter/spill.py",
    "adapter/vocabulary.py",
]


def compiling() -> bool:
    return os.environ.get("G0129_COMPILE", "1") != "0"


class MypycBuildExt(build_ext):
    """Compiles COMPILED with mypyc, but never in an editable install.

    The editable install is told apart by `editable_mode`, the flag setuptools sets on the build
    sub-commands when it builds an editable wheel (PEP 660 `build_editable`; documented for
    custom build commands), not by looking for `editable_wheel` in sys.argv, which depends on how
    setuptools happens to invoke this file. mypyc runs in `run`, when extensions are about to be
    built: this command is also finalized only to list source files (egg_info, in the metadata
    steps pip runs before building, editable installs included), and those must not wait for a
    type check and C code generation they do not use.
    """

    # The name distutils looks this command's options up by (--inplace...) when it is
    # reinitialized below; by default it would be the class's name.
    command_name = "build_ext"

    def run(self) -> None:
        if compiling() and not self.editable_mode and not self.distribution.ext_modules:
            from mypyc.build import mypycify  # mypy is a build requirement (pyproject.toml)

            self.distribution.ext_modules = mypycify(COMPILED, opt_level="3")
            # finalize_options prepared the extensions there were then (none): again, for these,
            # with the options given.
            self.reinitialize_command(self)
            self.ensure_finalized()
        super().run()


class CompiledDistribution(Distribution):
    def has_ext_modules(self) -> bool:
        # The extensions are only known once mypyc has run (above), but whether there are any
        # decides now that the wheel is a platform wheel (cp311-linux_x86_64, not py3-none-any)
        # installed into platlib, and that `build` runs build_ext at all.
        return compiling()


setup(distclass=CompiledDistribution, cmdclass={"build_ext": MypycBuildExt})

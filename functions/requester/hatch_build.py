"""Where this function's shared code comes from when pip builds it (hatchling's custom build hook).

knative/func's host builder builds from this folder inside the repository, so ``../common/fma_common`` is
there. The pack and s2i builders, and on-cluster builds, upload this folder alone (knative/func
``pkg/buildpacks/builder.go``, ``pkg/s2i/builder.go``): for them ``make function-sources`` copies the shared code
into its ``vendored/`` folder (git-ignored, and excluded from the repository's own editable install, which would
otherwise map ``fma_common`` to the copy; ``tests/test_functions.py`` fails while a copy differs from its
source). The sibling wins when both exist, so a stale copy never reaches a host build.

The worker function has the same file (``functions/worker/hatch_build.py``); a test keeps them identical.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SHARED = ("fma_common",)


class SharedCode(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        root = Path(self.root)
        for package in SHARED:
            sibling = root.parent / "common" / package
            copy = root / "vendored" / package
            source = sibling if sibling.is_dir() else copy if copy.is_dir() else None
            if source is None:
                raise FileNotFoundError(
                    f"{package} is neither at {sibling} nor copied into {copy}: build from the repository, or run "
                    "`make function-sources` there before a pack, s2i or on-cluster build")
            build_data["force_include"][str(source)] = package
            # An editable install (pack's Poetry installs the function with develop = true) puts this folder on
            # the path, which holds a copy but never the sibling.
            build_data["force_include_editable"][str(source)] = package

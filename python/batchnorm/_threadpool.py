"""batchnorm's thread pool as a threadpoolctl library.

batchnorm's thread count is its own process-wide setting, not the OpenMP runtime's, so
threadpoolctl's OpenMP controller (``omp_set_num_threads`` on each loaded runtime) does not
reach it. This controller does: it reports the count in ``threadpool_info()`` as
``user_api="openmp"``, ``internal_api="batchnorm"``, and ``threadpool_limits`` (all APIs or
``user_api="openmp"``) sets it and restores it, like any other OpenMP pool.
"""

from __future__ import annotations

from types import ModuleType


def register(threadpoolctl: ModuleType) -> None:
    """Registers the controller with threadpoolctl (3.5 and later have ``register``)."""
    if not hasattr(threadpoolctl, "register") or not hasattr(threadpoolctl, "LibController"):
        return

    class BatchnormController(threadpoolctl.LibController):  # type: ignore[misc, name-defined]
        user_api = "openmp"
        internal_api = "batchnorm"
        # The extension module's file, _core.<tag>.so; the symbol tells it from other _core.
        filename_prefixes = ("_core",)
        check_symbols = ("batchnorm_get_num_threads",)

        def get_num_threads(self) -> int | None:
            get = getattr(self.dynlib, "batchnorm_get_num_threads", None)
            return None if get is None else int(get())

        def set_num_threads(self, num_threads: int) -> None:
            set_ = getattr(self.dynlib, "batchnorm_set_num_threads", None)
            if set_ is not None:
                set_(num_threads)

        def get_version(self) -> str | None:
            if not hasattr(self.dynlib, "batchnorm_get_num_threads"):
                return None
            from . import __version__

            return __version__

    threadpoolctl.register(BatchnormController)

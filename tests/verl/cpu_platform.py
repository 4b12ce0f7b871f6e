"""A verl platform for the CPU (verl 0.9.1 ships cuda / npu / rocm only), registered on import.

Must be imported before verl's first ``get_platform()`` call (importing ``verl.workers.engine`` makes one):
``import verl`` then this module, or list it first in ``VERL_USE_EXTERNAL_MODULES`` (then ``import verl``
imports it before the modules listed after it). Sets ``VERL_PLATFORM=cpu`` and
``VERL_ENGINE_DEVICE=cuda`` (verl registers its FSDP engines for cuda / npu only).
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("VERL_PLATFORM", "cpu")
os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _register() -> None:
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    class _Device:
        """Stands in for ``torch.cuda``: what verl asks of the device module, answered for the CPU."""

        def __getattr__(self, name):
            return lambda *args, **kwargs: 0

        @staticmethod
        def is_available():
            return True

        @staticmethod
        def current_device():
            return "cpu"

        @staticmethod
        def get_device_name(*args):
            return "cpu"

        @staticmethod
        def mem_get_info(*args):
            return (1 << 34, 1 << 34)

        @staticmethod
        def manual_seed(seed):
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        @property
        def device_name(self):
            return "cpu"

        @property
        def vendor_name(self):
            return "cpu"

        @property
        def device_module(self):
            return _Device()

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, index):
            pass

        def synchronize(self, index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None


_register()

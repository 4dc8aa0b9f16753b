"""Which JAX backends an entry point starts: no libtpu probe on a host without a TPU.

The noise: with libtpu installed (the `tpu` and `test` extras carry it, for
`compile_check --target tpu-*`) and JAX_PLATFORMS unset, JAX's backend search initialises
every registered backend, the TPU one included. libtpu then looks for a TPU host, finds none
and logs it to stderr ("Failed to find host bounds ...", "INVALID_ARGUMENT: ...
TPU_WORKER_HOSTNAMES", "=== Source Location Trace: ===") before JAX quietly falls back to the
CPU. JAX's own Cloud TPU check (`cloud_tpu_init`, a PCI scan for TPU chips) has already found
no chip by then and set TPU_SKIP_MDS_QUERY=1, which only skips the metadata-server query:
the TPU backend is still in the search, and libtpu's initialisation is what prints.

The fix, `skip_absent_tpu()`, runs at each entry point before JAX starts a backend. When
nobody chose the platforms (JAX_PLATFORMS unset, `jax_platforms` not set) and the host shows
no sign of a TPU, it names the backends to start: the GPU plugins installed whose GPU is
visible, then cpu. On anything that looks like a TPU host (a TPU chip on the PCI bus, as JAX
counts them; /dev/accel* (v2-v4); /dev/vfio/<group> (v5e and later); JAX_FORCE_TPU_INIT) it
changes nothing, so the TPU is used and its errors show as before: a false alarm costs the
old noise, never a hidden TPU. A GPU named here is named explicitly, so a GPU that fails to
start raises JAX's error instead of falling back to the CPU in silence.

Compiling for TPU topologies from a CPU host (`targets.target_devices`) loads libtpu through
`get_topology_desc`, not through the backend search, and is unaffected.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
import pkgutil


def tpu_signs() -> list[str]:
    """What on this host suggests a TPU (empty: none). JAX's PCI count when its helper is
    there; device nodes too, so a TPU that JAX's table does not know yet still counts."""
    signs = []
    if "JAX_FORCE_TPU_INIT" in os.environ:
        signs.append("JAX_FORCE_TPU_INIT")
    try:
        from jax._src import hardware_utils

        chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except (ImportError, AttributeError):  # a JAX without the helper: rely on the nodes below
        chips = 0
    if chips:
        signs.append(f"{chips} TPU chips on the PCI bus")
    # /dev/vfio/vfio is the generic VFIO control node; numbered groups are passed-through devices.
    signs += glob.glob("/dev/accel*") + [p for p in glob.glob("/dev/vfio/*") if os.path.basename(p).isdigit()]
    return signs


def _installed_plugins() -> set[str]:
    """Module names of the installed JAX PJRT plugins (the `jax_plugins` namespace package and
    the `jax_plugins` entry-point group, the two places JAX discovers them)."""
    names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins

        names |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    return names


def visible_gpu_platforms() -> list[str]:
    """JAX platform names of the GPUs this process can use: plugin installed and device visible."""
    try:
        from jax._src import hardware_utils
    except ImportError:
        return []
    plugins = _installed_plugins()
    platforms = []
    if any("cuda" in p for p in plugins) and hardware_utils.has_visible_nvidia_gpu():
        platforms.append("cuda")
    amd = getattr(hardware_utils, "num_available_amd_gpus", None)
    if any("rocm" in p for p in plugins) and amd is not None and amd(stop_at=1):
        platforms.append("rocm")
    return platforms


def skip_absent_tpu() -> str | None:
    """Leaves the TPU out of JAX's backend search when this host has none and nobody chose the
    platforms; returns the platforms set (e.g. "cpu", "cuda,cpu"), or None when it changed
    nothing. Call before the first JAX computation (jax may already be imported)."""
    import jax

    if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms is not None or tpu_signs():
        return None
    platforms = ",".join(visible_gpu_platforms() + ["cpu"])
    os.environ["JAX_PLATFORMS"] = platforms  # the same choice in the subprocesses a run starts
    jax.config.update("jax_platforms", platforms)
    return platforms

"""MODEL.DEVICE resolution, shared by the detector, the loaders and the tiny-CLIP recipe."""
import torch

__all__ = ["resolve_device", "chunk_elements"]


def resolve_device(name: str) -> torch.device:
    """MODEL.DEVICE: auto (cuda if available) | cpu | cuda[:i]; a device that is not there is a
    ConfigError in one line."""
    from ..config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"MODEL.DEVICE '{name}' is not a device: auto | cpu | cuda[:i]") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"MODEL.DEVICE '{name}': no CUDA GPU is available to this torch "
                              f"({torch.__version__}); use MODEL.DEVICE cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"MODEL.DEVICE '{name}': only {n} CUDA GPU(s) are available")
    return dev


def chunk_elements(device: torch.device, cpu: int) -> int:
    """Elements of temporaries a chunked computation may hold at once on `device`: `cpu` on a CPU
    (sized for its caches), 1/64 of a GPU's memory in float32 elements on CUDA (at least `cpu`)."""
    if device.type == "cuda":
        return max(cpu, torch.cuda.get_device_properties(device).total_memory // (64 * 4))
    return cpu

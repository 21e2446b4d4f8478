"""The converted-weights cache: a model's weights after ringfuse's conversion (GGUF blocks
dequantized, q/k rows unpermuted, q/k/v and gate/up fused, int8 quantization) saved once as
a safetensors file, then mapped back on later loads instead of converting again.

A file per source x dtype x quant x tensor-parallel rank, in ``$RINGFUSE_CACHE/converted``
(see model_files.cache_dir). The name carries a hash of the source's path, size and mtime,
the options and the cache format, so a changed source or a new format never matches an old
file; a file that cannot be read or does not fit the model is converted again and replaced.
Files are written to a temporary name and renamed (two processes may race; the last wins).
Loading maps the file (safetensors' mmap): the pages are read as the model touches them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "1"  # bump when converted tensors change meaning


def cache_file(source: Path, dtype: torch.dtype, quant: str, rank: int, world: int) -> Path:
    from .. import __version__
    from .model_files import cache_dir

    st = source.stat()
    ident = "|".join(map(str, (source.resolve(), st.st_size, st.st_mtime_ns, dtype, quant, rank, world, FORMAT,
                               __version__)))  # fmt: skip
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    tp = f"-tp{rank}of{world}" if world > 1 else ""
    name = f"{source.stem}-{str(dtype).removeprefix('torch.')}-{quant}{tp}-{digest}.safetensors"
    return cache_dir() / "converted" / name


def load(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached tensors (mapped, not read), or None when absent or unreadable."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a torn or foreign file: convert again
        return None


def save(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    """Write atomically; False (and nothing left behind) if the disk refuses."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": FORMAT})
        os.replace(tmp, path)
        return True
    except Exception:  # no space, read-only cache, ...: the model runs uncached
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

"""The converted-weights cache: a model's weights after ringfuse's conversion (GGUF blocks
dequantized, q/k rows unpermuted, q/k/v and gate/up fused, int8 quantization) saved once as
a safetensors file, then mapped back on later loads instead of converting again.

A file per source x dtype x quant x tensor-parallel rank, in ``$RINGFUSE_CACHE/converted``
(see model_files.cache_dir), as large as the converted weights (fp32: 4 bytes per weight).
The name carries a hash of the source's files (path, size, mtime), the options and the cache
format, so a changed source or a new format never matches an old file, and saving removes
the files it supersedes; a file that cannot be read or does not fit the model is converted
again and replaced.
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

    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]  # every file of a folder
    ident = "|".join(map(str, (stats, dtype, quant, rank, world, FORMAT, __version__)))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{_prefix(source, dtype, quant, rank, world)}{digest}.safetensors"


def _prefix(source: Path, dtype: torch.dtype, quant: str, rank: int, world: int) -> str:
    tp = f"-tp{rank}of{world}" if world > 1 else ""
    return f"{source.stem}-{str(dtype).removeprefix('torch.')}-{quant}{tp}-"


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
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        prefix = path.name.rsplit("-", 1)[0] + "-"  # the same source name and options, any digest
        for old in path.parent.glob(prefix + "*.safetensors"):  # superseded (the source changed)
            if old != path and len(old.name) == len(path.name):
                old.unlink(missing_ok=True)
        return True
    except Exception:  # no space, read-only cache, ...: the model runs uncached
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

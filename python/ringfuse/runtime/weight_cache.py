"""The converted-weights cache: a model's weights after ringfuse's conversion (GGUF blocks
dequantized, q/k rows unpermuted, q/k/v and gate/up fused, int8 quantization) saved once as
a safetensors file, then mapped back on later loads instead of converting again.

A file per source x dtype x quant x tensor-parallel rank, in ``$RINGFUSE_CACHE/converted``
(see model_files.cache_dir), as large as the converted weights (fp32: 4 bytes per weight).
The name is ``<stem>-<hash of the source's absolute path>-<dtype>-<quant>[-tpRofW]-<digest>``:
the digest hashes the source's files (path, size, mtime, ctime), the options and the cache
format, so a changed source or a new format never matches an old file (ctime also catches a
same-size edit whose mtime was put back, as `cp -p` or `touch -r` do). Saving removes the files it
supersedes: exactly those with the same prefix (the same source file and options), so two
different ``m.gguf`` in two folders keep their own caches. A file that cannot be read or
does not fit the model is converted again and replaced.
Files are written to a temporary name and renamed (two processes may race; the last wins).
The temporary name carries the writer's host and pid: a writer killed mid-save (SIGKILL, a
crash) leaves its temporary file, which the next save removes once that pid is dead or the
file has not been written for a day; a live writer's is kept.
Loading maps the file (safetensors' mmap): the pages are read as the model touches them.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path

import torch

FORMAT = "2"  # bump when converted tensors change meaning (2: llama-arch GGUF q/k biases un-interleaved)
STALE_S = 24 * 3600  # a temp file untouched this long has no live writer (whatever its pid says)


def cache_file(source: Path, dtype: torch.dtype, quant: str, rank: int, world: int) -> Path:
    from .. import __version__
    from .model_files import cache_dir

    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # every file of a folder
             for p in files for st in (p.stat(),)]
    ident = "|".join(map(str, (stats, dtype, quant, rank, world, FORMAT, __version__)))
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{_prefix(source, dtype, quant, rank, world)}{digest}.safetensors"


def _prefix(source: Path, dtype: torch.dtype, quant: str, rank: int, world: int) -> str:
    # the absolute path's hash ties the name to this very file: another folder's file of the
    # same name gets another prefix, so neither cleans up the other's cache
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    tp = f"-tp{rank}of{world}" if world > 1 else ""
    return f"{source.stem}-{where}-{str(dtype).removeprefix('torch.')}-{quant}{tp}-"


def _superseded(path: Path) -> list[Path]:
    """Cache files of the same source and options as ``path`` with another digest, and the
    file an older release (no path hash in the name) wrote for the very same digest."""
    prefix = path.name.rsplit("-", 1)[0] + "-"  # up to the digest
    same = re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.safetensors")
    old = [p for p in path.parent.iterdir() if p != path and same.fullmatch(p.name)]
    legacy = re.fullmatch(r"(.*)-[0-9a-f]{8}-([^-]+-[^-]+(?:-tp\d+of\d+)?-[0-9a-f]{16}\.safetensors)", path.name)
    return old + ([path.with_name(f"{legacy[1]}-{legacy[2]}")] if legacy else [])


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32] or "host"


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of writers that died mid-save: one whose pid (on this host) is dead, or
    that nobody has written for STALE_S. A live writer's (a concurrent save) is kept."""
    name = re.compile(r".+\.safetensors\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[^.]+\.tmp")
    host = _host()
    for tmp in folder.glob("*.safetensors.*.tmp"):
        m = name.fullmatch(tmp.name)
        if m is None:
            continue
        try:
            # untouched for a day: no live writer (a reused pid, another host, an old name)
            stale = time.time() - tmp.stat().st_mtime > STALE_S
            if not stale and m["pid"] is not None and m["host"] == host:
                stale = not _pid_alive(int(m["pid"]))
            if stale:
                tmp.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


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
    return save_or_error(path, tensors) is None


def save_or_error(path: Path, tensors: dict[str, torch.Tensor]) -> Exception | None:
    """save(), returning None on success or the error that kept the file from being written."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path.parent)  # before writing: the disk space of dead writers first
        tmp = _temp_name(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        for old in _superseded(path):  # older versions of this very source (it changed)
            old.unlink(missing_ok=True)
        return None
    except Exception as e:  # no space, read-only cache, ...: the model runs uncached
        return e
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink(missing_ok=True)

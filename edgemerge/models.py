"""The model registry and `edgemerge models pull`: GGUF models shipped on PyPI in chunks.

A registry entry pins the chunk packages (exact versions) and names the files inside
them. Pulling pip-installs those packages into a scratch folder, concatenates the files
into a temporary file beside the final one, checks its size and sha256 against the
registry and only then renames it into place, so a file under a model's final name is
always complete and verified. A small ``<file>.sha256`` stamp (digest, size, mtime)
lets later calls trust the file without hashing hundreds of megabytes again.

The registry is TOML, read with the standard library's ``tomllib`` (Python 3.11+, which
is what edgemerge is developed and tested on); on Python 3.10 the ``tomli`` package,
which has the same API, is used when it is installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

import edgemerge

GGUF_MAGIC = b"GGUF"
REGISTRY_SCHEMA = 1

_BLOCK = 4 << 20
_PIP_TAIL_LINES = 20
# pip's --progress-bar=raw (pip 24.1 and later) prints these lines while downloading
_PIP_PROGRESS_RE = re.compile(r"Progress (\d+) of (\d+)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PINNED_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ModelError(Exception):
    """A model could not be found, fetched or trusted; the message says what to do."""


class ModelNotFoundError(ModelError):
    """No such registry name or file, or a registry model that has not been pulled."""


class ModelIntegrityError(ModelError):
    """A model file's size or sha256 differs from the registry's."""


class ModelPullError(ModelError):
    """Installing the chunk packages or writing the assembled file failed."""


def _normalise_package(name: str) -> str:
    # PEP 503: pip treats "Foo_Bar", "foo-bar" and "foo.bar" as the same project.
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class ModelPart:
    """One chunk file: which package ships it, where it lands under pip's --target folder."""

    package: str
    path: str
    size: int


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry. Construction checks that the entry is self-consistent."""

    name: str
    description: str
    file_name: str
    architecture: str
    n_layer: int
    quantization: str
    size: int
    sha256: str
    licence: str
    packages: tuple[str, ...]
    parts: tuple[ModelPart, ...]

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ModelError(f"model {self.name!r}: " + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if not _NAME_RE.fullmatch(self.name):
            yield "the name must be letters, digits, '.', '_' or '-'"
        if not (_NAME_RE.fullmatch(self.file_name) and self.file_name.endswith(".gguf")):
            yield f"file {self.file_name!r} must be a plain file name ending in .gguf"
        if self.size <= 0 or self.n_layer <= 0:
            yield "size and n_layer must be positive"
        if not _SHA256_RE.fullmatch(self.sha256):
            yield f"sha256 {self.sha256!r} must be 64 lower-case hex digits"
        if not self.packages:
            yield "packages must not be empty"
        pinned = set()
        for requirement in self.packages:
            match = _PINNED_RE.fullmatch(requirement)
            if match is None:
                yield f"package {requirement!r} must be pinned exactly, as name==version"
            else:
                pinned.add(_normalise_package(match.group(1)))
        if not self.parts:
            yield "parts must not be empty"
        for part in self.parts:
            if _normalise_package(part.package) not in pinned:
                yield f"part {part.path!r} comes from {part.package!r}, which is not in packages"
            rel = PurePosixPath(part.path)
            if rel.is_absolute() or ".." in rel.parts or "\\" in part.path or not part.path:
                yield f"part path {part.path!r} must be relative, inside pip's target folder"
            if part.size <= 0:
                yield f"part {part.path!r} must have a positive size"
        total = sum(part.size for part in self.parts)
        if self.parts and total != self.size:
            yield f"the parts add up to {total:,} bytes, not the model's size {self.size:,}"


@dataclass(frozen=True)
class Registry:
    """The models known to this edgemerge, as read from ``path``."""

    path: Path
    default: str
    models: tuple[ModelSpec, ...]

    def names(self) -> list[str]:
        return [spec.name for spec in self.models]

    def get(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {', '.join(self.names())}. "
            "To use your own GGUF file, pass its path instead."
        )


# --------------------------------------------------------------------------- registry


def registry_path() -> Path:
    """The registry file: the source tree's ``models/`` when running from a checkout,
    else the copy installed as package data."""
    package_dir = Path(edgemerge.__file__).resolve().parent
    root = package_dir.parent
    source = root / "models" / "registry.toml"
    # pyproject.toml beside it tells a checkout from site-packages, where an unrelated
    # top-level "models" package could also exist.
    if source.is_file() and (root / "pyproject.toml").is_file():
        return source
    return package_dir / "data" / "registry.toml"


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModelError(
                "reading the model registry needs Python 3.11+ (tomllib) or, on Python "
                "3.10, the tomli package: run `pip install tomli`"
            ) from None
    return tomllib.loads(text)


_MODEL_KEYS = {
    "description": str,
    "file": str,
    "architecture": str,
    "n_layer": int,
    "quantization": str,
    "size": int,
    "sha256": str,
    "licence": str,
    "packages": list,
    "parts": list,
}
_PART_KEYS = {"package": str, "path": str, "size": int}
_KIND_WORDS = {str: "a string", int: "an integer", list: "an array", dict: "a table"}


def _check_table(table: Any, kinds: dict[str, type], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ModelError(f"{where} must be a table, got {table!r}")
    unknown = sorted(set(table) - set(kinds))
    if unknown:
        raise ModelError(f"{where} has unknown keys {unknown}; allowed: {sorted(kinds)}")
    for key, kind in kinds.items():
        if key not in table:
            raise ModelError(f"{where} is missing the key {key!r}")
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ModelError(f"{where}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return table


def _parse_model(name: str, table: Any, where: str) -> ModelSpec:
    table = _check_table(table, _MODEL_KEYS, where)
    parts = []
    for index, part in enumerate(table["parts"]):
        part = _check_table(part, _PART_KEYS, f"{where} parts[{index}]")
        parts.append(ModelPart(package=part["package"], path=part["path"], size=part["size"]))
    packages = table["packages"]
    if not all(isinstance(p, str) for p in packages):
        raise ModelError(f"{where}: packages must be strings like 'name==version'")
    return ModelSpec(
        name=name,
        description=table["description"],
        file_name=table["file"],
        architecture=table["architecture"],
        n_layer=table["n_layer"],
        quantization=table["quantization"],
        size=table["size"],
        sha256=table["sha256"],
        licence=table["licence"],
        packages=tuple(packages),
        parts=tuple(parts),
    )


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Read and check the registry (by default the one from :func:`registry_path`)."""
    path = Path(path) if path is not None else registry_path()
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ModelError(
            f"cannot read the model registry {path}: {exc.strerror or exc}; reinstall edgemerge"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ModelError(f"the model registry {path} is not UTF-8 text: {exc}") from exc
    try:
        data = _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ModelError(f"the model registry {path} is not valid TOML: {exc}") from exc
    schema = data.get("schema")
    if schema != REGISTRY_SCHEMA:
        raise ModelError(
            f"the model registry {path} has schema {schema!r}; this edgemerge reads schema "
            f"{REGISTRY_SCHEMA}. Use the registry that came with this edgemerge."
        )
    tables = data.get("models")
    if not isinstance(tables, dict) or not tables:
        raise ModelError(f"the model registry {path} has no [models.NAME] tables")
    try:
        models = tuple(
            _parse_model(name, table, f'[models."{name}"]') for name, table in tables.items()
        )
    except ModelError as exc:
        raise ModelError(f"the model registry {path} is invalid: {exc}") from None
    names = [spec.name for spec in models]
    default = data.get("default")
    if default not in names:
        raise ModelError(
            f"the model registry {path}: default {default!r} is not one of its models {names}"
        )
    return Registry(path=path, default=default, models=models)


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$EDGEMERGE_CACHE_DIR, else $XDG_CACHE_HOME/edgemerge, else ~/.cache/edgemerge."""
    explicit = os.environ.get("EDGEMERGE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "edgemerge"
    return Path.home() / ".cache" / "edgemerge"


def model_path(spec: ModelSpec) -> Path:
    """Where a pulled model lives: ``<cache>/models/<file name>``."""
    return cache_dir() / "models" / spec.file_name


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_matches(path: Path, spec: ModelSpec) -> bool:
    try:
        stat = path.stat()
        fields = _stamp_path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return False
    return stat.st_size == spec.size and fields == [
        spec.sha256,
        str(spec.size),
        str(stat.st_mtime_ns),
    ]


def _write_stamp(path: Path, spec: ModelSpec) -> None:
    try:
        stat = path.stat()
        _stamp_path(path).write_text(
            f"{spec.sha256} {stat.st_size} {stat.st_mtime_ns}\n", encoding="ascii"
        )
    except OSError:
        pass  # a read-only cache still works; files are just re-hashed on each use


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"edgemerge: {message}", file=sys.stderr, flush=True)


def _bytes_bar(total: int, label: str, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    )


def _sha256_file(path: Path, *, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src, _bytes_bar(path.stat().st_size, "hashing", progress) as bar:
        while block := src.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _mismatch(path: Path, spec: ModelSpec, what: str, expected: str, found: str) -> str:
    return (
        f"{path} is not a good copy of model {spec.name!r}: expected {what} {expected}, "
        f"found {found}. Run `edgemerge models pull {spec.name} --force` to download it again."
    )


def verify(path: str | os.PathLike[str], spec: ModelSpec, *, progress: bool = False) -> None:
    """Check ``path`` against ``spec``: size first (cheap), then sha256.

    Raises:
        ModelNotFoundError: there is no file at ``path``.
        ModelIntegrityError: the size or the sha256 differs.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"{path} does not exist; run `edgemerge models pull {spec.name}`"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size != spec.size:
        raise ModelIntegrityError(
            _mismatch(path, spec, "a size of", f"{spec.size:,} bytes", f"{size:,} bytes")
        )
    try:
        digest = _sha256_file(path, progress=progress)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if digest != spec.sha256:
        raise ModelIntegrityError(_mismatch(path, spec, "sha256", spec.sha256, digest))


def _installed(spec: ModelSpec, progress: bool) -> Path | None:
    """The verified cached file, None when absent; ModelIntegrityError when damaged."""
    path = model_path(spec)
    if not path.exists():
        return None
    if _stamp_matches(path, spec):
        return path
    _say(progress, f"checking {path}")
    verify(path, spec, progress=progress)
    _write_stamp(path, spec)
    return path


# --------------------------------------------------------------------------- pull


def _pip_command(target: Path, requirement: str, raw_progress: bool) -> list[str]:
    return [
        sys.executable, "-m", "pip", "install",
        "--no-deps", "--only-binary=:all:", "--no-compile",
        "--disable-pip-version-check", "--no-input",
        "--progress-bar", "raw" if raw_progress else "off",
        "--target", str(target), requirement,
    ]  # fmt: skip


def _run_pip(
    command: list[str], env: dict[str, str], on_progress: Callable[[float], None]
) -> tuple[int, list[str]]:
    """Run pip with everything it prints captured: ``(exit status, its lines)``.

    pip's own output (index lines, one progress bar per package) would break up our one
    bar, so none of it reaches the terminal; ``Progress N of M`` lines become
    ``on_progress(N / M)`` and the rest is kept for the error message.
    """
    lines: list[str] = []
    try:
        with subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream: the error tail keeps pip's own order
            text=True,
            errors="replace",
            env=env,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                progress = _PIP_PROGRESS_RE.fullmatch(line.strip())
                if progress is None:
                    lines.append(line)
                elif int(progress[2]) > 0:
                    on_progress(min(1.0, int(progress[1]) / int(progress[2])))
            status = proc.wait()
    except OSError as exc:
        raise ModelPullError(f"could not run pip ({sys.executable} -m pip): {exc}") from exc
    return status, lines


def _package_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes of model data each requirement brings (the bar counts those)."""
    size: dict[str, int] = {}
    for part in spec.parts:
        key = _normalise_package(part.package)
        size[key] = size.get(key, 0) + part.size
    return {req: size.get(_normalise_package(req.partition("==")[0]), 0) for req in spec.packages}


def _install_packages(spec: ModelSpec, target: Path, bar: tqdm) -> None:
    """pip-install every chunk package into ``target``, advancing ``bar`` (bytes of model
    data) as they download; pip's output is shown only in the error when it fails."""
    # One pip run per package: progress and errors then name the package concerned.
    env = dict(os.environ, PIP_REQUIRE_VIRTUALENV="0")
    shares = _package_bytes(spec)
    count = len(spec.packages)
    raw_progress = True
    done = 0
    for number, requirement in enumerate(spec.packages, start=1):
        bar.set_description(f"{spec.name}: download {number}/{count}")
        share = shares[requirement]

        def advance(fraction: float, before: int = done, share: int = share) -> None:
            bar.update(max(0, before + int(fraction * share) - bar.n))

        status, lines = _run_pip(_pip_command(target, requirement, raw_progress), env, advance)
        if status != 0 and raw_progress and any("invalid choice: 'raw'" in ln for ln in lines):
            # a pip older than 24.1: no byte counts, the bar moves once per package
            raw_progress = False
            status, lines = _run_pip(_pip_command(target, requirement, False), env, advance)
        if status != 0:
            tail = "\n".join("\n".join(lines).strip().splitlines()[-_PIP_TAIL_LINES:])
            raise ModelPullError(
                f"pip could not install {requirement} for model {spec.name!r} "
                f"(exit status {status}). pip said:\n{tail}\n"
                f"Check the network and pip's index settings, then run "
                f"`edgemerge models pull {spec.name}` again."
            )
        done += share
        bar.update(max(0, done - bar.n))


def _locate_parts(spec: ModelSpec, target: Path) -> list[Path]:
    found = []
    for part in spec.parts:
        path = target / part.path
        if not path.is_file():
            raise ModelPullError(
                f"{part.package} was installed but has no file {part.path}; the registry "
                f"entry for {spec.name!r} does not match that package"
            )
        size = path.stat().st_size
        if size != part.size:
            raise ModelPullError(
                f"{part.path} from {part.package} is {size:,} bytes, the registry expects "
                f"{part.size:,}; the package on the index differs from the pinned one"
            )
        found.append(path)
    return found


def _assemble(spec: ModelSpec, sources: list[Path], target: Path, bar: tqdm) -> None:
    """Concatenate ``sources`` into a temporary file, hashing as it goes; rename if good.
    ``bar`` starts again for it (one line for the whole pull)."""
    bar.reset(total=spec.size)
    bar.set_description(f"{spec.name}: assemble and verify")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is not a secret
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for source in sources:
                with source.open("rb") as src:
                    while block := src.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        size = tmp.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelIntegrityError(
                f"the file assembled from {', '.join(spec.packages)} is {size:,} bytes with "
                f"sha256 {digest.hexdigest()}; the registry expects {spec.size:,} bytes with "
                f"sha256 {spec.sha256}. Nothing was written to {target}."
            )
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelPullError(f"could not write {target}: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(target, spec)


def pull(model: str | ModelSpec, *, progress: bool = True, force: bool = False) -> Path:
    """Download, assemble and verify a registry model; return its path in the cache.

    A model that is already there and verified is returned at once (``force`` pulls it
    again). Progress goes to stderr.

    Raises:
        ModelNotFoundError: ``model`` is not a registry name.
        ModelPullError: pip failed, or the file could not be written.
        ModelIntegrityError: the assembled file does not match the registry.
    """
    spec = model if isinstance(model, ModelSpec) else load_registry().get(model)
    target = model_path(spec)
    if not force:
        try:
            found = _installed(spec, progress)
        except ModelIntegrityError as exc:
            _say(progress, f"{exc} Pulling it again now.")
            found = None
        if found is not None:
            return found
    scratch = cache_dir() / "pip" / spec.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
    except OSError as exc:
        raise ModelPullError(f"cannot use the cache folder {cache_dir()}: {exc}") from exc
    # The unpacked packages and the assembled copy exist side by side for a moment.
    needed = 2 * spec.size
    if free < needed:
        raise ModelPullError(
            f"pulling {spec.name} needs about {needed / 1e6:,.0f} MB free in {cache_dir()}, "
            f"only {free / 1e6:,.0f} MB are; free some space or set EDGEMERGE_CACHE_DIR"
        )
    _say(progress, f"pulling {spec.name} ({spec.size / 1e6:,.1f} MB; licence: {spec.licence})")
    shutil.rmtree(scratch, ignore_errors=True)  # leftovers of an interrupted pull
    try:
        with _bytes_bar(spec.size, spec.name, progress) as bar:
            _install_packages(spec, scratch, bar)
            _assemble(spec, _locate_parts(spec, scratch), target, bar)
    finally:
        # pip's own cache keeps a later pull cheap; the unpacked copy is not needed.
        shutil.rmtree(scratch, ignore_errors=True)
    _say(progress, f"{spec.name} is verified and ready: {target}")
    return target


# --------------------------------------------------------------------------- lookup


def _check_gguf(path: Path) -> Path:
    try:
        with path.open("rb") as src:
            head = src.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        raise ModelError(
            f"{path} is not a GGUF file: it starts with {head!r}, and GGUF model files "
            f"start with {GGUF_MAGIC!r}"
        )
    return path


def resolve_model(
    name_or_path: str | os.PathLike[str], *, pull_missing: bool = True, progress: bool = True
) -> Path:
    """A usable GGUF path for a registry name (pulled if needed) or an existing file.

    Raises:
        ModelNotFoundError: neither an existing file nor a registry name, or (with
            ``pull_missing=False``) a registry model that has not been pulled.
        ModelError: the path is not a regular GGUF file.
    """
    text = os.fspath(name_or_path)
    if not text:
        raise ModelNotFoundError("no model given: pass a registry name or a GGUF file path")
    candidate = Path(text).expanduser()
    if candidate.is_file():
        return _check_gguf(candidate)
    registry = load_registry()
    if text in registry.names():
        spec = registry.get(text)
        if pull_missing:
            return pull(spec, progress=progress)
        found = _installed(spec, progress)
        if found is None:
            raise ModelNotFoundError(
                f"model {text!r} has not been pulled; run `edgemerge models pull {text}` "
                f"({spec.size / 1e6:,.0f} MB)"
            )
        return found
    if candidate.exists():
        raise ModelError(f"{candidate} is not a regular file, so it cannot be a GGUF model")
    raise ModelNotFoundError(
        f"{text!r} is neither a known model nor an existing file. Known models: "
        f"{', '.join(registry.names())}. A GGUF file path must point to an existing file."
    )


def list_models() -> list[tuple[ModelSpec, Path | None]]:
    """Every registry model with its cached path, or None when it has not been pulled.

    Only the size is checked here (no hashing); :func:`pull` and
    :func:`resolve_model` verify before use.
    """
    listing: list[tuple[ModelSpec, Path | None]] = []
    for spec in load_registry().models:
        path = model_path(spec)
        try:
            present = path.is_file() and path.stat().st_size == spec.size
        except OSError:
            present = False
        listing.append((spec, path if present else None))
    return listing

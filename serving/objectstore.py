"""The model repository on object storage (S3, GCS, Azure Blob), and the server's local mirror of it.

Library: obstore (Python bindings of the Rust `object_store` crate). Chosen over fsspec (s3fs/gcsfs/adlfs), the
ecosystem's standard, because one wheel covers s3://, gs:// and az:// with each cloud's standard environment
variables, and because it exposes create-only puts (`mode="create"`: S3 `If-None-Match: *`, GCS
`ifGenerationMatch=0`, Azure `If-None-Match: *`) as one portable call, which is what makes publishing safe
without a rename. It is also faster and pulls in no aiohttp/botocore tree.

Layout under the URL's prefix (the local layout, except that the version's files carry an upload token)::

    PREFIX/clnp-repository.json
    PREFIX/N/weights.<token>.safetensors    immutable, uploaded first
    PREFIX/N/model.<token>.onnx             immutable, uploaded first
    PREFIX/N/manifest.json                  written last, create-only: names the files, their sizes and sha256

A version exists once its manifest does. Two trainers racing for version N upload to different file names (their
tokens differ), and only one of them can create `N/manifest.json`; the other is told so and removes its uploads.
A trainer killed mid-upload leaves files that no manifest names: no reader sees them, and the next publish
removes them. Readers check every file against the manifest's size and sha256 before using it.

Access is configured the way every AWS tool does: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and
AWS_ENDPOINT_URL (for S3-compatible servers; plain http is allowed only when this names an http:// endpoint),
and GOOGLE_* / AZURE_STORAGE_* for the other clouds, all read by obstore itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from serving.repository import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MARKER_FILE,
    ONNX_FILE,
    WEIGHTS_FILE,
    CorruptVersionError,
    Manifest,
    ModelRepository,
    RepositoryError,
    VersionNotFoundError,
    check_marker,
    version_taken,
)

logger = logging.getLogger(__name__)

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl")


def is_remote(location: str | os.PathLike) -> bool:
    """True when `location` is an object-store URL (s3://, gs://, az://, ...) rather than a local path."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


def open_repository(location: str | os.PathLike) -> "ModelRepository | ObjectStoreRepository":
    """An existing repository, local or on object storage; raises RepositoryError when it is not one."""
    if is_remote(location):
        return ObjectStoreRepository.open(str(location))
    return ModelRepository.open(location)


def create_repository(location: str | os.PathLike) -> "ModelRepository | ObjectStoreRepository":
    """Open the repository at `location`, creating it if there is none yet."""
    if is_remote(location):
        return ObjectStoreRepository.create(str(location))
    return ModelRepository.create(location)


def _store(url: str):
    import obstore.store

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    client_options: dict[str, Any] = {"timeout": "120s", "connect_timeout": "10s"}
    if url.lower().startswith(("s3://", "s3a://")) and endpoint.lower().startswith("http://"):
        client_options["allow_http"] = True  # an S3-compatible server the operator named with plain http
    try:
        return obstore.store.from_url(url, client_options=client_options,
                                      retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=30)})
    except Exception as e:  # obstore raises its own errors for a malformed URL or configuration
        raise RepositoryError(f"cannot open object store {url}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _tokened(name: str, token: str) -> str:
    """model.onnx -> model.<token>.onnx"""
    stem, dot, ext = name.partition(".")
    return f"{stem}.{token}{dot}{ext}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Object:
    path: str
    size: int
    e_tag: str | None


@dataclass
class SyncResult:
    """What one mirror poll did: the versions it installed into the cache, and those it could not."""

    installed: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # version -> why it was not installed
    unreachable: str | None = None  # why the store could not be listed at all

    def describe(self) -> str:
        """The failures in words ('' when there were none)."""
        parts = [f"version {v} not downloaded: {why}" for v, why in sorted(self.errors.items())]
        if self.unreachable:
            parts.append(f"cannot poll the object store: {self.unreachable}")
        return "; ".join(parts)


class ObjectStoreRepository:
    """A model repository under an object-store URL; the same reading and publishing API as `ModelRepository`.

    Use `open(url)` for an existing repository and `create(url)` to make one (or open it).
    """

    def __init__(self, url: str, store=None):
        self.url = url.rstrip("/")
        self.root = self.url  # what messages call it
        self._store = store if store is not None else _store(self.url)
        self._fetched: dict[tuple[int, str], bytes] = {}  # (version, file) -> verified bytes, read once

    def __repr__(self) -> str:
        return f"ObjectStoreRepository({self.url!r})"

    # ---- primitives ------------------------------------------------------------------------

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one obstore call. A missing object raises FileNotFoundError, a create-only put onto an existing
        object FileExistsError; every other store error becomes a one-line RepositoryError."""
        import obstore.exceptions as oe

        try:
            return fn(self._store, *args, **kwargs)
        except FileNotFoundError:
            raise
        except oe.NotFoundError as e:
            raise FileNotFoundError(_first_line(e)) from e
        except (oe.AlreadyExistsError, oe.PreconditionError) as e:
            raise FileExistsError(_first_line(e)) from e
        except (oe.PermissionDeniedError, oe.UnauthenticatedError) as e:
            raise RepositoryError(
                f"{self.url}: access denied while trying to {what}: {_first_line(e)}; check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY (or the store's own credentials) and the bucket policy"
            ) from e
        except Exception as e:
            raise RepositoryError(f"{self.url}: cannot {what}: {_first_line(e)}") from e

    def _get(self, path: str) -> bytes:
        import obstore

        return bytes(self._call(f"read {path}", obstore.get, path).bytes())

    def _put(self, path: str, data: bytes, create: bool = False) -> None:
        import obstore

        try:
            self._call(f"write {path}", obstore.put, path, data, mode="create" if create else "overwrite")
        except FileNotFoundError as e:  # a put finds nothing only when the bucket (container) itself is missing
            raise RepositoryError(f"{self.url}: cannot write {path}: the bucket does not exist") from e

    def _delete(self, path: str) -> None:
        import obstore

        try:
            self._call(f"delete {path}", obstore.delete, path)
        except FileNotFoundError:
            pass

    def _list(self) -> list[_Object]:
        import obstore

        try:
            batches = self._call("list the repository", lambda store: obstore.list(store).collect())
        except FileNotFoundError as e:
            raise RepositoryError(f"{self.url}: cannot list the repository: the bucket does not exist") from e
        return [_Object(o["path"], int(o["size"]), o.get("e_tag")) for o in batches]

    # ---- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> "ObjectStoreRepository":
        """Open an existing repository; raises RepositoryError when there is none at `url` or it is unreachable."""
        repo = cls(url)
        try:
            raw = repo._get(MARKER_FILE)
        except FileNotFoundError:
            repo._list()  # raises "the bucket does not exist" when that is why
            raise RepositoryError(f"{repo.url} is not a clnp model repository (no {MARKER_FILE})") from None
        repo._check_marker(raw)
        return repo

    @classmethod
    def create(cls, url: str) -> "ObjectStoreRepository":
        """Open the repository at `url`, creating its marker if the prefix holds nothing else."""
        repo = cls(url)
        try:
            repo._check_marker(repo._get(MARKER_FILE))
            return repo
        except FileNotFoundError:
            pass
        if not repo.is_empty():
            raise RepositoryError(f"{repo.url} holds objects and is not a clnp model repository")
        marker = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION}).encode()
        try:
            repo._put(MARKER_FILE, marker, create=True)
        except FileExistsError:
            repo._check_marker(repo._get(MARKER_FILE))  # another writer created it first: fine if it is ours
        return repo

    def _check_marker(self, raw: bytes) -> None:
        check_marker(raw, f"{self.url}/{MARKER_FILE}", self.url)

    def is_empty(self) -> bool:
        """True when nothing is stored under the URL's prefix."""
        return not self._list()

    def check_writable(self) -> None:
        """Write and remove a probe object; raises RepositoryError when this identity cannot write here."""
        probe = f".clnp-write-check-{uuid.uuid4().hex}"
        self._put(probe, b"")
        self._delete(probe)

    # ---- reading ---------------------------------------------------------------------------

    def _version_objects(self) -> dict[int, dict[str, _Object]]:
        """Every numbered folder and its objects by file name (complete or not)."""
        found: dict[int, dict[str, _Object]] = {}
        for obj in self._list():
            head, _, name = obj.path.partition("/")
            if head.isdigit() and name and "/" not in name:
                found.setdefault(int(head), {})[name] = obj
        return found

    def versions(self) -> list[int]:
        """Published versions, oldest first (numbered folders holding a manifest)."""
        return sorted(v for v, objs in self._version_objects().items() if MANIFEST_FILE in objs)

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def read_manifest(self, version: int | None = None) -> Manifest:
        """The manifest of `version` (default: the latest); raises VersionNotFoundError or CorruptVersionError."""
        if version is None:
            version = self.latest()
            if version is None:
                raise VersionNotFoundError(f"model repository {self.url} holds no version yet")
        try:
            raw = self._get(f"{version}/{MANIFEST_FILE}")
        except FileNotFoundError:
            raise VersionNotFoundError(
                f"version {version} not found in {self.url}; versions: {self.versions() or 'none'}"
            ) from None
        try:
            manifest = Manifest.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptVersionError(f"version {version}: manifest is invalid: {e}") from e
        if manifest.version != version:
            raise CorruptVersionError(f"version {version}: manifest says version {manifest.version}")
        return manifest

    def fetch(self, manifest: Manifest, name: str) -> bytes:
        """One of the version's files, checked against the manifest's size and sha256 (CorruptVersionError)."""
        key = (manifest.version, name)
        if key in self._fetched:
            return self._fetched[key]
        expected = {n: (sha, size) for n, sha, size in manifest.files()}
        if name not in expected:
            raise CorruptVersionError(f"version {manifest.version}: the manifest names no file {name!r}")
        sha, size = expected[name]
        try:
            data = self._get(f"{manifest.version}/{name}")
        except FileNotFoundError:
            raise CorruptVersionError(f"version {manifest.version}: {name} is missing") from None
        if size is not None and len(data) != size:
            raise CorruptVersionError(f"version {manifest.version}: {name} has {len(data)} bytes, the manifest says {size}")
        if _sha256(data) != sha:
            raise CorruptVersionError(f"version {manifest.version}: {name} does not match its checksum")
        self._fetched = {k: v for k, v in self._fetched.items() if k[0] == manifest.version}  # one version cached
        self._fetched[key] = data
        return data

    def verify(self, version: int | None = None) -> Manifest:
        """Read `version`'s manifest and check both files against their sizes and sha256."""
        manifest = self.read_manifest(version)
        for name, _, _ in manifest.files():
            self.fetch(manifest, name)
        return manifest

    def onnx_bytes(self, manifest: Manifest) -> bytes:
        return self.fetch(manifest, manifest.onnx.file)

    def load_weights(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """The version's tensors as numpy arrays (safetensors: no code runs on load)."""
        from safetensors.numpy import load

        data = self.fetch(manifest, manifest.weights_file)
        try:
            return load(data)
        except Exception as e:  # safetensors raises its own error types
            raise CorruptVersionError(f"version {manifest.version}: cannot read {manifest.weights_file}: {e}") from e

    # ---- writing ---------------------------------------------------------------------------

    def publish(self, build_manifest, weights: Mapping[str, np.ndarray], onnx_bytes: bytes,
                retention: int | None = None, version: int | None = None,
                extra_files: Mapping[str, bytes] | None = None) -> Manifest:
        """Publish the next version: files first, then the manifest with a create-only put.

        Same contract as `ModelRepository.publish`. Raises RepositoryError, having removed its own uploads, when
        another writer created the same version first. Afterwards removes what no manifest names (uploads of
        killed or losing writers) and applies `retention`.
        """
        from safetensors.numpy import save

        if version is None:
            latest = self.latest()
            version = 1 if latest is None else latest + 1
        elif version in self.versions():
            raise RepositoryError(version_taken(self.url, version))
        token = uuid.uuid4().hex[:12]
        weights_bytes = save({k: np.ascontiguousarray(v) for k, v in weights.items()})
        files = {WEIGHTS_FILE: weights_bytes, ONNX_FILE: onnx_bytes, **(extra_files or {})}
        names = {name: _tokened(name, token) for name in files}  # unique per writer: racing uploads never collide
        uploaded: list[str] = []
        try:
            for name, data in files.items():
                self._put(f"{version}/{names[name]}", data)
                uploaded.append(f"{version}/{names[name]}")
            manifest = build_manifest(version, _sha256(weights_bytes), _sha256(onnx_bytes))
            if manifest.version != version:
                raise RepositoryError(f"manifest built for version {manifest.version}, expected {version}")
            manifest = manifest.with_files(names, {name: len(data) for name, data in files.items()})
            body = manifest.to_json().encode()
            try:
                self._put(f"{version}/{MANIFEST_FILE}", body, create=True)
            except FileExistsError:
                raise RepositoryError(version_taken(self.url, version)) from None
            if self._get(f"{version}/{MANIFEST_FILE}") != body:  # a store that ignored the create-only condition
                uploaded.clear()  # the files may be the other writer's now too: leave them to the cleanup
                raise RepositoryError(
                    f"version {version} was overwritten by another writer on {self.url}, whose store does not "
                    "honour create-only writes; check the newest version before publishing again"
                )
        except BaseException:
            for path in uploaded:
                try:
                    self._delete(path)
                except Exception:  # best effort; the next publish removes what is left
                    logger.warning("could not remove %s/%s after a failed publish", self.url, path)
            raise
        logger.info("published version %d to %s", version, self.url)
        self._remove_unreferenced(version)
        if retention is not None:
            self.apply_retention(retention)
        return manifest

    def _remove_unreferenced(self, up_to: int) -> list[str]:
        """Remove objects in version folders <= `up_to` that their manifest does not name (or of unpublished
        folders): uploads of writers that were killed or lost a race. Folders above `up_to` may be uploads in
        progress and are left alone."""
        removed = []
        for version, objs in self._version_objects().items():
            if version > up_to:
                continue
            keep: set[str] = set()
            if MANIFEST_FILE in objs:
                try:
                    m = self.read_manifest(version)
                    keep = {MANIFEST_FILE, *(name for name, _, _ in m.files())}
                except (RepositoryError, FileNotFoundError):
                    continue  # a manifest we cannot read: leave the folder for a person to look at
            for name in sorted(set(objs) - keep):
                self._delete(f"{version}/{name}")
                removed.append(f"{version}/{name}")
        if removed:
            logger.info("removed %d leftover object(s) of unfinished uploads: %s", len(removed), ", ".join(removed))
        return removed

    def apply_retention(self, keep: int) -> list[int]:
        """Remove all but the newest `keep` versions (at least 1 is kept): manifest first, so readers skip it."""
        if keep < 1:
            raise RepositoryError(f"retention must keep at least 1 version, got {keep}")
        objects = self._version_objects()
        versions = sorted(v for v, objs in objects.items() if MANIFEST_FILE in objs)
        removed = versions[:-keep] if len(versions) > keep else []
        for v in removed:
            self._delete(f"{v}/{MANIFEST_FILE}")
            for name in objects[v]:
                if name != MANIFEST_FILE:
                    self._delete(f"{v}/{name}")
            logger.info("removed version %d (retention %d)", v, keep)
        return removed

    # ---- mirroring -------------------------------------------------------------------------

    def sync_to(self, cache: ModelRepository, keep: int = 1, failed: dict | None = None) -> SyncResult:
        """Make the local `cache` hold the newest `keep` good versions: download, verify and install them.

        Walks from the newest version down, so a broken newest version leaves the one before it served. Each file
        is checked against its manifest's size and sha256 before the version is installed (atomically, as a local
        publish is). A version that fails is reported, and not downloaded again while its manifest is unchanged
        when a `failed` dict is passed in to remember it.
        """
        result = SyncResult()
        objects = self._version_objects()
        published = sorted(v for v, objs in objects.items() if MANIFEST_FILE in objs)
        have = set(cache.versions())
        good = 0
        for version in reversed(published):
            if good >= keep:
                break
            if version in have:
                good += 1
                continue
            signature = objects[version][MANIFEST_FILE].e_tag or objects[version][MANIFEST_FILE].size
            if failed is not None and failed.get(version, (None,))[0] == signature:
                continue
            try:
                manifest = self.verify(version)
                cache.install(manifest, {name: self.fetch(manifest, name) for name, _, _ in manifest.files()})
            except (RepositoryError, FileNotFoundError) as e:
                message = str(e) if isinstance(e, RepositoryError) else f"version {version} vanished while reading"
                result.errors[version] = message
                if failed is not None:
                    failed[version] = (signature, message)
                logger.error("version %d of %s not mirrored: %s", version, self.url, message)
                continue
            finally:
                self._fetched.clear()
            good += 1
            result.installed.append(version)
            logger.info("mirrored version %d of %s into %s", version, self.url, cache.root)
        return result


def default_cache_dir(url: str) -> Path:
    """Where a server mirrors `url` when no --cache-dir is given: $XDG_CACHE_HOME/clnp/<hash of the URL>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "clnp" / hashlib.sha256(url.encode()).hexdigest()[:16]


__all__ = [
    "REMOTE_SCHEMES",
    "ObjectStoreRepository",
    "SyncResult",
    "create_repository",
    "default_cache_dir",
    "is_remote",
    "open_repository",
]

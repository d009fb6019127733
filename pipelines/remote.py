"""The artifact store on S3-compatible storage, so several workers share one cache.

The bucket holds the same layout as a workspace: `<prefix>/artifacts/<stage>/<key>/<files>` and
`manifest.json`. The same rule as on disk makes it safe without locks: the manifest is uploaded
last, so a manifest's presence means every file it lists is there. A fetch downloads beside the
local final dir, checks every file's size and sha256 against the manifest and renames into place,
so a local artifact is either complete and verified or absent.

Endpoint: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL (MinIO, Ceph, R2...;
none = AWS). Credentials: boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile,
an instance role). Nothing here logs or raises with credentials in it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

from pipelines.artifacts import MANIFEST, Artifact, files_digest, sha256_file

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
log = logging.getLogger("pipelines.remote")


class RemoteIntegrityError(RuntimeError):
    """A remote object does not match its manifest (corrupted, or overwritten by another push)."""


def endpoint_url() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


class RemoteStore:
    """`s3://bucket/prefix` as a second level of the artifact cache."""

    def __init__(self, url: str):
        import boto3
        from botocore.config import Config

        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"storage.remote={url!r}: expected s3://bucket[/prefix]")
        self.url = url.rstrip("/")
        self.bucket, _, prefix = url[5:].partition("/")
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint_url()
        # Path-style addressing: what MinIO and most S3-compatible servers need on a custom endpoint.
        config = Config(s3={"addressing_style": "path"} if self.endpoint else {},
                        retries={"max_attempts": 5, "mode": "standard"})
        self.s3 = boto3.client("s3", endpoint_url=self.endpoint, config=config)
        self._check_bucket()

    def _check_bucket(self) -> None:
        """Fail at start-up, before any stage runs, on a wrong bucket, endpoint or credentials."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.url} (endpoint {self.endpoint or 'AWS default'})"
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise RuntimeError(f"storage.remote {where}: no S3 credentials; set "
                               "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                raise RuntimeError(f"storage.remote {where}: bucket {self.bucket!r} does not "
                                   "exist; create it or fix storage.remote") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise RuntimeError(f"storage.remote {where}: access denied ({code}); check the "
                                   "AWS credentials and the bucket policy") from None
            raise
        except BotoCoreError as e:  # e.g. the endpoint is unreachable
            raise RuntimeError(f"storage.remote {where}: {e}; set {ENDPOINT_VARS[0]} to the "
                               "S3 endpoint") from None

    def artifact_url(self, stage: str, key: str) -> str:
        """s3://bucket/prefix/artifacts/<stage>/<key>: where that artifact's files are."""
        return f"s3://{self.bucket}/{self.object_key(stage, key)}"

    def object_key(self, stage: str, key: str, rel: str = "") -> str:
        parts = [self.prefix, "artifacts", stage, key, rel]
        return "/".join(p for p in parts if p)

    def _name(self, obj: str) -> str:
        return f"s3://{self.bucket}/{obj}"

    def _get_manifest(self, stage: str, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.get_object(Bucket=self.bucket,
                                      Key=self.object_key(stage, key, MANIFEST))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise

    def exists(self, stage: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.object_key(stage, key, MANIFEST))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise

    def fetch(self, stage: str, key: str, local_final_dir: Path) -> bool:
        """Download the artifact into `local_final_dir` if the bucket has it (its manifest is
        there); False when it does not. Raises RemoteIntegrityError naming the object when a file
        does not match the manifest; nothing that looks finished is left behind then."""
        from botocore.exceptions import ClientError

        raw = self._get_manifest(stage, key)
        if raw is None:
            return False
        manifest_name = self._name(self.object_key(stage, key, MANIFEST))
        m = json.loads(raw)
        if m.get("stage") != stage or m.get("key") != key:
            raise RemoteIntegrityError(f"{manifest_name} is for {m.get('stage')}/{m.get('key')}, "
                                       f"not {stage}/{key}")
        if files_digest(m["files"], m.get("digest_exclude", ())) != m["digest"]:
            raise RemoteIntegrityError(f"{manifest_name}: its file list does not match its digest")
        final = Path(local_final_dir)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for f in m["files"]:
                rel = PurePosixPath(f["path"])
                if rel.is_absolute() or ".." in rel.parts or str(rel) == MANIFEST:
                    raise RemoteIntegrityError(f"{manifest_name} lists an unsafe path {f['path']!r}")
                obj = self.object_key(stage, key, f["path"])
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.s3.download_file(self.bucket, obj, str(dest))
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey"):
                        raise
                    raise RemoteIntegrityError(f"{self._name(obj)} is listed in {manifest_name} "
                                               "but missing from the bucket") from None
                size = dest.stat().st_size
                if size != f["size"]:
                    got, want = f"size {size}", f"size {f['size']}"
                elif (digest := sha256_file(dest)) != f["sha256"]:
                    got, want = f"sha256 {digest}", f"sha256 {f['sha256']}"
                else:
                    continue
                raise RemoteIntegrityError(
                    f"{self._name(obj)} has {got}, but {manifest_name} says {want}: the remote copy "
                    "is corrupt or was overwritten by another push; delete that artifact's objects "
                    "in the bucket and rerun the stage")
            (tmp / MANIFEST).write_bytes(raw)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent fetch/run got there first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("fetched %s/%s from %s (%d files)", stage, key[:12], self.url, len(m["files"]))
        return True

    def push(self, artifact: Artifact) -> bool:
        """Upload the artifact's files, then its manifest LAST (a reader never sees a manifest
        without its files). Skips (False) when the bucket already has this artifact. Each file is
        re-hashed before upload so a locally damaged copy never reaches the shared cache."""
        if self.exists(artifact.stage, artifact.key):
            return False
        manifest = artifact.manifest
        for f in manifest["files"]:
            path = artifact.path / f["path"]
            if sha256_file(path) != f["sha256"]:
                raise RemoteIntegrityError(f"{path} no longer matches its manifest; not pushing "
                                           f"it to {self.url} (delete {artifact.path} and rerun)")
            self.s3.upload_file(str(path), self.bucket,
                                self.object_key(artifact.stage, artifact.key, f["path"]))
        self.s3.upload_file(str(artifact.path / MANIFEST), self.bucket,
                            self.object_key(artifact.stage, artifact.key, MANIFEST))
        log.info("pushed %s/%s to %s (%d files)", artifact.stage, artifact.key[:12], self.url,
                 len(manifest["files"]))
        return True

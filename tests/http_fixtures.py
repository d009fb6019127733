"""Real HTTP servers on 127.0.0.1 for download tests: a static file server with fault injection
(dropped connections, corrupted bytes, substituted bodies, missing files, required query
signature) and a stub of the few Hugging Face Hub endpoints huggingface_hub 2.4.0 calls.

Every request is recorded (method, path, query, Range header, status, body bytes sent), so tests
assert on what went over the wire rather than on the client's word.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    status: int = 0
    sent: int = 0           # body bytes written
    authorization: str | None = None


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)   # path -> close after N body bytes (once)
    corrupt: dict[str, int] = field(default_factory=dict)      # path -> times to flip one byte
    replace: dict[str, bytes] = field(default_factory=dict)    # path -> body served instead
    missing: set[str] = field(default_factory=set)             # path -> 404
    status: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer first
    require_query: str | None = None                           # 403 unless the query equals this
    ignore_range: set[str] = field(default_factory=set)        # path -> answer Range with a 200


class _Server:
    """Base: a ThreadingHTTPServer on a random loopback port, recording requests."""

    def __init__(self):
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                outer._handle(self, "GET")

            def do_HEAD(self):
                outer._handle(self, "HEAD")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _record(self, handler, method) -> Request:
        parts = urllib.parse.urlsplit(handler.path)
        req = Request(method, urllib.parse.unquote(parts.path), parts.query,
                      handler.headers.get("Range"), authorization=handler.headers.get("Authorization"))
        with self._lock:
            self.requests.append(req)
        return req

    def _send_body(self, handler, req: Request, body: bytes, headers: dict[str, str],
                   method: str, drop_after: int | None = None, use_range: bool = True) -> None:
        """200/206 with Range support; optionally close the connection after `drop_after` bytes."""
        status, total = 200, len(body)
        rng = req.range if use_range else None
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m[1]) if m else -1
            if not 0 <= start < total:
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{total}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                req.status = 416
                return
            status, body = 206, body[start:]
            headers = {**headers, "Content-Range": f"bytes {start}-{total - 1}/{total}"}
        handler.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}.items():
            handler.send_header(k, v)
        handler.end_headers()
        req.status = status
        if method == "HEAD":
            return
        if drop_after is not None:
            handler.wfile.write(body[:drop_after])
            handler.wfile.flush()
            req.sent = drop_after
            handler.close_connection = True  # the server closes the socket mid-body
            return
        handler.wfile.write(body)
        req.sent = len(body)

    def _error(self, handler, req: Request, status: int, body: bytes = b"",
               headers: dict[str, str] | None = None) -> None:
        handler.send_response(status)
        for k, v in {**(headers or {}), "Content-Length": str(len(body))}.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)
        req.status = status

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]


class FileServer(_Server):
    """Serves `root` (paths relative to it) with the faults in `faults`."""

    def __init__(self, root: Path, faults: Faults | None = None):
        super().__init__()
        self.root = Path(root)
        self.faults = faults or Faults()

    def _handle(self, handler, method):
        req = self._record(handler, method)
        f, path = self.faults, req.path
        if f.require_query is not None and req.query != f.require_query:
            return self._error(handler, req, 403, b"<?xml version='1.0'?><Error>AccessDenied</Error>",
                               {"Content-Type": "application/xml"})
        with self._lock:
            status = f.status.get(path, []).pop(0) if f.status.get(path) else None
            drop = f.drop_after.pop(path, None)
            corrupt = f.corrupt.get(path, 0) > 0
            if corrupt:
                f.corrupt[path] -= 1
        if status is not None:
            return self._error(handler, req, status, b"try again")
        file = self.root / path.lstrip("/")
        if path in f.missing or not (path in f.replace or file.is_file()):
            return self._error(handler, req, 404, b"<html><body>Not Found</body></html>",
                               {"Content-Type": "text/html"})
        body = f.replace.get(path, file.read_bytes() if file.is_file() else b"")
        if corrupt:
            i = len(body) // 3
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]
        self._send_body(handler, req, body, {"Content-Type": "application/octet-stream"}, method,
                        drop_after=drop, use_range=path not in f.ignore_range)


class HubStub(_Server):
    """The endpoints huggingface_hub 2.4.0 calls for model_info(files_metadata=True) followed by
    hf_hub_download(revision=<sha>, local_dir=...):

      GET  /api/models/{repo_id}/revision/{revision}?blobs=True  -> id, sha, siblings (+ lfs)
      HEAD /{repo_id}/resolve/{sha}/{path}   -> X-Repo-Commit, ETag, Content-Length
      GET  /{repo_id}/resolve/{sha}/{path}   -> the bytes (Range supported)

    Files whose name is in `lfs` are described as LFS (sha256 in metadata, sha256 ETag), the rest
    by their git blob id. `bad_sha256` overrides the advertised sha256 of a file.
    """

    def __init__(self, repo_id: str, files: dict[str, bytes], *, revisions: dict[str, str],
                 lfs: set[str], token: str | None = None, bad_sha256: dict[str, str] | None = None):
        super().__init__()
        self.repo_id, self.files, self.revisions = repo_id, files, revisions
        self.lfs, self.token, self.bad_sha256 = lfs, token, bad_sha256 or {}

    @staticmethod
    def git_blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sha256(self, name: str) -> str:
        return self.bad_sha256.get(name) or hashlib.sha256(self.files[name]).hexdigest()

    def _handle(self, handler, method):
        req = self._record(handler, method)
        if self.token is not None and req.authorization != f"Bearer {self.token}":
            return self._error(handler, req, 401, b'{"error": "Invalid credentials"}',
                               {"Content-Type": "application/json"})
        api = f"/api/models/{self.repo_id}/revision/"
        if req.path.startswith(api) and method == "GET":
            sha = self.revisions.get(req.path[len(api):])
            if sha is None:
                return self._error(handler, req, 404, b'{"error": "Invalid rev id"}',
                                   {"X-Error-Code": "RevisionNotFound",
                                    "Content-Type": "application/json"})
            siblings = []
            for name, data in self.files.items():
                s = {"rfilename": name, "size": len(data), "blobId": self.git_blob_id(data)}
                if name in self.lfs:
                    s["lfs"] = {"size": len(data), "sha256": self.sha256(name), "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"id": self.repo_id, "sha": sha, "siblings": siblings}).encode()
            return self._send_body(handler, req, body, {"Content-Type": "application/json"}, method)
        m = re.fullmatch(rf"/{re.escape(self.repo_id)}/resolve/([0-9a-f]{{40}})/(.+)", req.path)
        if m and m[1] in self.revisions.values() and m[2] in self.files:
            name = m[2]
            etag = self.sha256(name) if name in self.lfs else self.git_blob_id(self.files[name])
            return self._send_body(handler, req, self.files[name],
                                   {"ETag": f'"{etag}"', "X-Repo-Commit": m[1]}, method)
        return self._error(handler, req, 404, b'{"error": "Entry not found"}',
                           {"X-Error-Code": "EntryNotFound", "Content-Type": "application/json"})

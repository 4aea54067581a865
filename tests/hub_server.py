"""A local Hugging Face Hub for tests: the HTTP endpoints that the unmodified `huggingface_hub` client calls when this
library pushes a folder and when timm / transformers / `hf_hub_download` load it back.

`LocalHub` is a standard-library `ThreadingHTTPServer` on 127.0.0.1. File contents are stored on disk under
``root/objects/<sha256>``; every commit's tree is also written out as a plain folder, ``root/<ns>/<name>/<commit>/``
(`LocalHub.folder`), so a test can inspect exactly what arrived. A push is one commit (a new 40-hex revision);
``main`` points to the last one and every older revision stays downloadable by its sha. A commit is applied only
when its whole payload is valid: a failed request never leaves a half-committed revision.

Uploads take the LFS path (``HF_HUB_DISABLE_XET=1``): preupload decides ``regular`` or ``lfs`` per file, LFS files
go through the batch API, a single-part PUT and a verify call, then the commit names them by SHA-256.

Faults: ``hub.fail(endpoint, status)`` answers `status` at that endpoint (``drop=True``: closes the connection after
reading part of the request body), for the next `times` requests or until ``hub.clear_faults()``. The endpoint names
are the keys of `ROUTES`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_local_test_token"
USER = "user"
# what the Hub stores in LFS by extension (its default .gitattributes) or by size
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl")
LFS_MIN_SIZE = 10 * 1024 * 1024
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"

# endpoint name -> (method, path pattern); one handler method `_<name>` each
ROUTES = {
    "whoami": ("GET", r"/api/whoami-v2"),
    "agent_harnesses": ("GET", r"/api/agent-harnesses"),
    "create_repo": ("POST", r"/api/repos/create"),
    "validate_yaml": ("POST", r"/api/validate-yaml"),
    "model_info": ("GET", rf"/api/models/{REPO}(?:/revision/{REV})?"),
    "preupload": ("POST", rf"/api/models/{REPO}/preupload/{REV}"),
    "commit": ("POST", rf"/api/models/{REPO}/commit/{REV}"),
    "tree": ("GET", rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?"),
    "paths_info": ("POST", rf"/api/models/{REPO}/paths-info/{REV}"),
    "lfs_batch": ("POST", rf"/{REPO}\.git/info/lfs/objects/batch"),
    "lfs_upload": ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})"),
    "lfs_verify": ("POST", rf"/{REPO}\.git/info/lfs/objects/verify"),
    "resolve": ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)"),
    "resolve_head": ("HEAD", rf"/{REPO}/resolve/{REV}/(?P<path>.+)"),
}


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files (and for LFS pointers)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, tuple[str, bool]]  # path -> (sha256 of the content, stored in LFS)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return next((c for c in self.commits if c.oid == oid or (len(revision) >= 7 and c.oid.startswith(oid))), None)


@dataclass
class Fault:
    status: int | None
    drop: bool
    times: int | None  # None: until cleared


class HubError(Exception):
    """An error answer: status, a message, and the X-Error-Code the client maps to an exception class."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub:
    """The server, its repos and its fault switches (thread-safe; handlers run in the server's threads)."""

    def __init__(self, root: Path, token: str = TOKEN, user: str = USER):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str]] = []  # (endpoint name or "unhandled", "METHOD path")
        self.lock = threading.RLock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- test controls --------------------------------------------------------------------------------------------
    def fail(self, endpoint: str, status: int | None = None, *, drop: bool = False, times: int | None = None):
        """Answer `status` (or drop the connection) at `endpoint` for the next `times` requests (None: always)."""
        assert endpoint in ROUTES, f"unknown endpoint {endpoint!r}; one of {sorted(ROUTES)}"
        self.faults[endpoint] = Fault(status, drop, times)

    def clear_faults(self) -> None:
        self.faults.clear()

    def calls(self, endpoint: str) -> int:
        return sum(1 for name, _ in self.requests if name == endpoint)

    def commits(self, repo_id: str) -> list[Commit]:
        with self.lock:
            return list(self.repos[repo_id].commits) if repo_id in self.repos else []

    def folder(self, repo_id: str, revision: str = "main") -> Path:
        """The folder holding the repo's files at `revision` (a branch or a commit sha)."""
        with self.lock:
            commit = self.repos[repo_id].commit(revision)
        assert commit is not None, f"{repo_id} has no revision {revision!r}"
        return self.root / repo_id / commit.oid

    def signature(self, oid: str) -> str:
        """The signature of an LFS upload URL (the Hub's are presigned storage URLs)."""
        return hashlib.sha256(f"{self.token}:{oid}".encode()).hexdigest()[:32]

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    # --- helpers shared by the handlers ---------------------------------------------------------------------------
    def repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def file_entry(self, commit: Commit, path: str) -> dict:
        """A file as `list_repo_tree` / `get_paths_info` return it (`RepoFile`)."""
        sha, is_lfs = commit.files[path]
        size = self.object_path(sha).stat().st_size
        if not is_lfs:
            return {"type": "file", "path": path, "size": size, "oid": git_blob_id(self.object_path(sha).read_bytes())}
        pointer = lfs_pointer(sha, size)
        return {
            "type": "file",
            "path": path,
            "size": size,
            "oid": git_blob_id(pointer),
            "lfs": {"oid": sha, "size": size, "pointerSize": len(pointer)},
        }


def _handler_for(hub: LocalHub):
    routes = [(name, method, re.compile(pattern + r"$")) for name, (method, pattern) in ROUTES.items()]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # quiet: the test output is the client's
            pass

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        # --- plumbing -------------------------------------------------------------------------------------------
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            self.query, self._read = parse_qs(url.query), None  # one handler serves a keep-alive connection
            name, match = next(
                ((name, m) for name, verb, pattern in routes if verb == method and (m := pattern.match(url.path))),
                (None, None),
            )
            if name is None:
                hub.requests.append(("unhandled", f"{method} {self.path}"))
                self._body()
                return self._error(HubError(404, f"{method} {url.path} is not an endpoint of the local Hub"))
            hub.requests.append((name, f"{method} {self.path}"))
            try:
                if self._inject_fault(name):
                    return
                self._check_token(write=method == "POST" and name != "validate_yaml")
                getattr(self, f"_{name}")(**{k: v for k, v in match.groupdict().items() if v is not None})
            except HubError as err:
                self._error(err)
            except Exception as err:  # a bug of this server: a 500 naming it, never a silent hang-up
                self._error(HubError(500, f"local Hub error in {name}: {type(err).__name__}: {err}"))

        def _inject_fault(self, name: str) -> bool:
            with hub.lock:
                fault = hub.faults.get(name)
                if fault is None:
                    return False
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        del hub.faults[name]
            if fault.drop:  # read part of the upload, then hang up without an answer
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(min(length, 1024)) if length else self.rfile.readline()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return True
            self._body()
            message = {401: "Invalid credentials in Authorization header", 413: "Payload Too Large"}.get(
                fault.status, f"injected {fault.status} at {name}"
            )
            code = "RepoNotFound" if fault.status == 404 else None
            self._error(HubError(fault.status, message, code))
            return True

        def _check_token(self, write: bool) -> None:
            auth = self.headers.get("Authorization")
            if auth is None and not write:
                return  # public reads are anonymous
            if auth != f"Bearer {hub.token}":
                self._body()
                raise HubError(401, "Invalid credentials in Authorization header")

        def _body(self) -> bytes:
            if self._read is not None:
                return self._read
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        break
                    chunks.append(chunk)
                self._read = b"".join(chunks)
            else:
                self._read = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            return self._read

        def _json(self):
            return json.loads(self._body() or b"null")

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {})}
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _send_json(self, payload, status: int = 200, headers: dict | None = None):
            self._send(status, json.dumps(payload).encode(), headers)

        def _error(self, err: HubError):
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json({"error": err.message}, err.status, headers)

        # --- endpoints ------------------------------------------------------------------------------------------
        def _whoami(self):
            """`HfApi.whoami`."""
            if self.headers.get("Authorization") is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            self._send_json({"type": "user", "name": hub.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

        def _agent_harnesses(self):
            """The registry huggingface_hub's user-agent reads once a day (`utils._detect_agent`): empty."""
            self._send_json({"standardEnvVars": [], "harnesses": {}})

        def _create_repo(self):
            """`HfApi.create_repo`: 200 with the repo url, 409 when it exists (the client's ``exist_ok``)."""
            payload = self._json()
            repo_id = f"{payload.get('organization') or hub.user}/{payload['name']}"
            with hub.lock:
                exists = repo_id in hub.repos
                hub.repos.setdefault(repo_id, Repo(repo_id, private=payload.get("visibility") == "private"))
            if exists:  # the client reads the url from the 409 answer too
                message = "You already created this model repo"
                return self._send_json(
                    {"error": message, "url": f"{hub.url}/{repo_id}"}, 409, {"X-Error-Message": message}
                )
            self._send_json({"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self):
            """`HfApi._validate_yaml`, called by `create_commit` before a README.md is committed: the card's YAML
            must parse, and a ``model-index`` must pass huggingface_hub's own model-index parsing."""
            import yaml
            from huggingface_hub.repocard_data import model_index_to_eval_results

            content = self._json()["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else {}
                if metadata and "model-index" in metadata:
                    model_index_to_eval_results(metadata["model-index"])
            except Exception as err:  # the Hub answers 400 with the errors; the client raises ValueError
                return self._send_json({"errors": [{"message": str(err)}]}, 400)
            self._send_json({"errors": [], "warnings": []})

        def _model_info(self, repo: str, rev: str = "main"):
            """`HfApi.model_info` / `repo_info` (``snapshot_download`` resolves a branch to its sha with it)."""
            with hub.lock:
                model = hub.repo(repo)
                if not model.commits:
                    raise HubError(404, f"{repo} is empty", "RevisionNotFound")
                commit = hub.revision(model, rev)
            self._send_json(
                {
                    "id": repo,
                    "author": repo.split("/")[0],
                    "sha": commit.oid,
                    "private": model.private,
                    "siblings": [{"rfilename": path} for path in sorted(commit.files)],
                }
            )

        def _preupload(self, repo: str, rev: str):
            """`create_commit` → `_fetch_upload_modes`: ``regular`` or ``lfs`` per file, and the oid already there
            (sha256 for LFS, git blob id for regular files) so that unchanged files are skipped."""
            files = self._json()["files"]
            with hub.lock:
                model = hub.repo(repo)
                current = model.commit(unquote(rev))
            answer = []
            for entry in files:
                path, size = entry["path"], entry["size"]
                sample = base64.b64decode(entry["sample"])
                lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
                oid = None
                if current is not None and path in current.files:
                    sha, was_lfs = current.files[path]
                    oid = sha if was_lfs else git_blob_id(hub.object_path(sha).read_bytes())
                answer.append(
                    {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            self._send_json({"files": answer})

        def _lfs_batch(self, repo: str):
            """`lfs.post_lfs_batch_info`: an upload (and verify) action per object not stored yet."""
            payload = self._json()
            with hub.lock:
                hub.repo(repo)
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                entry = {"oid": oid, "size": size}
                if not hub.object_path(oid).exists():
                    entry["authenticated"] = True
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-upload/{oid}?signature={hub.signature(oid)}"},
                        "verify": {"href": f"{hub.url}/{repo}.git/info/lfs/objects/verify"},
                    }
                objects.append(entry)
            self._send_json(
                {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
            )

        def _lfs_upload(self, oid: str):
            """`lfs._upload_single_part`: the PUT of one LFS object to the signed URL the batch answer gave (no
            token is sent, as to S3); kept only when its SHA-256 is `oid`."""
            data = self._body()
            if self.query.get("signature") != [hub.signature(oid)]:
                raise HubError(403, "SignatureDoesNotMatch")
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, f"uploaded content does not match sha256 {oid}")
            hub.store(data)
            self._send(200)

        def _lfs_verify(self, repo: str):
            """`lfs.lfs_upload`'s verify step: the object is stored with the announced size."""
            payload = self._json()
            path = hub.object_path(payload["oid"])
            if not path.exists() or path.stat().st_size != payload["size"]:
                raise HubError(404, f"object {payload['oid']} was not uploaded")
            self._send_json({"ok": True})

        def _commit(self, repo: str, rev: str):
            """`create_commit` → `_send_commit`: the NDJSON payload (header, ``file`` base64, ``lfsFile`` by
            sha256, ``deletedFile`` / ``deletedFolder``), applied as one new commit or not at all."""
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            header = next(item["value"] for item in lines if item["key"] == "header")
            with hub.lock:
                model = hub.repo(repo)
                branch = unquote(rev)
                parent = model.commit(branch)
                if re.fullmatch(r"[0-9a-f]{7,40}", branch) or (model.commits and parent is None):
                    raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
                files = dict(parent.files) if parent else {}
                new_objects = []
                for item in lines:
                    key, value = item["key"], item["value"]
                    if key == "file":
                        new_objects.append(base64.b64decode(value["content"]))
                        files[value["path"]] = (hashlib.sha256(new_objects[-1]).hexdigest(), False)
                    elif key == "lfsFile":
                        if not hub.object_path(value["oid"]).exists():
                            raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                        files[value["path"]] = (value["oid"], True)
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                for data in new_objects:
                    hub.store(data)
                seed = json.dumps([parent.oid if parent else None, sorted(files.items()), header, len(model.commits)])
                commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), header["summary"], files)
                target = hub.root / repo / commit.oid
                for path, (sha, _) in files.items():
                    (target / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(hub.object_path(sha), target / path)
                target.mkdir(parents=True, exist_ok=True)
                model.commits.append(commit)
                model.refs[branch] = commit.oid
            self._send_json({"commitUrl": f"{hub.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid})

        def _tree(self, repo: str, rev: str, path: str = ""):
            """`HfApi.list_repo_tree` / `list_repo_files` (``snapshot_download`` lists what to fetch with it)."""
            recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            with hub.lock:
                commit = hub.revision(hub.repo(repo), rev)
            prefix = unquote(path).strip("/")
            prefix = prefix + "/" if prefix else ""
            entries, folders = [], set()
            for name in sorted(commit.files):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                if recursive:
                    parts = rest.split("/")[:-1]
                    folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
                entries.append(hub.file_entry(commit, name))
            if prefix and not entries and not folders:
                raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
            entries += [{"type": "directory", "path": f, "oid": git_blob_id(f.encode())} for f in sorted(folders)]
            self._send_json(entries)

        def _paths_info(self, repo: str, rev: str):
            """`HfApi.get_paths_info` (form-encoded ``paths``); unknown paths are left out, as the Hub does."""
            form = parse_qs(self._body().decode())
            with hub.lock:
                commit = hub.revision(hub.repo(repo), rev)
            answer = []
            for path in form.get("paths", []):
                if path in commit.files:
                    answer.append(hub.file_entry(commit, path))
                elif any(name.startswith(path.rstrip("/") + "/") for name in commit.files):
                    answer.append({"type": "directory", "path": path, "oid": git_blob_id(path.encode())})
            self._send_json(answer)

        def _resolve_head(self, repo: str, rev: str, path: str):
            """`get_hf_file_metadata` (``hf_hub_download``'s HEAD): X-Repo-Commit, ETag, X-Linked-Etag/Size."""
            self._resolve(repo, rev, path)

        def _resolve(self, repo: str, rev: str, path: str):
            """``hf_hub_download``'s GET of a file at a revision, with ``Range`` requests (resumed downloads)."""
            path = unquote(path)
            with hub.lock:
                model = hub.repo(repo)
                commit = hub.revision(model, rev)
            if path not in commit.files:  # the client caches "no such file at this commit" from X-Repo-Commit
                raise HubError(404, f"Entry {path} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            sha, is_lfs = commit.files[path]
            data = hub.object_path(sha).read_bytes()
            etag = f'"{sha}"' if is_lfs else f'"{git_blob_id(data)}"'
            headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid, "ETag": etag}
            headers["Accept-Ranges"] = "bytes"
            if is_lfs:
                headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
            status, body = 200, data
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{len(data)}"
            self._send(status, body, headers)

    return Handler

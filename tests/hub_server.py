"""A loopback Hub-compatible HTTP server, so uploads and downloads run the real ``huggingface_hub`` client.

It models the endpoints that ``create_repo``, ``upload_folder``/``create_commit``,
``ModelCard.push_to_hub``, ``model_info``/``repo_info``, ``list_repo_tree``, ``hf_hub_download`` and
``snapshot_download`` call, for model repos: repo create, validate-yaml, preupload (every file answered
"regular", i.e. inlined in the commit), NDJSON commit, model info, tree and ``resolve`` (with
``X-Repo-Commit``/``ETag``, and ``X-Error-Code`` on 404). It does NOT model: authentication and permissions
(any token or none is accepted), LFS or Xet storage (large files travel inline as base64), branches other
than ``main`` (any other revision must be a commit sha), tags, pull requests, deletions of whole folders,
pagination, and dataset or Space repos.

``HF_ENDPOINT`` must point at the server BEFORE ``huggingface_hub`` is first imported (it is read into
constants at import time), so clients run in a subprocess (``from tests.hub_server import HubServer``):
``with HubServer() as server: subprocess.run(..., env=server.client_env(tmp_path / "hf_home"))``; then
``server.files(repo_id)`` shows what was uploaded. Repo ids need a namespace (``org/name``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API_ROUTE = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/(?P<action>preupload|commit|revision|tree)/(?P<rest>.*))?$"
)
RESOLVE_ROUTE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    commits: list[Commit] = field(default_factory=list)

    def snapshot(self, revision: str) -> Commit | None:
        if not self.commits:
            return None
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit.oid == revision), None)


class HubServer:
    """In-memory model repos behind a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_env(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """Environment for a client subprocess: this endpoint, an empty cache, no telemetry, a dummy token."""
        env = dict(os.environ)
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN_PATH"):
            env.pop(key, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(Path(hf_home)),
            HF_TOKEN="hf_loopback_test_token",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",
            HF_HUB_ETAG_TIMEOUT="30",
            HF_HUB_DOWNLOAD_TIMEOUT="30",
        )
        return env

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision, as the server stores them."""
        commit = self.repos[repo_id].snapshot(revision)
        return dict(commit.files) if commit else {}

    # ---- request handling (called from the handler threads) ----------------------------------------------

    def create_repo(self, payload: dict) -> tuple[int, dict]:
        name, organization = payload.get("name"), payload.get("organization")
        if payload.get("type", "model") not in (None, "model"):
            return 400, {"error": "only model repos are modelled"}
        if not organization:
            return 400, {"error": "give the repo id as 'namespace/name'"}
        repo_id = f"{organization}/{name}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(repo_id)
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        if revision != "main":
            return 400, {"error": "only the main branch is modelled"}
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.snapshot("main")
            files = dict(parent.files) if parent else {}
            message = ""
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    if value.get("encoding") != "base64":
                        return 400, {"error": f"unsupported encoding {value.get('encoding')!r}"}
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return 400, {"error": f"commit operation {key!r} is not modelled (LFS, copies)"}
            manifest = json.dumps(
                [
                    parent.oid if parent else None,
                    message,
                    sorted((p, git_blob_sha(c)) for p, c in files.items()),
                ]
            )
            oid = hashlib.sha1(manifest.encode()).hexdigest()
            repo.commits.append(Commit(oid, message, files))
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}

    def info(self, repo_id: str, commit: Commit) -> dict:
        return {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }

    def tree(self, commit: Commit, prefix: str) -> list[dict]:
        prefix = prefix.strip("/")
        return [
            {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path}
            for path, content in sorted(commit.files.items())
            if not prefix or path.startswith(prefix + "/")
        ]


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            self._dispatch(send_body=True)

        def do_HEAD(self) -> None:
            self._dispatch(send_body=False)

        def do_POST(self) -> None:
            self._dispatch(send_body=True)

        def _dispatch(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            server.requests.append((self.command, path))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.command == "POST" and path == "/api/repos/create":
                return self._json(*server.create_repo(json.loads(body)))
            if self.command == "POST" and path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if match := RESOLVE_ROUTE.match(path):
                return self._resolve(match["repo"], match["revision"], match["path"], send_body)
            if match := API_ROUTE.match(path):
                return self._api(match["repo"], match["action"], match["rest"] or "", body)
            return self._json(404, {"error": f"no route for {self.command} {path}"})

        def _api(self, repo_id: str, action: str | None, rest: str, body: bytes) -> None:
            repo = server.repos.get(repo_id)
            if repo is None:
                return self._json(404, {"error": "Repository not found"}, error_code="RepoNotFound")
            revision, _, sub_path = rest.partition("/")
            if action == "preupload":
                files = json.loads(body)["files"]
                answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._json(200, {"files": answer, "commitOid": None})
            if action == "commit":
                return self._json(*server.commit(repo_id, revision, body))
            commit = repo.snapshot(revision or "main")
            if commit is None:
                return self._json(404, {"error": "Revision not found"}, error_code="RevisionNotFound")
            if action == "tree":
                return self._json(200, server.tree(commit, sub_path))
            return self._json(200, server.info(repo_id, commit))

        def _resolve(self, repo_id: str, revision: str, file_path: str, send_body: bool) -> None:
            repo = server.repos.get(repo_id)
            if repo is None:
                return self._json(
                    404, {"error": "Repository not found"}, error_code="RepoNotFound", body=send_body
                )
            commit = repo.snapshot(revision)
            if commit is None:
                return self._json(
                    404, {"error": "Revision not found"}, error_code="RevisionNotFound", body=send_body
                )
            if file_path not in commit.files:
                return self._json(
                    404,
                    {"error": "Entry not found"},
                    error_code="EntryNotFound",
                    commit=commit.oid,
                    body=send_body,
                )
            content = commit.files[file_path]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{git_blob_sha(content)}"')
            self.send_header("X-Repo-Commit", commit.oid)
            self.end_headers()
            if send_body:
                self.wfile.write(content)

        def _json(
            self,
            status: int,
            payload: dict | list,
            error_code: str | None = None,
            commit: str | None = None,
            body: bool = True,
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", payload.get("error", ""))
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler

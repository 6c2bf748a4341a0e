"""A small Hub on 127.0.0.1 for tests: enough of the HTTP API for create_repo, upload_folder and downloads."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class _Handler(BaseHTTPRequestHandler):
    repos: dict[str, dict[str, bytes]]
    requests_seen: list[str]

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload) -> None:
        self._reply(status, json.dumps(payload).encode())

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        return hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
        ).hexdigest()

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        self.requests_seen.append(f"POST {path}")
        body = self._body()
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
            self.repos.setdefault(repo_id, {})
            return self._json(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json(200, {})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._json(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if path.startswith("/api/models/") and "/commit/" in path:
            repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            commit = self._commit(repo_id)
            return self._json(
                200,
                {
                    "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{commit}",
                    "commitOid": commit,
                    "pullRequestUrl": None,
                },
            )
        return self._json(404, {"error": f"unknown endpoint {path}"})

    def _resolve(self):
        path = unquote(urlparse(self.path).path)
        self.requests_seen.append(f"{self.command} {path}")
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            filename = rest.split("/", 1)[1]
            files = self.repos.get(repo_id)
            if files is None:
                return self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound"})
            if filename not in files:
                return self._reply(404, b"{}", {"X-Error-Code": "EntryNotFound"})
            content = files[filename]
            headers = {"X-Repo-Commit": self._commit(repo_id), "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
            return self._reply(200, content, headers, content_type="application/octet-stream")
        if path.startswith("/api/models/"):
            repo_id = path.removeprefix("/api/models/").split("/revision/")[0].split("/tree/")[0]
            if repo_id not in self.repos:
                return self._reply(404, b"{}", {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": name} for name in self.repos[repo_id]]
            if "/tree/" in path:
                return self._json(
                    200,
                    [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in self.repos[repo_id].items()
                    ],
                )
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": self._commit(repo_id),
                    "siblings": siblings,
                    "private": False,
                },
            )
        return self._json(404, {"error": f"unknown endpoint {path}"})

    do_GET = _resolve
    do_HEAD = _resolve


class LocalHub:
    """Serves an in-memory Hub on 127.0.0.1 in a background thread; `endpoint` is its URL."""

    def __init__(self):
        handler = type("Handler", (_Handler,), {"repos": {}, "requests_seen": []})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.repos = handler.repos
        self.requests_seen = handler.requests_seen
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

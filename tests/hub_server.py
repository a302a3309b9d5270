"""A small in-memory server speaking the parts of the Hugging Face Hub HTTP API that `huggingface_hub` uses to
create a repo, commit files (inline, base64) and download them back. Tests point `HF_ENDPOINT` at it (with
`HF_HUB_DISABLE_XET=1`), so pushing and pulling run through the real client code, offline.

    server = HubServer().start(); ...; server.stop()
"""

import base64
import hashlib
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id
        self.files = {}  # path -> bytes
        self.sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]


class HubServer:
    def __init__(self, host="127.0.0.1", port=0, namespace="user"):
        self.repos, self.namespace, self.requests = {}, namespace, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server._route(self, "GET")

            def do_HEAD(self):
                server._route(self, "HEAD")

            def do_POST(self):
                server._route(self, "POST")

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- HTTP helpers
    @staticmethod
    def _send(handler, status, body=b"", content_type="application/json", headers=None, head=False):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _error(self, handler, status, code, message, head=False):
        self._send(handler, status, {"error": message}, headers={"X-Error-Code": code, "X-Error-Message": message},
                   head=head)

    @staticmethod
    def _body(handler):
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else b""

    # ---- routes
    def _route(self, handler, method):
        path = unquote(urlparse(handler.path).path)
        self.requests.append((method, path))
        head = method == "HEAD"
        if method == "POST" and path == "/api/repos/create":
            return self._create(handler)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(handler)
        if method == "GET" and path == "/api/whoami-v2":
            return self._send(handler, 200, {"name": self.namespace, "type": "user", "auth": {}})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if m and method == "POST":
            return self._preupload(handler, m.group(1))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if m and method == "POST":
            return self._commit(handler, m.group(1))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m and method == "GET":
            return self._info(handler, m.group(1))
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m and method == "GET":
            return self._tree(handler, m.group(1), (m.group(3) or "").strip("/"))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(handler, m.group(1), m.group(3), head)
        return self._error(handler, 404, "EntryNotFound", f"no route for {method} {path}", head)

    def _create(self, handler):
        payload = json.loads(self._body(handler) or b"{}")
        repo_id = f"{payload.get('organization') or self.namespace}/{payload['name']}"
        if repo_id in self.repos:
            return self._error(handler, 409, "RepoExists", "You already created this model repo")
        self.repos[repo_id] = _Repo(repo_id)
        self._send(handler, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, handler):
        """Model-card metadata check: the front matter must parse as a YAML mapping."""
        import yaml

        content = json.loads(self._body(handler)).get("content", "")
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
            if meta is not None and not isinstance(meta, dict):
                raise ValueError("metadata is not a mapping")
        except Exception as err:  # noqa: BLE001 - reported to the client like the Hub does
            return self._send(handler, 400, {"errors": [{"message": str(err)}], "warnings": []},
                              headers={"X-Error-Code": "BadRequest"})
        self._send(handler, 200, {"errors": [], "warnings": []})

    def _repo(self, handler, repo_id, head=False):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(handler, 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}", head)
        return repo

    def _preupload(self, handler, repo_id):
        if self._repo(handler, repo_id) is None:
            return
        files = json.loads(self._body(handler))["files"]
        # every file goes inline in the commit payload ("regular"), so no LFS/Xet storage is needed
        self._send(handler, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                            for f in files]})

    def _commit(self, handler, repo_id):
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        for line in self._body(handler).splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] in ("deletedFile",):
                repo.files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._error(handler, 400, "BadRequest", f"unsupported commit operation {item['key']}")
        repo.sha = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in repo.files.items())).encode()).hexdigest()
        self._send(handler, 200, {"commitOid": repo.sha, "commitUrl": f"{self.url}/{repo_id}/commit/{repo.sha}"})

    def _info(self, handler, repo_id):
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        self._send(handler, 200, {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "disabled": False, "gated": False,
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(repo.files.items())], "tags": [],
        })

    def _tree(self, handler, repo_id, prefix):
        repo = self._repo(handler, repo_id)
        if repo is None:
            return
        entries = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                   for p, b in sorted(repo.files.items()) if not prefix or p.startswith(prefix + "/")]
        self._send(handler, 200, entries)

    def _resolve(self, handler, repo_id, filename, head):
        repo = self._repo(handler, repo_id, head)
        if repo is None:
            return
        if filename not in repo.files:
            return self._error(handler, 404, "EntryNotFound", f"{filename} does not exist in {repo_id}", head)
        data = repo.files[filename]
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        self._send(handler, 200, data, content_type="application/octet-stream", head=head,
                   headers={"X-Repo-Commit": repo.sha, "ETag": etag})
